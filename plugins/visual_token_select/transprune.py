"""TransPrune: token transition variation (TTV) plus instruction-guided attention (IGA), over several stages.

TTV of a sublayer f with input x (the residual stream) and output y = f(x) without the residual:
    ttv(f) = softmax over visual tokens of (1 − |cos(x, y)|) · ‖y‖/‖x‖
summed for attention and FFN and accumulated from layer ttv_start up to the stage layer (the pruned forward
does the accumulation; see iwp/model.py). IGA is the instruction tokens' attention to each visual token
computed with the stage layer's q and k, i.e. the layer after the accumulated ones.
score = α·TTV + (1−α)·IGA, each normalized to sum 1 over the visual tokens; top-K per stage.
BUDGET is the average number of visual tokens per layer, as for BTP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pcmmr import rankable, top_k_sorted
from .stages import MultiStage
from .view import LayerView, visual_attention

_DEFAULT_FRACTIONS = (0.125, 0.375)


@dataclass(frozen=True)
class TransPruneConfig:
    layers: tuple[int, ...] | None = None  # stage layers; None = the model's depth × _DEFAULT_FRACTIONS
    alpha: float = 0.5
    ttv_start: int = 0

    def __post_init__(self):
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"transprune layers must be a non-empty tuple of layers >= 0, got {self.layers}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"transprune alpha must be in [0, 1], got {self.alpha}")
        if self.ttv_start < 0:
            raise ValueError(f"transprune ttv_start must be >= 0, got {self.ttv_start}")


def transition_variation(x: Tensor, y: Tensor) -> Tensor:
    """[B, N, D] sublayer input and residual-free output -> [B, N] TTV, a softmax over the N tokens."""
    return torch.softmax(transition_logits(x, y), dim=-1)


def transition_logits(x: Tensor, y: Tensor) -> Tensor:
    """[B, T, D] x, y -> [B, T]: each token's transition before the softmax over the visual tokens (per token,
    so an engine's segment graph computes it for all its tokens and the selection takes the visual ones)."""
    x, y = x.float(), y.float()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    ratio = y.norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)
    return rankable((1 - cos.abs()) * ratio)


def _normalize(x: Tensor) -> Tensor:
    x = rankable(x).clamp(min=0)
    return x / x.sum(dim=-1, keepdim=True).clamp(min=1e-30)


class TransPrune(MultiStage):
    name = "transprune"
    Config = TransPruneConfig

    default_fractions = _DEFAULT_FRACTIONS

    @property
    def ttv_start(self) -> int:  # the pruned forward accumulates TTV from this layer on
        return self.config.ttv_start

    def select(self, view: LayerView, keep: int) -> Tensor:
        iga = _normalize(visual_attention(view, "instruction", rope=True))
        ttv = _normalize(view.ttv) if view.ttv is not None else torch.zeros_like(iga)
        a = self.config.alpha
        return top_k_sorted(a * ttv + (1 - a) * iga, keep)
