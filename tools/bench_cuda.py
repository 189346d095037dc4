"""VisualTokenSelect on the GPU, a benchmark (not a test): the CUDA kernels at LLaVA-OV-7B layer shapes.

IWP for N in {729, 1485, 7290} and K in {64, 128, 256}, then every method at N=1485, K=128. Each row is the
median of `repeats` timings with CUDA events after warm-up, and says whether the indices equal the fp32
reference (the CPU kernel, itself tested equal to the PyTorch reference). Targets (issue 4): IWP <= 30 us
at N=1485 and <= 100 us at N=7290, K=128, on an H100/H200.
"""
from __future__ import annotations

import statistics

import torch

from .bench_select import BUDGETS, SIZES, random_view
from iwp.plugins.visual_token_select import METHODS, cpu, make_method


def time_selector(selector, repeats: int, warmup: int = 5) -> float:
    """Median microseconds of one enqueue, timed with CUDA events."""
    for _ in range(warmup):
        selector.run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        selector.run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def row(method, view, keep: int, repeats: int, dtype=torch.float32) -> tuple[float, bool]:
    from iwp.plugins.visual_token_select.cuda import Selector
    selector = Selector(method, view, keep, dtype)
    micros = time_selector(selector, repeats)
    torch.cuda.synchronize()
    same = selector.out.cpu().tolist() == cpu.select(method, view, keep).tolist()
    return micros, same


def run(repeats: int = 50) -> None:
    if not torch.cuda.is_available():
        raise ValueError("bench-cuda needs an NVIDIA GPU and none is visible; run it on the GPU machine")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"median of {repeats} after warm-up, CUDA events")
    print("\n| method | N | K | fp32 inputs (us) | fp16 inputs (us) | indices = fp32 reference |")
    print("|---|---|---|---|---|---|")
    iwp = make_method("iwp")
    for n in SIZES:
        view = random_view(n)
        for k in BUDGETS:
            t32, same = row(iwp, view, k, repeats)
            t16, _ = row(iwp, view, k, repeats, torch.float16)
            print(f"| iwp | {n} | {k} | {t32:.1f} | {t16:.1f} | {'yes' if same else 'NO'} |", flush=True)
    view = random_view(1485)
    for name in sorted(set(METHODS) - {"iwp"}):
        t32, same = row(make_method(name), view, 128, repeats)
        t16, _ = row(make_method(name), view, 128, repeats, torch.float16)
        print(f"| {name} | 1485 | 128 | {t32:.1f} | {t16:.1f} | {'yes' if same else 'NO'} |", flush=True)


def command(args) -> None:
    """`iwp bench-cuda` from its parsed arguments."""
    run(args.repeats)
