"""BTP, Balanced Token Pruning: several stages, each balancing attention against diversity.

Per stage s (layers ascending):
- attention: the instruction tokens' attention to each visual token (with RoPE, mean over heads and
  queries), rebalanced against positional bias: the linear trend of log-attention along the token order
  (RoPE's long-range decay favours late tokens) is fitted by least squares and removed;
- diversity: the cosine of the visual hidden states;
- seeding: the first round(seed_fraction·k_s) tokens are a max–min spread over the patch grid, so every
  region of the image keeps a token;
- the mix λ_s (attention weight) rises linearly from attention_first to attention_last: diversity early,
  attention late. The greedy is PCMMR with that λ.
BUDGET is the average number of visual tokens per layer. The stage layers come from calibration
(calibration/layer_similarity.py) and are stored with each model's defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pcmmr import pcmmr, rankable
from .stages import MultiStage
from .view import LayerView, cosine_to, visual_attention

_DEFAULT_FRACTIONS = (0.125, 0.375, 0.625)  # of the decoder depth, used until calibration chooses layers


@dataclass(frozen=True)
class BTPConfig:
    layers: tuple[int, ...] | None = None  # stage layers; None = the model's depth × _DEFAULT_FRACTIONS
    attention_first: float = 0.3
    attention_last: float = 0.9
    seed_fraction: float = 0.1
    rebalance: bool = True
    chunk: int = 4
    growth: float = 1.5

    def __post_init__(self):
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"btp layers must be a non-empty tuple of layers >= 0, got {self.layers}")
        for name in ("attention_first", "attention_last", "seed_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"btp {name} must be in [0, 1], got {getattr(self, name)}")


def rebalanced_attention(attn: Tensor) -> Tensor:
    """[B, N] attention with its linear log-trend along the token order removed, renormalized to sum 1."""
    n = attn.shape[-1]
    if n <= 2:  # a line through every point: nothing is left but a uniform distribution (exactly)
        return torch.full_like(attn.float(), 1.0 / n)
    log_a = attn.float().clamp(min=1e-30).log()
    t = torch.linspace(-1.0, 1.0, n, device=attn.device)  # centred, so the slope is cov(t, log a)/var(t)
    slope = (log_a * t).sum(-1, keepdim=True) / t.square().sum()
    return torch.softmax(log_a - slope * t, dim=-1)


def spatial_spread(xy: Tensor, start: Tensor, count: int) -> Tensor:
    """Farthest-point spread of `count` tokens on the patch grid [B, N, 2], starting from `start` [B, N] top."""
    def neg_distance(chosen: Tensor) -> Tensor:  # larger = closer = more redundant
        # Minus the *squared* distance: with lam=0 only its order matters, and it is the distance's order.
        # Without the sqrt (whose float32 rounding differs between libraries) grid ties are exact everywhere.
        picked = xy.gather(1, chosen[:, :, None].expand(-1, -1, 2))
        return -(xy[:, :, None, :] - picked[:, None, :, :]).square().sum(-1)   # 2-D; exports everywhere
    return pcmmr(start, neg_distance, count, lam=0.0)


class BTP(MultiStage):
    name = "btp"
    Config = BTPConfig

    default_fractions = _DEFAULT_FRACTIONS

    def attention_weight(self, stage: int, n_stages: int) -> float:
        c = self.config
        if n_stages == 1:
            return c.attention_last
        return c.attention_first + (c.attention_last - c.attention_first) * stage / (n_stages - 1)

    def select(self, view: LayerView, keep: int) -> Tensor:
        c = self.config
        attn = visual_attention(view, "instruction", rope=True)
        if c.rebalance:
            attn = rebalanced_attention(attn)
        attn = rankable(attn)
        n_seed = min(keep, max(1, round(c.seed_fraction * keep)))
        seed = spatial_spread(view.visual_xy.float(), attn, n_seed)
        if n_seed == keep:
            return seed
        hidden = view.visual(view.hidden)
        lam = self.attention_weight(view.stage, view.n_stages)
        return pcmmr(attn, lambda chosen: cosine_to(hidden, chosen), keep, lam, c.chunk, c.growth, seed=seed)
