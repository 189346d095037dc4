"""Weight-only quantization of a saved segment graph: its linear layers' weights become int4 or int8
initializers behind a `DequantizeLinear` that feeds the unchanged `MatMul`, the QDQ form TensorRT builds into
weight-only GEMMs (Ampere and later, Orin's sm_87 included) and ONNX Runtime fuses into MatMulNBits.

    int4  block-wise along K, block 128, symmetric: ONNX Runtime's MatMulNBitsQuantizer in QDQ format.
          A K under 128 is one block (the tiny model's); the graph's DequantizeLinear says block_size=128.
    int8  per output channel, symmetric: MatMulNBitsQuantizer writes 8-bit weights only as its MatMulNBits
          contrib op, so int8 uses ONNX Runtime's per-channel QDQ weight quantization (quant_utils, what
          quantize_static's QDQ path calls for weights) and a per-axis DequantizeLinear (axis=1, over N).

Round to nearest, no calibration data: the quantizers run on the CPU, on the graph's weights alone.
Only MatMuls whose B is a 2-D float initializer are touched; the LM head (a Gemm, or the token table when tied),
norms and biases stay float. Embed, vision and select graphs and the token table are never passed here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

QUANT_BITS = {"int8": 8, "int4": 4}
INT4_BLOCK = 128
_OPSET = 21   # blocked DequantizeLinear and int4 tensors; opset 20 -> 21 changes only type lists of ops we use
_TWO_GB = 2 ** 31


def quantize_segment(path: Path, quant: str, external_data: bool | None = None) -> None:
    """Rewrite the segment graph at `path` in place with `quant` ("int8" or "int4") weights."""
    from onnxruntime.quantization.quant_utils import QuantFormat
    assert quant in QUANT_BITS, quant
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    sides = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    onnx.load_external_data_for_model(model, str(path.parent))   # the float weights, read once, here
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < _OPSET:
            opset.version = _OPSET
    model.ir_version = max(model.ir_version, 10)
    if quant == "int4":
        quantizer = _matmul_nbits_quantizer()(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                              quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
        quantizer.process()
        model = quantizer.model.model
    else:
        _quantize_int8(model)
    _save(model, path, external_data, sides)


def _matmul_nbits_quantizer():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    root.handlers[:], root.level = handlers, level   # its import calls logging.basicConfig(level=INFO)
    return MatMulNBitsQuantizer


def _weight_matmuls(graph: onnx.GraphProto):
    """The MatMuls whose B is a 2-D float initializer: the linear layers (attention's MatMuls multiply two
    activations)."""
    inits = {i.name: i for i in graph.initializer}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            init = inits[node.input[1]]
            if len(init.dims) == 2 and init.data_type in floats:
                yield node, init


def _quantize_int8(model: onnx.ModelProto) -> None:
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_onnx_initializer
    graph = model.graph
    done = {}   # a weight shared by two MatMuls is quantized once
    for node, init in list(_weight_matmuls(graph)):
        if init.name not in done:
            w = onnx.numpy_helper.to_array(init)             # [K, N]
            params = [compute_data_quant_params(w[:, n], onnx.TensorProto.INT8, symmetric=True)
                      for n in range(w.shape[1])]
            zero = np.array([p[0] for p in params], dtype=np.int8)                     # [N], all 0
            assert not zero.any(), "symmetric int8 has zero points of 0"
            scale = np.array([p[1] for p in params], dtype=w.dtype)                     # [N]
            q = quantize_onnx_initializer(init, onnx.TensorProto.INT8, zero, scale, axis=1,
                                          quant_weight_name=f"{init.name}_DQ_Q8")
            s = onnx.numpy_helper.from_array(scale, f"{init.name}_DQ_scales")
            graph.initializer.extend([q, s])
            out = f"{init.name}_DQ_Q8_output"
            # no zero-point input (0 by default), as the int4 path writes it: TensorRT's dequantize takes only 0
            graph.node.append(onnx.helper.make_node("DequantizeLinear", [q.name, s.name], [out], axis=1,
                                                    name=f"{node.name}_DQ_Q8"))
            done[init.name] = out
        node.input[1] = done[init.name]
    keep = [i for i in graph.initializer if i.name not in done]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    _topological(graph)


def _topological(graph: onnx.GraphProto) -> None:
    """Each DequantizeLinear (appended last) moved before its first consumer: ONNX wants nodes in order."""
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    placed, order = set(), []
    for node in graph.node:
        if node.output[0] in dq:
            continue
        for name in node.input:
            if name in dq and name not in placed:
                order.append(dq[name])
                placed.add(name)
        order.append(node)
    graph.ClearField("node")
    graph.node.extend(order)


def _save(model: onnx.ModelProto, path: Path, external_data: bool | None, sides: set[str]) -> None:
    """Over the float graph and its side files, then checked: over 2 GB (or when asked) weights go to external
    data, as the exporter writes them."""
    data = path.with_name(path.name + ".data")
    large = external_data or sum(len(i.raw_data) for i in model.graph.initializer) >= _TWO_GB
    path.unlink()
    for side in sides | {data.name}:
        (path.parent / side).unlink(missing_ok=True)
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
