"""`iwp soak`: many generations in one process through the runtime core and the ONNX Runtime backend,
watching resident memory for growth (a benchmark; its result goes in BENCHMARKS.md).

The first `warmup` generations settle allocator pools; afterwards RSS is sampled every `every` generations
and the growth from the first sample to the last is reported.
"""
from __future__ import annotations

import time

from iwp.demo import demo_image
from iwp.runtime.pipeline import Pipeline, Sampler


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(engine, generations: int = 1000, new_tokens: int = 16, every: int = 100, warmup: int = 20,
        progress=print) -> dict:
    pipeline = Pipeline.from_engine(engine)
    images = [demo_image(i, tuple(pipeline.manifest.model.resolution[::-1])) for i in range(4)]
    samples, start = [], time.perf_counter()
    for i in range(warmup + generations):
        sampler = Sampler(0.8, 0.9, seed=i)
        pipeline.generate_ids(images[i % 4], f"Describe image {i}.", new_tokens, sampler)
        done = i + 1 - warmup
        if done >= 0 and done % every == 0:
            samples.append((done, rss_mb()))
            progress(f"{done:5d} generations  RSS {samples[-1][1]:.1f} MB")
    elapsed = time.perf_counter() - start
    growth = samples[-1][1] - samples[0][1]
    return {"generations": generations, "seconds": elapsed, "rss_mb": samples, "growth_mb": growth}


def command(args) -> None:
    """`iwp soak` from its parsed arguments."""
    result = run(args.engine, args.generations, args.new_tokens)
    print(f"{result['generations']} generations in {result['seconds']:.0f}s; RSS growth after warm-up "
          f"{result['growth_mb']:+.1f} MB")
