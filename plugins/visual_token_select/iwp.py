"""IWP: attention as an implicit linear layer W = Σ_i φ(k_i)ᵀ v_i, pruned to the updates that best approximate W.

Magnitude of update i, per query head h and query q (keys without RoPE):
    m_i = η(q)·κ(q, k_i)·‖v_i‖,  κ(x, y) = exp(x·y/√d),  η(q) = 1/Σ_j κ(q, k_j)
i.e. attention probability × value norm, averaged over heads and the query set.

Duplication of updates i and j: the cosine of the block-diagonal rank-1 updates ΔW_i = ⊕_h φ(k_i^h)ᵀ v_i^h
(keys with RoPE), over the KV heads h:
    S_ij = Σ_h (v_i^h·v_j^h)·κ(k_i^h, k_j^h) / (‖ΔW_i‖·‖ΔW_j‖),  ‖ΔW_i‖² = Σ_h κ(k_i^h, k_i^h)·‖v_i^h‖²
computed in log space, because κ(k, k) overflows fp32 on real activations. Every exponent below is ≤ 0
by Cauchy–Schwarz, so nothing overflows.

Selection: PCMMR (pcmmr.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .pcmmr import chunk_schedule, pcmmr
from .view import LayerView, mean_over_queries, visual_log_attention
from .stages import Plan, single_stage

_EPS = 1e-12


@dataclass(frozen=True)
class IWPConfig:
    layer: int = 2            # pruning layer L; layers before it see every token
    lam: float = 0.7          # λ: magnitude weight; 1 = top-K by magnitude
    chunk: int = 4            # first chunk size c_0
    growth: float = 1.5       # c_s = round(c_0·growth^s): the progressive schedule
    queries: str = "instruction"  # 'instruction' (tokens after the image) or 'last'

    def __post_init__(self):
        if self.layer < 0:
            raise ValueError(f"iwp layer must be >= 0, got {self.layer}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"iwp lam must be in [0, 1], got {self.lam}")
        chunk_schedule(1, self.chunk, self.growth)  # validates chunk and growth
        if self.queries not in ("instruction", "last"):
            raise ValueError(f"iwp queries must be 'instruction' or 'last', got {self.queries!r}")


def magnitude(view: LayerView, queries: str) -> Tensor:
    """[B, N]: mean over heads and queries of attention probability (no RoPE) × value norm."""
    log_p, valid = visual_log_attention(view, view.q, view.k, queries)     # [B, Hq, Q, N]
    v = view.visual(view.v).float()                                         # [B, Hkv, N, d]
    log_vnorm = v.norm(dim=-1).clamp(min=_EPS).log()                        # [B, Hkv, N]
    log_vnorm = log_vnorm.repeat_interleave(log_p.shape[1] // v.shape[1], dim=1)
    return mean_over_queries((log_p + log_vnorm[:, :, None, :]).exp(), valid)


class UpdateCosine:
    """S[:, :, chosen] for the rank-1 updates of the visual tokens, O(N·c) memory per call."""

    def __init__(self, view: LayerView):
        k = view.visual(view.k_rot).float()                                 # [B, Hkv, N, d]
        v = view.visual(view.v).float()
        self.a = k / math.sqrt(math.sqrt(k.shape[-1]))                      # a_i·a_j = k_i·k_j/√d
        vnorm = v.norm(dim=-1, keepdim=True).clamp(min=_EPS)
        self.v_unit = v / vnorm
        self.log_vnorm = vnorm.squeeze(-1).log()                            # [B, Hkv, N]
        # log ‖ΔW_i‖² = logsumexp_h (‖a_i^h‖² + 2 log ‖v_i^h‖)
        self.log_norm2 = torch.logsumexp(self.a.square().sum(-1) + 2 * self.log_vnorm, dim=1)  # [B, N]

    def __call__(self, chosen: Tensor) -> Tensor:                           # chosen [B, c]
        def pick(x: Tensor) -> Tensor:                                      # [B, H, N, ...] -> [B, H, c, ...]
            idx = chosen[:, None, :]
            if x.dim() == 4:
                return x.gather(2, idx[..., None].expand(x.shape[0], x.shape[1], -1, x.shape[-1]))
            return x.gather(2, idx.expand(x.shape[0], x.shape[1], -1))
        cross = self.a @ pick(self.a).transpose(-1, -2)                     # [B, Hkv, N, c]
        vcos = self.v_unit @ pick(self.v_unit).transpose(-1, -2)
        log_norm_c = self.log_norm2.gather(1, chosen)                       # [B, c]
        expo = (cross + self.log_vnorm[..., None] + pick(self.log_vnorm)[:, :, None, :]
                - 0.5 * self.log_norm2[:, None, :, None] - 0.5 * log_norm_c[:, None, None, :])
        return (vcos * expo.exp()).sum(dim=1)                               # [B, N, c]


class IWP:
    name = "iwp"
    Config = IWPConfig

    def __init__(self, config: IWPConfig = IWPConfig()):
        self.config = config

    def plan(self, n_layers: int, n_visual: int, budget: int) -> Plan:
        return single_stage(self.config.layer, n_layers, n_visual, budget)

    def select(self, view: LayerView, keep: int) -> Tensor:
        c = self.config
        mag = magnitude(view, c.queries)
        similarity = UpdateCosine(view) if c.lam < 1.0 else None
        return pcmmr(mag, similarity, keep, c.lam, c.chunk, c.growth)
