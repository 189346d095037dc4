"""IWP selection time on CPU, a benchmark (not a test): N in {729, 1485, 7290}, K in {64, 128, 256},
the default progressive chunked schedule against exact greedy (chunk=1).

Inputs are random with LLaVA-OV-7B layer shapes (28 query heads, 4 KV heads, head dim 128) and 32
instruction queries. Reports the median of `repeats` runs after one warm-up, in milliseconds.
"""
from __future__ import annotations

import statistics
import time

import torch

from iwp.plugins.visual_token_select.iwp_method import IWP, IWPConfig
from iwp.plugins.visual_token_select.view import LayerView

SIZES = (729, 1485, 7290)
BUDGETS = (64, 128, 256)
HQ, HKV, D, QUERIES, PREFIX = 28, 4, 128, 32, 14


def random_view(n: int, seed: int = 0) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    t = PREFIX + n + QUERIES
    def r(h):
        return torch.randn(1, h, t, D, generator=g)
    q, k, v = r(HQ), r(HKV), r(HKV)
    start = torch.tensor([PREFIX])
    query_idx = PREFIX + n + torch.arange(QUERIES)[None]
    return LayerView(torch.randn(1, t, HQ * D, generator=g), q, k, q, k, v, torch.ones(1, t, dtype=torch.bool),
                     start, n, query_idx, torch.ones(1, QUERIES, dtype=torch.bool), torch.tensor([t - 1]),
                     torch.rand(1, n, 2, generator=g), None, 2, 0, 1)


def time_select(method: IWP, view: LayerView, keep: int, repeats: int) -> float:
    method.select(view, keep)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        method.select(view, keep)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(repeats: int = 5) -> None:
    chunked, greedy = IWP(), IWP(IWPConfig(chunk=1, growth=1.0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default schedule chunk={chunked.config.chunk} "
          f"growth={chunked.config.growth}, lam={chunked.config.lam}")
    print("| N | K | PCMMR (ms) | greedy c=1 (ms) | speedup |\n|---|---|---|---|---|")
    for n in SIZES:
        view = random_view(n)
        for k in BUDGETS:
            fast, slow = time_select(chunked, view, k, repeats), time_select(greedy, view, k, repeats)
            print(f"| {n} | {k} | {fast:.1f} | {slow:.1f} | {slow / fast:.1f}x |", flush=True)


def command(args) -> None:
    """`iwp bench-select` from its parsed arguments."""
    run(args.repeats)
