"""`iwp bench-prefill`: vision and prefill time of engine directories; the first is the baseline."""
from __future__ import annotations

import gc
from pathlib import Path


def command(args) -> None:
    from iwp.demo import demo_image
    from iwp.flops import describe_counts
    from iwp.runtime.pipeline import Pipeline
    print("| engine | method | tokens per layer | vision ms | prefill ms | prefill vs first | FLOP-ideal |")
    print("|---|---|---|---|---|---|---|")
    first = None
    for directory in args.engine:
        pipeline = Pipeline.from_engine(directory)
        m = pipeline.manifest
        image = demo_image(0, tuple(m.model.resolution[::-1]))
        t = pipeline.time_stages(image, "What is in the image?", args.repeats)
        first = first or (t["prefill"], m.flops.pruned)
        print(f"| {Path(directory).name} | {m.method.name} | {describe_counts(m.method.tokens_per_layer)} "
              f"| {t['vision'] * 1e3:.0f} | {t['prefill'] * 1e3:.0f} | {first[0] / t['prefill']:.2f}x | "
              f"{first[1] / m.flops.pruned:.2f}x |", flush=True)
        del pipeline  # multi-GB sessions: free one engine before loading the next
        gc.collect()
