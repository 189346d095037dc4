"""Export without holding the weights: a graph is traced from the model's skeleton (iwp/weight_source.py: every
parameter and buffer on the meta device), and each of its initializers becomes an `onnx_ir.LazyTensor` that
reads its value from the weight source when the graph is written, one tensor at a time, into external data.

So the exporter holds at most a few tensors beyond what it is writing, at any model size. What torch.onnx's
optimizer would fold from a weight (a linear layer's W^T) is folded here as a lazy tensor of its own first, so
the optimizer never touches a weight; quantization (export/quantize.py) is lazy the same way.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch


def buffers_to_meta(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Move every buffer of `model` to the meta device in place (a traced graph must be on one device): the
    real values by id of their meta tensor, where a graph's initializers find them again."""
    real = {}
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta":
                meta = buffer.to("meta")
                module._buffers[name] = meta
                real[id(meta)] = buffer
    return real


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


class LazyWeights:
    """The lazy values of one model's tensors: parameters from the weight source by their HF names, buffers
    from their real copies."""

    def __init__(self, hf: torch.nn.Module, source, real_buffers: dict[int, torch.Tensor]):
        self.source, self.real_buffers = source, real_buffers
        self.hf_names = {id(p): name for name, p in hf.named_parameters()}

    def by_name(self, module: torch.nn.Module) -> dict[str, ir.LazyTensor]:
        """Lazy tensors of `module`'s parameters and buffers by their names in a graph traced from `module`."""
        out = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in self.hf_names:
                hf_name = self.hf_names[id(p)]
                out[name] = _lazy(lambda n=hf_name: to_numpy(self.source.tensor(n)), p)
        for name, b in module.named_buffers(remove_duplicate=False):
            if id(b) in self.real_buffers:
                out[name] = _lazy(lambda real=self.real_buffers[id(b)]: to_numpy(real), b)
        return out

    def apply(self, model: ir.Model, module: torch.nn.Module) -> None:
        """Every meta initializer of `model` (traced from `module`) made lazy, then each weight's transposes
        folded into lazy tensors of their own."""
        lazies = self.by_name(module)
        for name, value in model.graph.initializers.items():
            raw = getattr(value.const_value, "raw", None)
            if isinstance(raw, torch.Tensor) and raw.device.type == "meta":
                if name not in lazies:
                    raise RuntimeError(f"initializer {name} of the traced graph has no weight behind it")
                value.const_value = lazies[name]
        fold_transposes(model)


def _lazy(read, like: torch.Tensor) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.Tensor(read()), dtype=ir.DataType.from_numpy(
        torch.empty((), dtype=like.dtype).numpy().dtype), shape=ir.Shape(list(like.shape)))


def fold_transposes(model: ir.Model) -> None:
    """Each Transpose of a lazy initializer replaced by a lazy initializer of the transposed value (named as
    the Transpose's output), what constant folding would have computed eagerly."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is None or not isinstance(source.const_value, ir.LazyTensor) or not source.is_initializer():
            continue
        rank = len(source.const_value.shape)
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(range(rank))[::-1]
        value = source.const_value
        shape = ir.Shape([value.shape[p] for p in perm])
        folded = ir.LazyTensor(lambda v=value, p=tuple(perm): ir.Tensor(np.ascontiguousarray(v.numpy().transpose(p))),
                               dtype=value.dtype, shape=shape)
        out = node.outputs[0]
        weight = ir.Value(name=out.name, shape=shape, type=ir.TensorType(value.dtype), const_value=folded)
        out.replace_all_uses_with(weight)
        graph.remove(node, safe=True)
        graph.register_initializer(weight)
        if not source.uses() and not source.is_graph_output():
            graph.initializers.pop(source.name)
