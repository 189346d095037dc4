"""`iwp calibrate`: choose BTP's stage layers and IWP's open choices on the OVQA calibration split (never the
test split), and write them into the model's defaults.

- BTP: the stage layers at equal quantiles of the cumulative change of the visual hidden states across
  adjacent layers (layer_similarity.py), measured on the calibration questions.
- IWP: a coordinate search over the query set, λ, the chunk schedule and the pruning layer, one choice at a
  time from the current defaults, each scored by calibration accuracy averaged over the small budgets (where
  the choice matters). λ, the schedule and the query set take the best score; ties keep the current value.
  The layer takes the *earliest* layer within `layer_tolerance` of the best, because every later layer adds
  a full-width layer of prefill FLOPs.

Every configuration tried is kept, so the sweep that chose the defaults is saved as a table beside them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from .evaluate import Item, predict, score
from iwp.plugins.visual_token_select import make_method

from .layer_similarity import adjacent_layer_change, choose_stage_layers

LAMBDAS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
SCHEDULES = ((1, 1.0), (2, 1.5), (4, 1.5), (8, 1.5), (16, 1.0))
QUERIES = ("instruction", "last")


@torch.no_grad()
def btp_layers(loaded, model, items: Sequence[Item], n_stages: int, batch_size: int = 16) -> tuple[list[float], tuple]:
    """Mean adjacent-layer change of the visual hidden states over the items, and the stage layers it gives."""
    from iwp.inputs import make_batch
    total, count = None, 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = make_batch(loaded, [it.load() for it in chunk], [it.question for it in chunk])
        change = adjacent_layer_change(model, model.embed(batch), batch) * len(chunk)
        total = change if total is None else total + change
        count += len(chunk)
    change = total / count
    return change.tolist(), choose_stage_layers(change, n_stages)


def iwp_search(loaded, model, items: Sequence[Item], budgets: Sequence[int], layers: Sequence[int],
               layer_tolerance: float = 0.01, batch_size: int = 16,
               progress: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """The chosen IWP options and every configuration tried (options, accuracy per budget, mean)."""
    n = loaded.n_visual
    tried: dict[tuple, dict] = {}

    def evaluate(config) -> float:
        key = tuple(sorted(dataclasses.asdict(config).items()))
        if key not in tried:
            method = make_method("iwp", **dataclasses.asdict(config))
            plans = [method.plan(model.n_layers, n, b) for b in budgets]
            preds = predict(loaded, items, [(method, p) for p in plans], batch_size, model=model)
            accuracy = [sum(score(p, it.answers) for p, it in zip(ps, items)) / len(items) for ps in preds]
            tried[key] = {"options": dataclasses.asdict(config), "accuracy": dict(zip(budgets, accuracy)),
                          "mean": sum(accuracy) / len(accuracy)}
            if progress:
                progress(f"iwp {_describe(config)}: mean calibration accuracy {tried[key]['mean']:.1%}")
        return tried[key]["mean"]

    config = make_method("iwp").config
    base = evaluate(config)
    for values, field in ((QUERIES, "queries"), (LAMBDAS, "lam"), (SCHEDULES, "schedule")):
        best, best_score = config, base
        for value in values:
            candidate = (dataclasses.replace(config, chunk=value[0], growth=value[1]) if field == "schedule"
                         else dataclasses.replace(config, **{field: value}))
            s = evaluate(candidate)
            if s > best_score:   # strictly better: a tie keeps the current value
                best, best_score = candidate, s
        config, base = best, best_score
    by_layer = {layer: evaluate(dataclasses.replace(config, layer=layer)) for layer in layers}
    config = dataclasses.replace(config, layer=choose_layer(by_layer, layer_tolerance))
    evaluate(config)
    return dataclasses.asdict(config), list(tried.values())


def choose_layer(accuracy_by_layer: dict[int, float], tolerance: float) -> int:
    """The earliest layer whose accuracy is within `tolerance` of the best (later layers cost more FLOPs)."""
    top = max(accuracy_by_layer.values())
    return min(layer for layer, accuracy in accuracy_by_layer.items() if accuracy >= top - tolerance)


def _describe(config) -> str:
    return f"layer={config.layer} lam={config.lam} chunk={config.chunk} growth={config.growth} queries={config.queries}"


def markdown(result: dict) -> str:
    lines = [f"# Calibration of {result['model']} at grid {result['grid']} (N={result['n_visual']}) on "
             f"{result['count']} OVQA calibration questions", ""]
    if "btp" in result:
        b = result["btp"]
        lines += ["## BTP stage layers", "", "| layer | 1 - cos(h_l, h_l+1), visual tokens |", "|---|---|"]
        lines += [f"| {layer} | {value:.4f} |" for layer, value in enumerate(b["change"])]
        lines += ["", f"Chosen stage layers ({len(b['layers'])} stages): {list(b['layers'])}", ""]
    if "iwp" in result:
        r = result["iwp"]
        budgets = r["budgets"]
        lines += ["## IWP options", "", f"Calibration accuracy at budgets {budgets}; the objective is their mean.", "",
                  "| layer | lam | chunk | growth | queries | " + " | ".join(f"K={b}" for b in budgets) + " | mean |",
                  "|---|---|---|---|---|" + "---|" * (len(budgets) + 1)]
        for t in r["tried"]:
            o = t["options"]
            chosen = " **chosen**" if o == r["chosen"] else ""
            lines.append(f"| {o['layer']} | {o['lam']} | {o['chunk']} | {o['growth']} | {o['queries']} | "
                         + " | ".join(f"{t['accuracy'][b]:.1%}" for b in budgets) + f" | {t['mean']:.1%}{chosen} |")
        lines += ["", f"Chosen: {r['chosen']}"]
    return "\n".join(lines) + "\n"


def calibrate(loaded, items: Sequence[Item], methods: Sequence[str] = ("btp", "iwp"), n_stages: int = 3,
              budgets: Sequence[int] = (), layers: Sequence[int] = (0, 1, 2, 3), batch_size: int = 16,
              progress: Callable[[str], None] | None = None) -> dict:
    from iwp.model import PrunedLlavaOnevision
    model = PrunedLlavaOnevision(loaded.model)
    result: dict = {"model": loaded.spec.name, "grid": loaded.spec.grid_name, "n_visual": loaded.n_visual,
                    "count": len(items), "defaults": {}}
    if "btp" in methods:
        change, stage_layers = btp_layers(loaded, model, items, n_stages, batch_size)
        result["btp"] = {"change": change, "layers": list(stage_layers)}
        result["defaults"]["btp"] = {"layers": list(stage_layers)}
    if "iwp" in methods:
        layers = [layer for layer in layers if layer < model.n_layers]
        chosen, tried = iwp_search(loaded, model, items, budgets, layers, batch_size=batch_size, progress=progress)
        result["iwp"] = {"budgets": list(budgets), "chosen": chosen, "tried": tried}
        result["defaults"]["iwp"] = chosen
    return result
