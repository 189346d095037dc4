"""Ablation of IWP's open choices, one at a time around the defaults: λ, the chunk schedule, the pruning
layer and the query set. This is how the defaults in IWPConfig were chosen (see README, "IWP defaults").

Columns: layer-L attention reconstruction error and next-token KL (as in tools/compare.py), the overlap
(Jaccard) of the kept set with exact greedy MMR at the same λ, the number of sequential steps, and the
median selection time.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .compare import layer_attention_error
from iwp.inputs import Batch
from iwp.model import PrunedLlavaOnevision, inline
from iwp.plugins.visual_token_select.iwp_method import IWP, IWPConfig
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
    hidden = model.hidden_states(embeds, batch)
    lines = ["| variant | recon error @ own layer | KL next-token | Jaccard vs greedy c=1 | steps | select ms |",
             "|---|---|---|---|---|---|"]
    for name, config in variants(base):
        method = Recording(config)
        plan = method.plan(model.n_layers, batch.n_visual, budget)
        # inline calls method.select itself (the op would rebuild the method from its attributes)
        pre = model.prefill(embeds, batch, method, plan, select=inline)
        greedy = model.prefill(embeds, batch, IWP(dataclasses.replace(config, chunk=1, growth=1.0)), plan)
        log_p = torch.log_softmax(pre.logits[:, -1].float(), dim=-1)
        kl = float(torch.nn.functional.kl_div(log_p, log_p_full, log_target=True, reduction="batchmean"))
        recon = layer_attention_error(model, hidden, batch, config.layer, pre.kept[0])
        steps = 1 if config.lam == 1.0 else len(chunk_schedule(budget, config.chunk, config.growth))
        select_ms = method.median_select_ms()
        lines.append(f"| {name} | {recon:.4f} | {kl:.3e} | {_jaccard(pre.kept[0], greedy.kept[0]):.3f} | "
                     f"{steps} | {select_ms:.2f} |")
    return "\n".join(lines)


class Recording(IWP):
    """IWP that keeps the views it selects on, so select() alone can be timed after the prefill."""

    def __init__(self, config: IWPConfig):
        super().__init__(config)
        self.calls: list[tuple] = []

    def select(self, view, keep):
        self.calls.append((view, keep))
        return super().select(view, keep)

    def median_select_ms(self, repeats: int = 5) -> float:
        if not self.calls:
            raise RuntimeError("select() was never called; nothing to time")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for view, keep in self.calls:
                IWP.select(self, view, keep)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3


def command(args) -> None:
    """`iwp ablate`: the table above on seeded demo scenes."""
    from .options import demo_batch, load_model

    loaded, model = load_model(args)
    budget = args.budget or loaded.spec.budget
    batch = demo_batch(loaded, args)
    print(f"{loaded.spec.name}, grid {loaded.spec.grid_name}, N={batch.n_visual}, budget {budget}, "
          f"{args.images} demo images")
    print(ablate(model, batch, budget))
