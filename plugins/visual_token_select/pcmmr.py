"""Progressive Chunked Maximal Marginal Relevance (PCMMR) and the ranking rules every method shares.

Greedy MMR adds, one at a time, argmax over i not in S of  λ·m̂_i − (1−λ)·max_{j∈S} S_ij.
PCMMR adds the top-c_s candidates of that score at step s, with c_s from a schedule that grows as S
grows, so there are about K/c sequential steps instead of K. The similarity is asked for only against
the newly chosen columns, so memory is O(N·K) and the N×N matrix is never built.

Ranking rules (the same in the reference, the CPU kernel and the CUDA kernel):
- ties go to the lower index;
- a NaN score ranks below every finite score, so NaN activations never crash a selection and the
  output is still K unique sorted indices; a NaN similarity counts as 0 (no evidence of duplication).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LOWEST = torch.finfo(torch.float32).min


def rankable(score: Tensor) -> Tensor:
    """NaN (and -inf) scores become the lowest finite float, so they lose to every real score."""
    return torch.nan_to_num(score.float(), nan=LOWEST, posinf=torch.finfo(torch.float32).max, neginf=LOWEST)


def top_indices(score: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores per row [B, k], ties to the lower index, in rank order."""
    if k == 1:
        return score.argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]


def top_k_sorted(score: Tensor, k: int) -> Tensor:
    """The selection output of a plain top-K method: [B, k] indices, ascending."""
    return top_indices(rankable(score), k).sort(dim=-1).values


def chunk_schedule(k: int, chunk: int, growth: float) -> list[int]:
    """Chunk sizes c_0, c_1, ... summing to k: c_s = round(chunk·growth^s), the last one truncated."""
    if chunk < 1 or growth < 1.0:
        raise ValueError(f"chunk must be >= 1 and growth >= 1.0, got chunk={chunk}, growth={growth}")
    sizes, step = [], 0
    while sum(sizes) < k:
        sizes.append(min(k - sum(sizes), max(1, round(chunk * growth**step))))
        step += 1
    return sizes


def normalize_magnitude(m: Tensor) -> Tensor:
    """m̂ = m / max(m) per row, so λ trades two quantities of the same [0, 1] scale."""
    m = rankable(m)
    return m / m.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def pcmmr(magnitude: Tensor, similarity: Callable[[Tensor], Tensor], k: int, lam: float,
          chunk: int = 1, growth: float = 1.0, seed: Tensor | None = None) -> Tensor:
    """Select k of N candidates: [B, N] magnitudes -> [B, k] indices, ascending.

    similarity(chosen [B, c]) returns S[:, :, chosen] as [B, N, c].
    The first chunk is the top by magnitude (what MMR picks when S is empty); `seed` [B, s], if given,
    is taken as that first chunk instead. chunk=1, growth=1 is exact greedy MMR; lam=1 is top-k.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    b, n = magnitude.shape
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    mag = normalize_magnitude(magnitude)
    if lam == 1.0 and seed is None:  # pure magnitude: the schedule cannot change the set
        return top_k_sorted(mag, k)
    taken = torch.zeros(b, n, dtype=torch.bool, device=mag.device)
    chosen: list[Tensor] = []
    max_sim: Tensor | None = None
    sizes = chunk_schedule(k - (seed.shape[1] if seed is not None else 0), chunk, growth)
    if seed is not None:
        sizes = [seed.shape[1]] + sizes
    for step, c in enumerate(sizes):
        if step == 0:
            new = seed if seed is not None else top_indices(mag, c)
        else:
            score = rankable(lam * mag - (1.0 - lam) * max_sim)
            score = score.masked_fill(taken, float("-inf"))  # below LOWEST: taken never beats a candidate
            new = top_indices(score, c)
        taken.scatter_(1, new, True)
        chosen.append(new)
        if step + 1 < len(sizes):
            sim = torch.nan_to_num(similarity(new).float(), nan=0.0).amax(dim=-1)  # [B, N]
            max_sim = sim if max_sim is None else torch.maximum(max_sim, sim)
    return torch.cat(chosen, dim=1).sort(dim=-1).values
