"""The baselines: FastV, DART, DivPrune and random. Each is a single-stage method behind the common interface.

- FastV: attention of the last token to each visual token (with RoPE, mean over heads), top-K.
- DART: pivots are the visual tokens with the largest key norms; the rest of the budget goes to the tokens
  least similar (cosine of hidden states) to any pivot.
- DivPrune: max–min diversity (farthest-point greedy on cosine distance of the hidden states), seeded by
  the token farthest from the mean.
- random: a fixed integer hash of (index, seed), so every backend picks the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pcmmr import pcmmr, rankable, top_k_sorted
from .stages import SingleStage
from .view import LayerView, cosine_to, visual_attention


def _check_layer(name: str, layer: int) -> None:
    if layer < 0:
        raise ValueError(f"{name} layer must be >= 0, got {layer}")


@dataclass(frozen=True)
class FastVConfig:
    layer: int = 2

    def __post_init__(self):
        _check_layer("fastv", self.layer)


class FastV(SingleStage):
    name = "fastv"
    Config = FastVConfig

    def select(self, view: LayerView, keep: int) -> Tensor:
        return top_k_sorted(visual_attention(view, "last", rope=True), keep)


@dataclass(frozen=True)
class DARTConfig:
    layer: int = 2
    pivots: int = 8

    def __post_init__(self):
        _check_layer("dart", self.layer)
        if self.pivots < 1:
            raise ValueError(f"dart pivots must be >= 1, got {self.pivots}")


class DART(SingleStage):
    name = "dart"
    Config = DARTConfig

    def select(self, view: LayerView, keep: int) -> Tensor:
        n_pivots = min(self.config.pivots, keep)
        key_norm = view.visual(view.k).float().norm(dim=-1).mean(dim=1)        # [B, N]
        pivots = top_k_sorted(key_norm, n_pivots)                              # [B, p]
        hidden = view.visual(view.hidden)
        # least duplicated first; a NaN similarity ranks last (rankable after the sign flip)
        score = rankable(-cosine_to(hidden, pivots).amax(dim=-1))              # [B, N]
        score = score.scatter(1, pivots, float("inf"))                         # pivots always stay
        return top_k_sorted(score, keep)


@dataclass(frozen=True)
class DivPruneConfig:
    layer: int = 0

    def __post_init__(self):
        _check_layer("divprune", self.layer)


class DivPrune(SingleStage):
    name = "divprune"
    Config = DivPruneConfig

    def select(self, view: LayerView, keep: int) -> Tensor:
        hidden = view.visual(view.hidden).float()                              # [B, N, D]
        mean = hidden.mean(dim=1, keepdim=True)
        atypical = 1 - torch.nn.functional.cosine_similarity(hidden, mean, dim=-1)  # seeds the spread
        return pcmmr(atypical, lambda chosen: cosine_to(hidden, chosen), keep, lam=0.0)


@dataclass(frozen=True)
class RandomConfig:
    layer: int = 2
    seed: int = 0

    def __post_init__(self):
        _check_layer("random", self.layer)
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"random seed must be in [0, 2^31), got {self.seed}")


def hash_scores(n: int, seed: int, device=None) -> Tensor:
    """[n] pseudo-random int64 scores from an integer hash (same on every backend, no RNG state)."""
    x = torch.arange(n, dtype=torch.int64, device=device) + seed * 7919
    for _ in range(2):
        x = (x * 1103515245 + 12345) % 2**31
        x = x ^ (x // 65536)
    return x


class Random(SingleStage):
    name = "random"
    Config = RandomConfig

    def select(self, view: LayerView, keep: int) -> Tensor:
        score = (hash_scores(view.n_visual, self.config.seed, view.hidden.device) % 2**24).float()  # exact in fp32
        return top_k_sorted(score.expand(view.hidden.shape[0], -1), keep)
