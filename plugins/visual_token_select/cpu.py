"""The compiled CPU kernel (cpu.cpp) behind the reference's interface: any method on a LayerView."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .view import LayerView


def select(method, view: LayerView, keep: int) -> torch.Tensor:
    """[B, keep] int64 indices, ascending: the same contract and rules as method.select, in C++."""
    from . import _cpu

    def f32(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().float().cpu().numpy())

    def i64(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().long().cpu().numpy())

    def u8(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.uint8))

    ttv = view.ttv if view.ttv is not None else torch.zeros(view.hidden.shape[0], view.n_visual)
    out = _cpu.select(method.name, f32(view.hidden), f32(view.q), f32(view.k), f32(view.q_rot), f32(view.k_rot),
                      f32(view.v), u8(view.key_mask), i64(view.visual_start), i64(view.query_idx),
                      u8(view.query_mask), i64(view.last_idx), f32(view.visual_xy), f32(ttv), keep, view.stage,
                      view.n_stages, dataclasses.asdict(method.config))
    return torch.from_numpy(out)
