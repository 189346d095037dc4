"""What a selection method may read at the layer where it prunes, and the shared scoring helpers.

Shapes: B batch, T alive tokens, N alive visual tokens (one contiguous block per sample),
Q query tokens, Hq query heads, Hkv key/value heads, d head dim.
Every helper here is fp32, batched, and free of data-dependent Python control flow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerView:
    hidden: Tensor        # [B, T, D] residual stream entering the layer
    q: Tensor             # [B, Hq, T, d] queries, no RoPE
    k: Tensor             # [B, Hkv, T, d] keys, no RoPE
    q_rot: Tensor         # [B, Hq, T, d] queries with RoPE
    k_rot: Tensor         # [B, Hkv, T, d] keys with RoPE
    v: Tensor             # [B, Hkv, T, d]
    key_mask: Tensor      # [B, T] bool, False on padding
    visual_start: Tensor  # [B] long, first visual token in the alive sequence
    n_visual: int         # N, the same for every sample (fixed crop grid)
    query_idx: Tensor     # [B, Q] long, instruction-token positions in the alive sequence
    query_mask: Tensor    # [B, Q] bool, False where a sample has fewer than Q instruction tokens
    last_idx: Tensor      # [B] long, last valid token
    visual_xy: Tensor     # [B, N, 2] patch-grid coordinates in [0, 1] of each alive visual token
    ttv: Tensor | None    # [B, N] token transition variation accumulated so far (TransPrune), else None
    layer: int            # decoder layer being pruned
    stage: int            # index of this stage in the method's plan
    n_stages: int

    @property
    def visual_idx(self) -> Tensor:  # [B, N] positions of the visual tokens in the alive sequence
        return self.visual_start[:, None] + torch.arange(self.n_visual, device=self.visual_start.device)

    def visual(self, x: Tensor) -> Tensor:
        """Gather the visual tokens of a [B, H, T, d] or [B, T, D] tensor along its token axis."""
        idx = self.visual_idx
        if x.dim() == 4:
            return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
        return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))

    def queries(self, x: Tensor, which: str) -> tuple[Tensor, Tensor, Tensor]:
        """Query rows of a [B, H, T, d] tensor for the query set `which` ('instruction' or 'last').

        Returns (rows [B, H, Q, d], their positions [B, Q], validity [B, Q])."""
        if which == "last":
            pos, valid = self.last_idx[:, None], torch.ones_like(self.last_idx[:, None], dtype=torch.bool)
        elif which == "instruction":
            pos, valid = self.query_idx, self.query_mask
        else:
            raise ValueError(f"query set {which!r} is not one of 'instruction', 'last'")
        rows = x.gather(2, pos[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
        return rows, pos, valid


def repeat_kv(x: Tensor, n_query_heads: int) -> Tensor:
    """[B, Hkv, T, d] -> [B, Hq, T, d]: each query head reads its own KV head (GQA)."""
    return x.repeat_interleave(n_query_heads // x.shape[1], dim=1)


def visual_log_attention(view: LayerView, q: Tensor, k: Tensor, which: str) -> tuple[Tensor, Tensor]:
    """Log attention probabilities of the query set onto the visual tokens.

    The softmax runs over every key the query can see (causal and padding masks), so the result is the
    real attention probability, η(q)·κ(q, k_i) in IWP's notation.
    Returns (log_p [B, Hq, Q, N], query validity [B, Q])."""
    q = q.float()
    k = repeat_kv(k.float(), q.shape[1])
    rows, pos, valid = view.queries(q, which)
    logits = rows @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])          # [B, Hq, Q, T]
    key_pos = torch.arange(k.shape[2], device=k.device)
    visible = (key_pos[None, None, :] <= pos[:, :, None]) & view.key_mask[:, None, :]  # [B, Q, T]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    log_p = torch.log_softmax(logits, dim=-1)
    idx = view.visual_idx
    log_p = log_p.gather(3, idx[:, None, None, :].expand(-1, log_p.shape[1], log_p.shape[2], -1))
    return log_p, valid


def mean_over_queries(x: Tensor, valid: Tensor) -> Tensor:
    """[B, H, Q, N] -> [B, N]: mean over heads and over the valid queries."""
    w = valid.to(x.dtype)[:, None, :, None]
    return (x * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * x.shape[1]).clamp(min=1)


def visual_attention(view: LayerView, which: str, rope: bool = True) -> Tensor:
    """Mean attention probability [B, N] from the query set to each visual token."""
    q, k = (view.q_rot, view.k_rot) if rope else (view.q, view.k)
    log_p, valid = visual_log_attention(view, q, k, which)
    return mean_over_queries(log_p.exp(), valid)


def cosine_to(x: Tensor, chosen: Tensor) -> Tensor:
    """Cosine similarity of every row of x [B, N, D] to the rows `chosen` [B, c]: [B, N, c]."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    picked = xn.gather(1, chosen[:, :, None].expand(-1, -1, xn.shape[-1]))
    return xn @ picked.transpose(1, 2)
