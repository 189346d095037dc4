"""Progressive Chunked Maximal Marginal Relevance (PCMMR) and the ranking rules every method shares.

Greedy MMR adds, one at a time, argmax over i not in S of  λ·m̂_i − (1−λ)·max_{j∈S} S_ij.
PCMMR adds the top-c_s candidates of that score at step s, with c_s from a schedule that grows as S
grows, so there are about K/c sequential steps instead of K. The similarity is asked for only against
the newly chosen columns, so memory is O(N·K) and the N×N matrix is never built.

Ranking rules (the same in the reference, the CPU kernel and the CUDA kernel):
- ties go to the lower index;
- a NaN score ranks below every finite score, so NaN activations never crash a selection and the
  output is still K unique sorted indices; a NaN similarity counts as 0 (no evidence of duplication);
- an infinite score or magnitude ranks as a finite one: +inf as the largest finite float, -inf with NaN,
  last, at every λ (so a +inf magnitude normalizes to m̂ = 1 and the greedy still weighs it).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LOWEST = torch.finfo(torch.float32).min
HIGHEST = torch.finfo(torch.float32).max


def rankable(score: Tensor) -> Tensor:
    """NaN (and -inf) scores become the lowest finite float, so they lose to every real score."""
    return torch.nan_to_num(score.float(), nan=LOWEST, posinf=HIGHEST, neginf=LOWEST)


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
    """m̂ = m / max(m) per row over the finite entries (non-finite ones become 0; callers rank them last)."""
    m = torch.where(torch.isfinite(m), m.float(), torch.zeros((), device=m.device))
    return m / m.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def pcmmr(magnitude: Tensor, similarity: Callable[[Tensor], Tensor], k: int, lam: float,
          chunk: int = 1, growth: float = 1.0, seed: Tensor | None = None) -> Tensor:
    """Select k of N candidates: [B, N] magnitudes -> [B, k] indices, ascending.

    similarity(columns [B, c]) returns S[:, :, columns] as [B, N, c].
    Step s takes the 2·c_s best candidates by the MMR score against the set so far, then adds c_s of them by
    exact greedy MMR among themselves, so two near-duplicates that score alike cannot enter in one chunk.
    With an empty set the score is the magnitude. `seed` [B, s], if given, is taken as the first chunk.
    chunk=1, growth=1 is exact greedy MMR; lam=1 is top-k by magnitude.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    b, n = magnitude.shape
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if lam == 1.0 and seed is None:  # pure magnitude: the schedule cannot change the set
        return top_k_sorted(magnitude, k)
    magnitude = magnitude.float().masked_fill(magnitude == float("inf"), HIGHEST)   # +inf: the largest float
    finite = torch.isfinite(magnitude)                                                # NaN, -inf: ranked last
    mag = normalize_magnitude(magnitude)

    def mmr(m: Tensor, max_sim: Tensor | None, ok: Tensor, excluded: Tensor) -> Tensor:
        score = m if max_sim is None else lam * m - (1.0 - lam) * max_sim
        score = torch.where(ok, rankable(score), torch.full_like(score, LOWEST))  # NaN tokens rank last
        return score.masked_fill(excluded, float("-inf"))  # below LOWEST: never beats a candidate

    taken = torch.zeros(b, n, dtype=torch.bool, device=mag.device)
    chosen: list[Tensor] = []
    max_sim: Tensor | None = None
    sizes = chunk_schedule(k - (seed.shape[1] if seed is not None else 0), chunk, growth)
    if seed is not None:
        sizes = [seed.shape[1]] + sizes
    for step, c in enumerate(sizes):
        if step == 0 and seed is not None:
            new = seed
            sim_new = similarity(new)
        else:
            pool = min(2 * c, n - sum(sizes[:step]))
            # candidates in ascending index order, so argmax ties below go to the lower index
            cand = top_indices(mmr(mag, max_sim, finite, taken), pool).sort(dim=-1).values   # [B, P]
            sim_cand = torch.nan_to_num(similarity(cand).float(), nan=0.0)                   # [B, N, P]
            intra = sim_cand.gather(1, cand[:, :, None].expand(-1, -1, pool))                # [B, P, P]
            cand_mag, cand_ok = mag.gather(1, cand), finite.gather(1, cand)
            inner = max_sim.gather(1, cand) if max_sim is not None else None
            picked = torch.zeros(b, pool, dtype=torch.bool, device=mag.device)
            picks = []
            for _ in range(c):
                p = mmr(cand_mag, inner, cand_ok, picked).argmax(dim=-1, keepdim=True)       # [B, 1]
                picked.scatter_(1, p, True)
                picks.append(p)
                col = intra.gather(2, p[:, None, :].expand(-1, pool, 1)).squeeze(-1)         # [B, P]
                inner = col if inner is None else torch.maximum(inner, col)
            where = torch.cat(picks, dim=1)                                                  # [B, c]
            new = cand.gather(1, where)
            sim_new = sim_cand.gather(2, where[:, None, :].expand(-1, n, -1))                # [B, N, c]
        taken.scatter_(1, new, True)
        chosen.append(new)
        sim = torch.nan_to_num(sim_new.float(), nan=0.0).amax(dim=-1)                        # [B, N]
        max_sim = sim if max_sim is None else torch.maximum(max_sim, sim)
    return torch.cat(chosen, dim=1).sort(dim=-1).values
