"""The compiled CPU kernel (cpu.cpp) behind the reference's interface: any method on a LayerView."""
from __future__ import annotations

import numpy as np
import torch

from . import contract
from .view import LayerView


def select(method, view: LayerView, keep: int) -> torch.Tensor:
    """[B, keep] int64 indices, ascending: the same contract and rules as method.select, in C++."""
    from . import _cpu

    def f32(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().float().cpu().numpy())

    def i64(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().long().cpu().numpy())

    def u8(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray((t.detach() != 0).cpu().numpy().astype(np.uint8))

    ttv = view.ttv if view.ttv is not None else torch.zeros(view.hidden.shape[0], view.n_visual)
    tensors = {**{name: getattr(view, name) for name in contract.INPUTS if name != "ttv"}, "ttv": ttv}
    convert = {"float32": f32, "int64": i64, "int32": u8}   # activations in fp32; masks as 0/1 bytes
    arrays = [convert[contract.INPUT_DTYPES[name][0]](tensors[name]) for name in contract.INPUTS]
    attributes = contract.complete_attributes(contract.node_attributes(method, keep, view.layer, view.stage,
                                                                       view.n_stages))
    return torch.from_numpy(_cpu.select(arrays, attributes))
