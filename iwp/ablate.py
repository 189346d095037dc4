"""Ablation of IWP's open choices, one at a time around the defaults: λ, the chunk schedule, the pruning
layer and the query set. This is how the defaults in IWPConfig were chosen (see README, "IWP defaults").

Columns: layer-L attention reconstruction error and next-token KL (as in iwp/compare.py), the overlap
(Jaccard) of the kept set with exact greedy MMR at the same λ, the number of sequential steps, and the
median selection time.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .compare import layer_attention_error
from .inputs import Batch
from .model import PrunedLlavaOnevision
from iwp.plugins.visual_token_select.iwp import IWP, IWPConfig
from iwp.plugins.visual_token_select.pcmmr import chunk_schedule


def variants(base: IWPConfig) -> list[tuple[str, IWPConfig]]:
    out = [("default", base)]
    out += [(f"lam={lam}", dataclasses.replace(base, lam=lam)) for lam in (0.0, 0.3, 0.5, 0.9, 1.0)]
    out += [(f"chunk={c},growth={g}", dataclasses.replace(base, chunk=c, growth=g))
            for c, g in ((1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0), (1, 2.0), (2, 1.5), (8, 1.5), (16, 1.0))]
    out += [(f"layer={layer}", dataclasses.replace(base, layer=layer)) for layer in (0, 1, 3, 4)]
    out += [("queries=last", dataclasses.replace(base, queries="last"))]
    return [(name, cfg) for name, cfg in out if name == "default" or cfg != base]


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    scores = []
    for x, y in zip(a.tolist(), b.tolist()):
        x, y = set(x), set(y)
        scores.append(len(x & y) / len(x | y))
    return sum(scores) / len(scores)


@torch.no_grad()
def ablate(model: PrunedLlavaOnevision, batch: Batch, budget: int, base: IWPConfig = IWPConfig()) -> str:
    embeds = model.embed(batch)
    log_p_full = torch.log_softmax(model.prefill(embeds, batch).logits[:, -1].float(), dim=-1)
    lines = ["| variant | recon error @ own layer | KL next-token | Jaccard vs greedy c=1 | steps | select ms |",
             "|---|---|---|---|---|---|"]
    for name, config in variants(base):
        method = IWP(config)
        plan = method.plan(model.n_layers, batch.n_visual, budget)
        pre = model.prefill(embeds, batch, method, plan)
        greedy = model.prefill(embeds, batch, IWP(dataclasses.replace(config, chunk=1, growth=1.0)), plan)
        log_p = torch.log_softmax(pre.logits[:, -1].float(), dim=-1)
        kl = float(torch.nn.functional.kl_div(log_p, log_p_full, log_target=True, reduction="batchmean"))
        recon = layer_attention_error(model, embeds, batch, config.layer, pre.kept[0])
        steps = 1 if config.lam == 1.0 else len(chunk_schedule(budget, config.chunk, config.growth))
        select_ms = _time_select(model, embeds, batch, method, plan)
        lines.append(f"| {name} | {recon:.4f} | {kl:.3e} | {_jaccard(pre.kept[0], greedy.kept[0]):.3f} | "
                     f"{steps} | {select_ms:.2f} |")
    return "\n".join(lines)


def _time_select(model, embeds, batch, method, plan) -> float:
    """Median time of the method's select() alone, on the views it sees in the prefill."""
    views = []
    original = method.select

    def capture(view, keep):
        views.append((view, keep))
        return original(view, keep)
    method.select = capture
    model.prefill(embeds, batch, method, plan)
    method.select = original
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for view, keep in views:
            original(view, keep)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
