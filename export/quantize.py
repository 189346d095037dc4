"""Weight-only quantization of a segment graph: its linear layers' weights become int4 or int8 initializers
behind a `DequantizeLinear` that feeds the unchanged `MatMul`, the QDQ form TensorRT builds into weight-only
GEMMs (Ampere and later, Orin's sm_87 included) and ONNX Runtime fuses into MatMulNBits.

    int4  block-wise along K, block 128, symmetric: ONNX Runtime's weight-only quantizer
          (DefaultWeightOnlyQuantizer.qbits_block_quant, what MatMulNBitsQuantizer runs per weight in QDQ
          format). A K under 128 is one block (the tiny model's); the DequantizeLinear says block_size=128.
    int8  per output channel, symmetric: ONNX Runtime writes 8-bit weights only as its MatMulNBits contrib op,
          so int8 uses its per-channel QDQ weight quantization (quant_utils, what quantize_static's QDQ path
          calls for weights) and a per-axis DequantizeLinear (axis=1, over N).

Round to nearest, no calibration data. The graph is rewritten in memory (onnx_ir) before it is written, and
each quantized weight is a lazy tensor: it is computed from its float weight when the graph is saved, one
weight at a time, so a 7B segment is never held in float (export/lazy.py). Only MatMuls whose B is a 2-D float
initializer are touched; the LM head (a Gemm, or the token table when tied), norms and biases stay float.
Embed, vision and select graphs and the token table are never passed here.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

QUANT_BITS = {"int8": 8, "int4": 4}
INT4_BLOCK = 128
_OPSET = 21   # blocked DequantizeLinear and int4 tensors; opset 20 -> 21 changes only type lists of ops we use
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def quantize_matmuls(model: ir.Model, quant: str) -> int:
    """Rewrite `model` in place with `quant` ("int8" or "int4") weights; returns how many were quantized."""
    assert quant in QUANT_BITS, quant
    graph, bits = model.graph, QUANT_BITS[quant]
    done: dict[str, ir.Value] = {}   # a weight shared by two MatMuls is quantized once
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        if len(weight.const_value.shape) != 2 or weight.const_value.dtype not in _FLOATS:
            continue
        if weight.name not in done:
            q, scales = _lazy_quantized(weight, quant)
            graph.register_initializer(q)
            graph.register_initializer(scales)
            attrs = {"axis": 0, "block_size": INT4_BLOCK} if quant == "int4" else {"axis": 1}
            # no zero-point input (0 by default), as ORT's int4 QDQ writes it: TensorRT's dequantize takes only 0
            dq = ir.node("DequantizeLinear", [q, scales], attributes=attrs, name=f"{node.name}_DQ_Q{bits}")
            dq.outputs[0].name = f"{weight.name}_DQ_Q{bits}_output"
            graph.insert_before(node, dq)
            done[weight.name] = dq.outputs[0]
        node.replace_input_with(1, done[weight.name])
    for name in done:
        if not graph.initializers[name].uses():
            graph.initializers.pop(name)
    if done:
        model.opset_imports[""] = max(model.opset_imports.get("", _OPSET), _OPSET)
        model.ir_version = max(model.ir_version, 10)
    return len(done)


def _lazy_quantized(weight: ir.Value, quant: str) -> tuple[ir.Value, ir.Value]:
    """(q, scales) of a float weight [K, N] as lazy initializers computed together from one read of it: the
    pair is kept until both halves are written, then dropped."""
    float_value = weight.const_value
    k, n = float_value.shape
    held: dict = {}

    def part(index: int):
        def read():
            if "pair" not in held:
                held["pair"], held["taken"] = quantize_array(float_value.numpy(), quant), set()
            out = held["pair"][index]
            held["taken"].add(index)
            if held["taken"] == {0, 1}:
                held.clear()
            return out
        return read

    bits = QUANT_BITS[quant]
    q_type = ir.DataType.INT4 if quant == "int4" else ir.DataType.INT8
    scale_shape = [(k + INT4_BLOCK - 1) // INT4_BLOCK, n] if quant == "int4" else [n]
    q = ir.Value(name=f"{weight.name}_DQ_Q{bits}", shape=ir.Shape([k, n]), type=ir.TensorType(q_type),
                 const_value=ir.LazyTensor(part(0), dtype=q_type, shape=ir.Shape([k, n])))
    scales = ir.Value(name=f"{weight.name}_DQ_scales", shape=ir.Shape(scale_shape),
                      type=ir.TensorType(float_value.dtype),
                      const_value=ir.LazyTensor(part(1), dtype=float_value.dtype, shape=ir.Shape(scale_shape)))
    return q, scales


def quantize_array(w: np.ndarray, quant: str) -> tuple[ir.TensorProtocol, ir.TensorProtocol]:
    """(q [K, N], scales) of a float weight w [K, N] by ONNX Runtime's quantizers, as the DequantizeLinear
    above reads them: int4 scales [ceil(K / 128), N], int8 scales [N]."""
    if quant == "int4":
        quantizer = _weight_only_int4()
        packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(w))
        return ir.PackedTensor(packed, ir.DataType.INT4, shape=list(w.shape)), ir.Tensor(scales)
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_onnx_initializer
    params = [compute_data_quant_params(w[:, c], TensorProto.INT8, symmetric=True) for c in range(w.shape[1])]
    zero = np.array([p[0] for p in params], dtype=np.int8)                     # [N], all 0
    assert not zero.any(), "symmetric int8 has zero points of 0"
    scale = np.array([p[1] for p in params], dtype=w.dtype)                     # [N]
    q = quantize_onnx_initializer(numpy_helper.from_array(w, "w"), TensorProto.INT8, zero, scale, axis=1)
    return ir.Tensor(numpy_helper.to_array(q)), ir.Tensor(scale)


def _weight_only_int4():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)
    from onnxruntime.quantization.quant_utils import QuantFormat
    root.handlers[:], root.level = handlers, level   # its import calls logging.basicConfig(level=INFO)
    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=INT4_BLOCK, is_symmetric=True, quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",)))


def quantize_segment(path: Path, quant: str, external_data: bool = True) -> None:
    """Rewrite the saved graph at `path` in place with `quant` weights (its float side file replaced)."""
    from .graphs import save_ir
    path = Path(path)
    model = ir.load(path)
    sides = {t.const_value.location for t in model.graph.initializers.values()
             if isinstance(t.const_value, ir.ExternalTensor)}
    quantize_matmuls(model, quant)
    staging = path.with_name(path.name + ".quantizing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_ir(model, staging / path.name, external_data)
        del model
        path.unlink()
        for side in sides | {f"{path.name}.data"}:
            (path.parent / side).unlink(missing_ok=True)
        for written in staging.iterdir():
            written.rename(path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
