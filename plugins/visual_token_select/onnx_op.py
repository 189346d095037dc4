"""VisualTokenSelect in ONNX: its OpSchema (so the checker and shape inference accept the node) and the
translation the torch exporter uses to emit it from `torch.ops.iwp.visual_token_select`.

Both read the contract (plugins/visual_token_select/contract.py). Registering the schema happens on the
first call to `register_schema()`, never at import.
"""
from __future__ import annotations

import json

import onnx
import onnxscript
from onnx import defs

from . import contract

_ONNX_ATTR = {bool: defs.OpSchema.AttrType.INT, int: defs.OpSchema.AttrType.INT,
              float: defs.OpSchema.AttrType.FLOAT, str: defs.OpSchema.AttrType.STRING,
              tuple: defs.OpSchema.AttrType.INTS}
_ONNX_TENSOR = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
                "int32": "tensor(int32)", "int64": "tensor(int64)"}
# the schema's type constraints, one per dtype set of the contract (contract.INPUT_DTYPES, OUTPUT_DTYPE)
_CONSTRAINTS = {contract.ACTIVATION_DTYPES: ("T", "activations"), ("float32",): ("F", "fp32 side inputs"),
                ("int32",): ("M", "masks (TensorRT plugins take no bool)"),
                ("int64",): ("I", "positions and the output indices")}
_INPUT_TYPES = {name: _CONSTRAINTS[dtypes][0] for name, dtypes in contract.INPUT_DTYPES.items()}

IWP_OPSET = onnxscript.values.Opset(contract.DOMAIN, contract.OP_VERSION)


def schema() -> defs.OpSchema:
    attributes = [defs.OpSchema.Attribute(name, _ONNX_ATTR[kind], "", required=name in ("method", "keep"))
                  for name, kind in {**contract.CORE_ATTRIBUTES, **contract.method_attributes()}.items()]
    inputs = [defs.OpSchema.FormalParameter(name, _INPUT_TYPES[name]) for name in contract.INPUTS]
    return defs.OpSchema(
        contract.OP_TYPE, contract.DOMAIN, contract.OP_VERSION,
        doc="Select `keep` of the N visual tokens; see plugins/visual_token_select/README.md.",
        inputs=inputs,
        outputs=[defs.OpSchema.FormalParameter(contract.OUTPUT, _CONSTRAINTS[(contract.OUTPUT_DTYPE,)][0])],
        type_constraints=[(name, [_ONNX_TENSOR[d] for d in dtypes], doc) for dtypes, (name, doc) in _CONSTRAINTS.items()],
        attributes=attributes)


def register_schema() -> None:
    """Make onnx (checker, shape inference, the torch exporter) accept iwp::VisualTokenSelect. Idempotent."""
    if not defs.has(contract.OP_TYPE, contract.DOMAIN):
        defs.register_schema(schema())


def translate(hidden, q, k, q_rot, k_rot, v, key_mask, visual_start, query_idx, query_mask, last_idx,
              visual_xy, ttv, method: str, keep: int, layer_index: int, stage: int, n_stages: int, options: str):
    """torch.ops.iwp.visual_token_select -> one iwp::VisualTokenSelect node with typed attributes. The bool
    masks are cast to int32 first: TensorRT plugins take no bool tensors."""
    from onnxscript import opset18 as op
    attrs = contract.complete_attributes(
        {**contract.core_attributes(method, keep, layer_index, stage, n_stages), **json.loads(options)})
    key_mask, query_mask = (op.Cast(m, to=onnx.TensorProto.INT32) for m in (key_mask, query_mask))
    return IWP_OPSET.VisualTokenSelect(hidden, q, k, q_rot, k_rot, v, key_mask, visual_start, query_idx,
                                       query_mask, last_idx, visual_xy, ttv, **attrs)


def sort_stable(x, stable: bool = True, dim: int = -1, descending: bool = False):
    """aten.sort.stable -> ONNX TopK over the whole axis. TopK breaks ties by the lower index, which is what
    a stable sort does, so the native selection keeps the reference's tie rule (tested on ties)."""
    from onnxscript import opset18 as op
    n = op.Shape(x, start=dim, end=dim + 1 if dim != -1 else None)
    values, indices = op.TopK(x, n, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def custom_translation_table() -> dict:
    import torch
    import iwp.plugins.visual_token_select.torch_op  # noqa: F401  (defines torch.ops.iwp.visual_token_select)
    register_schema()
    return {torch.ops.iwp.visual_token_select.default: translate, torch.ops.aten.sort.stable: sort_stable}
