"""VisualTokenSelect on ONNX Runtime (CPU), through onnxruntime-extensions' Python custom ops.

ONNX Runtime's C/C++ headers are not on PyPI, so the op is registered as an extensions Python op. Those
live only in the `ai.onnx.contrib` domain: `for_onnxruntime()` retargets the `iwp` nodes of a model *in
memory*; the file on disk keeps domain `iwp`, which TensorRT's parser maps to the plugin.

The extensions' Python ops take no fp16 inputs, so in an FP16 graph the in-memory copy casts the node's
activations to fp32 first; the op scores in fp32 anyway. Every method runs on the compiled kernel (cpu.cpp).
"""
from __future__ import annotations

import time
from pathlib import Path

import onnx

from . import contract

ORT_DOMAIN = "ai.onnx.contrib"
_ACTIVATIONS = contract.ACTIVATIONS  # the inputs of type T in the schema
_registered = False
_selection_seconds = [0.0]  # time spent inside the op, for `iwp profile`


def selection_seconds() -> float:
    """Seconds spent in VisualTokenSelect so far in this process (the profiler reads differences)."""
    return _selection_seconds[0]


def _select(arrays, node_attrs):
    """The op's body: numpy inputs in contract order -> [B, keep] int64 indices."""
    import numpy as np
    import torch

    from . import cpu
    from .contract import method_from_attributes
    from .view import LayerView

    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    for mask in (contract.INPUTS.index("key_mask"), contract.INPUTS.index("query_mask")):
        tensors[mask] = tensors[mask] != 0  # int32 on the node (TensorRT plugins take no bool)
    options = {k: v for k, v in node_attrs.items() if k not in contract.CORE_ATTRIBUTES}   # method_from_attributes keeps its own
    core = {**contract.CORE_DEFAULTS, **node_attrs}   # the contract's defaults for any core attribute left out
    keep, layer, stage, n_stages = (int(core[k]) for k in ("keep", "layer_index", "stage", "n_stages"))
    method = method_from_attributes({"method": node_attrs["method"], **options})
    view = LayerView(*tensors[:8], tensors[11].shape[1], *tensors[8:], layer, stage, n_stages)
    start = time.perf_counter()
    out = cpu.select(method, view, keep).numpy()  # the compiled kernel (cpu.cpp)
    _selection_seconds[0] += time.perf_counter() - start
    return out


def register() -> str:
    """Register the Python ops once; returns the extensions library path for SessionOptions."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    if not _registered:
        scalar = {bool: PyCustomOpDef.dt_int64, int: PyCustomOpDef.dt_int64, float: PyCustomOpDef.dt_float,
                  str: PyCustomOpDef.dt_string}
        attrs = {name: scalar[kind] for name, kind in {**contract.CORE_ATTRIBUTES,
                                                       **contract.method_attributes()}.items() if kind in scalar}
        # the activations arrive as fp32 (for_onnxruntime casts fp16 ones); the rest as the contract types them
        element = {"float32": PyCustomOpDef.dt_float, "int32": PyCustomOpDef.dt_int32,
                   "int64": PyCustomOpDef.dt_int64}
        onnx_op(op_type=contract.OP_TYPE, domain=ORT_DOMAIN,
                inputs=[element[contract.INPUT_DTYPES[name][0]] for name in contract.INPUTS],
                outputs=[PyCustomOpDef.dt_int64], attrs=attrs)(lambda *arrays, **a: _select(arrays, a))
        _registered = True
    return get_library_path()


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def for_onnxruntime(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """`model` with its iwp nodes in ai.onnx.contrib and fp16 activations cast to fp32 before them (a copy
    unless copy=False; the file is never touched)."""
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    types = None
    nodes = []
    for original in out.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # the list is rebuilt below, so hold copies, not views into it
        if node.domain == contract.DOMAIN:
            types = types if types is not None else _elem_types(out)
            node.domain = ORT_DOMAIN
            for position, name in enumerate(contract.INPUTS):
                if name in _ACTIVATIONS and types.get(node.input[position]) == onnx.TensorProto.FLOAT16:
                    cast = f"{node.input[position]}.iwp_fp32"
                    nodes.append(onnx.helper.make_node("Cast", [node.input[position]], [cast],
                                                       to=onnx.TensorProto.FLOAT, name=f"{cast}.cast"))
                    node.input[position] = cast
        nodes.append(node)
    if types is not None:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    for opset in out.opset_import:
        if opset.domain == contract.DOMAIN:
            opset.domain = ORT_DOMAIN
    return out


def session(model, providers: list[str] | None = None):
    """An ONNX Runtime session for a ModelProto or a path. A file without iwp nodes is handed to ONNX
    Runtime by path, so a multi-GB graph is not copied through Python."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    # An engine runs several graphs per decode step (embed, each segment): a session's workers must stop
    # spinning when its run ends, or they take the cores from the next graph (0.5b on 2 cores: 108 -> 72 ms a step)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.register_custom_ops_library(register())
    # weight-only means float activations: the fused MatMulNBits of a quantized segment would otherwise (level 4)
    # quantize its activations to int8 inside
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    providers = providers or ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        model = onnx.load(path, load_external_data=False)
        if not any(node.domain == contract.DOMAIN for node in model.graph.node):
            del model
            return ort.InferenceSession(path, options, providers=providers)
        # the retargeted graph goes in as bytes; its weights stay in the external-data file beside it
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(path).parent))
        return ort.InferenceSession(for_onnxruntime(model, copy=False).SerializeToString(), options,
                                    providers=providers)
    return ort.InferenceSession(for_onnxruntime(model).SerializeToString(), options, providers=providers)
