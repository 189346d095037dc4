"""IWP: attention as an implicit linear layer W = Σ_i φ(k_i)ᵀ v_i, pruned to the updates that best approximate W.

Magnitude of update i, per query head h and query q (keys without RoPE):
    m_i = η(q)·κ(q, k_i)·‖v_i‖,  κ(x, y) = exp(x·y/√d),  η(q) = 1/Σ_j κ(q, k_j)
i.e. attention probability × value norm, averaged over heads and the query set.

Duplication of updates i and j: the cosine of the block-diagonal rank-1 updates ΔW_i = ⊕_h φ(k_i^h)ᵀ v_i^h
(keys with RoPE), over the KV heads h:
    S_ij = Σ_h (v_i^h·v_j^h)·κ(k_i^h, k_j^h) / (‖ΔW_i‖·‖ΔW_j‖),  ‖ΔW_i‖² = Σ_h κ(k_i^h, k_i^h)·‖v_i^h‖²
computed in log space, because κ(k, k) overflows fp32 on real activations. With a = k/d^¼,
κ(k_i, k_j)/√(κ(k_i, k_i)·κ(k_j, k_j)) = exp(−½‖a_i − a_j‖²), so
    S_ij = Σ_h w_i^h w_j^h · cos(v_i^h, v_j^h) · exp(−½‖a_i^h − a_j^h‖²),
    w_i^h = √(κ(k_i^h, k_i^h)·‖v_i^h‖² / ‖ΔW_i‖²)   (a softmax over heads, square-rooted)
a head-weighted RBF kernel on the keys times the value cosine. Every exponent is ≤ 0 and S_ii = 1 exactly,
however large the keys.

Selection: PCMMR (pcmmr.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .pcmmr import chunk_schedule, pcmmr
from .view import LayerView, mean_over_queries, visual_log_attention
from .stages import SingleStage

_EPS = 1e-12
QUERIES = ("instruction", "last")  # the query sets; on the C side `queriesLast` is the position here


@dataclass(frozen=True)
class IWPConfig:
    layer: int = 2            # pruning layer L; layers before it see every token
    lam: float = 0.3          # λ: magnitude weight; 1 = top-K by magnitude
    chunk: int = 4            # first chunk size c_0
    growth: float = 1.5       # c_s = round(c_0·growth^s): the progressive schedule
    queries: str = "instruction"  # 'instruction' (tokens after the image) or 'last'

    def __post_init__(self):
        if self.layer < 0:
            raise ValueError(f"iwp layer must be >= 0, got {self.layer}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"iwp lam must be in [0, 1], got {self.lam}")
        chunk_schedule(1, self.chunk, self.growth)  # validates chunk and growth
        if self.queries not in QUERIES:
            raise ValueError(f"iwp queries must be one of {QUERIES}, got {self.queries!r}")


def magnitude(view: LayerView, queries: str) -> Tensor:
    """[B, N]: mean over heads and queries of attention probability (no RoPE) × value norm."""
    log_p, valid = visual_log_attention(view, view.q, view.k, queries)     # [B, Hq, Q, N]
    v = view.visual(view.v).float()                                         # [B, Hkv, N, d]
    log_vnorm = v.norm(dim=-1).clamp(min=_EPS).log()                        # [B, Hkv, N]
    log_vnorm = log_vnorm.repeat_interleave(log_p.shape[1] // v.shape[1], dim=1)
    return mean_over_queries((log_p + log_vnorm[:, :, None, :]).exp(), valid)


class UpdateCosine:
    """S[:, :, chosen] for the rank-1 updates of the visual tokens, O(N·c) memory per call.

    ‖a_i − a_j‖² is taken from a matmul on keys centred per head (distances are unchanged, and real keys
    share a large common component, so centring removes most of the cancellation), clamped at 0, and set
    to exactly 0 for i = j. Then S_ii = 1 and |S_ij| ≤ Σ_h w_i^h w_j^h ≤ 1 hold by construction.
    """

    def __init__(self, view: LayerView):
        k = view.visual(view.k_rot).float()                                 # [B, Hkv, N, d]
        v = view.visual(view.v).float()
        a = k / math.sqrt(math.sqrt(k.shape[-1]))                           # a_i·a_j = k_i·k_j/√d
        vnorm = v.norm(dim=-1, keepdim=True).clamp(min=_EPS)
        self.v_unit = v / vnorm
        log_self = a.square().sum(-1) + 2 * vnorm.squeeze(-1).log()         # log κ(k_i, k_i)·‖v_i‖², [B, Hkv, N]
        # log_softmax subtracts the max before anything else, so Σ_h w² = 1 even when log_self is ~1e4
        self.log_w = 0.5 * torch.log_softmax(log_self, dim=1)              # log w_i^h <= 0
        self.a = a - a.mean(dim=2, keepdim=True)
        self.sq = self.a.square().sum(-1)                                   # [B, Hkv, N]

    def __call__(self, chosen: Tensor) -> Tensor:                           # chosen [B, c]
        b, h, n, d = self.a.shape
        idx = chosen[:, None, :].expand(b, h, -1)
        a_c = self.a.gather(2, idx[..., None].expand(-1, -1, -1, d))
        v_c = self.v_unit.gather(2, idx[..., None].expand(-1, -1, -1, d))
        dist2 = self.sq[..., None] + self.sq.gather(2, idx)[:, :, None, :] - 2 * (self.a @ a_c.transpose(-1, -2))
        itself = torch.arange(n, device=chosen.device)[None, :, None] == chosen[:, None, :]   # [B, N, c]
        dist2 = dist2.clamp(min=0).masked_fill(itself[:, None], 0.0)
        expo = -0.5 * dist2 + self.log_w[..., None] + self.log_w.gather(2, idx)[:, :, None, :]
        return ((self.v_unit @ v_c.transpose(-1, -2)) * expo.exp()).sum(dim=1)   # [B, N, c]


class IWP(SingleStage):
    name = "iwp"
    Config = IWPConfig

    def select(self, view: LayerView, keep: int) -> Tensor:
        c = self.config
        mag = magnitude(view, c.queries)
        similarity = UpdateCosine(view) if c.lam < 1.0 else None
        return pcmmr(mag, similarity, keep, c.lam, c.chunk, c.growth)
