"""Where a method prunes and how many visual tokens each layer keeps.

A Plan is static: it is fixed when the engine is built, so shapes are static and no layer waits on the host.
Single-stage methods keep BUDGET tokens from their layer on. Multi-stage methods (BTP, TransPrune) read
BUDGET as the average number of visual tokens per layer, as the BTP paper reports it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    stages: tuple[tuple[int, int], ...]   # (layer, visual tokens kept from that layer on), layers ascending
    tokens_per_layer: tuple[int, ...]     # visual tokens each decoder layer attends over

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer)


def _tokens_per_layer(stages, n_layers: int, n_visual: int) -> tuple[int, ...]:
    counts, current, pending = [], n_visual, dict(stages)
    for layer in range(n_layers):
        current = pending.get(layer, current)
        counts.append(current)
    return tuple(counts)


def make_plan(stages: list[tuple[int, int]], n_layers: int, n_visual: int) -> Plan:
    layers = [layer for layer, _ in stages]
    if layers != sorted(set(layers)):
        raise ValueError(f"stage layers must be strictly increasing, got {layers}")
    for layer, keep in stages:
        if not 0 <= layer < n_layers:
            raise ValueError(f"stage layer {layer} is outside the model's 0..{n_layers - 1}; choose a smaller layer")
    keeps = [keep for _, keep in stages]
    if keeps != sorted(keeps, reverse=True) or not all(1 <= k <= n_visual for k in keeps):
        raise ValueError(f"stage keeps must be non-increasing within 1..{n_visual}, got {keeps}")
    stages = tuple((layer, keep) for layer, keep in stages)
    return Plan(stages, _tokens_per_layer(stages, n_layers, n_visual))


def check_budget(budget, n_visual: int) -> None:
    """The one check of BUDGET every plan runs: a whole number of tokens within 1..N."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive integer number of visual tokens, got {budget!r}")
    if budget > n_visual:
        raise ValueError(f"budget {budget} is above the {n_visual} visual tokens this model and grid produce; "
                         f"choose BUDGET between 1 and {n_visual}")


def single_stage(layer: int, n_layers: int, n_visual: int, budget: int) -> Plan:
    check_budget(budget, n_visual)
    return make_plan([(layer, budget)], n_layers, n_visual)


def average_budget_plan(layers: tuple[int, ...], n_layers: int, n_visual: int, budget: int) -> Plan:
    """Keeps shrink geometrically, k_s = N·r^(s+1), with r chosen so the mean over layers is about BUDGET."""
    check_budget(budget, n_visual)
    layers = tuple(sorted(layers))
    full_layers = layers[0]
    floor = (full_layers * n_visual + (n_layers - full_layers)) / n_layers
    if budget < floor:
        raise ValueError(
            f"budget {budget} is below the {floor:.1f} visual tokens per layer that layers 0..{full_layers - 1} "
            f"already cost at N={n_visual}; raise BUDGET or move the first stage earlier")

    def keeps(r: float) -> list[int]:
        return [max(1, min(n_visual, round(n_visual * r ** (s + 1)))) for s in range(len(layers))]

    def mean(r: float) -> float:
        return make_plan(list(zip(layers, keeps(r))), n_layers, n_visual).mean_tokens

    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection on a monotone function of r
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < budget else (lo, mid)
    best = min((lo, hi), key=lambda r: abs(mean(r) - budget))
    return make_plan(list(zip(layers, keeps(best))), n_layers, n_visual)


class SingleStage:
    """Base of the methods that prune once, at `config.layer`, keeping BUDGET tokens from there on."""
    Config: type

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def plan(self, n_layers: int, n_visual: int, budget: int) -> Plan:
        return single_stage(self.config.layer, n_layers, n_visual, budget)


class MultiStage:
    """Base of the methods that prune at several layers (`config.layers`, else `default_fractions` of the
    depth) and read BUDGET as the average visual tokens per layer."""
    Config: type
    default_fractions: tuple[float, ...]

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def stage_layers(self, n_layers: int) -> tuple[int, ...]:
        if self.config.layers is not None:
            return tuple(self.config.layers)
        return tuple(sorted({max(1, round(f * n_layers)) for f in self.default_fractions}))

    def plan(self, n_layers: int, n_visual: int, budget: int) -> Plan:
        return average_budget_plan(self.stage_layers(n_layers), n_layers, n_visual, budget)
