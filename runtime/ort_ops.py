"""VisualTokenSelect on ONNX Runtime (CPU), through onnxruntime-extensions' Python custom ops.

ONNX Runtime's C/C++ headers are not on PyPI, so the op is registered as an extensions Python op. Those
live only in the `ai.onnx.contrib` domain: `for_onnxruntime()` retargets the `iwp` nodes of a model *in
memory*; the file on disk keeps domain `iwp`, which TensorRT's parser maps to the plugin.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from iwp.plugins.visual_token_select import contract

ORT_DOMAIN = "ai.onnx.contrib"
_registered = False


def register() -> str:
    """Register the Python op once; returns the extensions library path for SessionOptions."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    if not _registered:
        import numpy as np
        import torch

        from iwp.plugins.visual_token_select import cpu
        from iwp.plugins.visual_token_select.contract import method_from_attributes
        from iwp.plugins.visual_token_select.torch_op import visual_token_select
        from iwp.plugins.visual_token_select.view import LayerView

        scalar = {bool: PyCustomOpDef.dt_int64, int: PyCustomOpDef.dt_int64, float: PyCustomOpDef.dt_float,
                  str: PyCustomOpDef.dt_string}
        attrs = {name: scalar[kind] for name, kind in {**contract.CORE_ATTRIBUTES,
                                                       **contract.method_attributes()}.items() if kind in scalar}
        dtypes = {"key_mask": PyCustomOpDef.dt_bool, "query_mask": PyCustomOpDef.dt_bool,
                  "visual_start": PyCustomOpDef.dt_int64, "query_idx": PyCustomOpDef.dt_int64,
                  "last_idx": PyCustomOpDef.dt_int64}

        @onnx_op(op_type=contract.OP_TYPE, domain=ORT_DOMAIN,
                 inputs=[dtypes.get(name, PyCustomOpDef.dt_float) for name in contract.INPUTS],
                 outputs=[PyCustomOpDef.dt_int64], attrs=attrs)
        def _visual_token_select(*arrays, **node_attrs):
            import json
            core = {"method", "keep", "layer_index", "stage", "n_stages", "plugin_namespace", "plugin_version"}
            options = {k: v for k, v in node_attrs.items() if k not in core}  # method_from_attributes keeps its own
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
            keep, layer = int(node_attrs["keep"]), int(node_attrs.get("layer_index", 0))
            stage, n_stages = int(node_attrs.get("stage", 0)), int(node_attrs.get("n_stages", 1))
            method = method_from_attributes({"method": node_attrs["method"], **options})
            if method.name == "iwp":  # the compiled kernel (cpu.cpp); other methods run the reference
                view = LayerView(*tensors[:8], tensors[11].shape[1], *tensors[8:], layer, stage, n_stages)
                return cpu.iwp_select(view, method.config, keep).numpy()
            out = visual_token_select(*tensors, node_attrs["method"], keep, layer, stage, n_stages,
                                      json.dumps(options))
            return out.numpy()
        _registered = True
    return get_library_path()


def for_onnxruntime(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """`model` with its iwp nodes in ai.onnx.contrib (a copy unless copy=False; the file is never touched)."""
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == contract.DOMAIN:
            node.domain = ORT_DOMAIN
    for opset in out.opset_import:
        if opset.domain == contract.DOMAIN:
            opset.domain = ORT_DOMAIN
    return out


def session(model, providers: list[str] | None = None):
    """An ONNX Runtime session for a ModelProto or a path. A file without iwp nodes is handed to ONNX
    Runtime by path, so a multi-GB graph is not copied through Python."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.register_custom_ops_library(register())
    providers = providers or ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        model = onnx.load(path, load_external_data=False)
        if not any(node.domain == contract.DOMAIN for node in model.graph.node):
            del model
            return ort.InferenceSession(path, options, providers=providers)
        onnx.load_external_data_for_model(model, str(Path(path).parent))
        return ort.InferenceSession(for_onnxruntime(model, copy=False).SerializeToString(), options,
                                    providers=providers)
    return ort.InferenceSession(for_onnxruntime(model).SerializeToString(), options, providers=providers)
