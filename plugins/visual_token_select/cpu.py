"""The compiled CPU kernel (cpu.cpp) behind the reference's interface: IWP selection on a LayerView."""
from __future__ import annotations

import numpy as np
import torch

from .iwp import IWPConfig
from .view import LayerView


def iwp_select(view: LayerView, config: IWPConfig, keep: int) -> torch.Tensor:
    """[B, keep] int64 indices, ascending: the same contract and rules as IWP.select, in C++."""
    from . import _cpu

    def f32(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().float().cpu().numpy())

    def i64(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().long().cpu().numpy())

    out = _cpu.iwp_select(f32(view.q), f32(view.k), f32(view.k_rot), f32(view.v),
                          np.ascontiguousarray(view.key_mask.cpu().numpy().astype(np.uint8)), i64(view.visual_start),
                          i64(view.query_idx), np.ascontiguousarray(view.query_mask.cpu().numpy().astype(np.uint8)),
                          i64(view.last_idx), view.n_visual, keep, config.lam, config.chunk, config.growth,
                          config.queries)
    return torch.from_numpy(out)
