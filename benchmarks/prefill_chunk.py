"""The prefill's time with each segment run over the whole prompt against runs in chunks (issue 15), in one
process on one engine, the settings interleaved round by round so that both see the same machine.

    .venv/bin/python benchmarks/prefill_chunk.py ENGINE [--chunks whole,512,256] [--rounds 3]

Prints, per setting, the prefill's seconds (every segment and select run) and its decoder segments' share,
each round and the median. The kept indices and first token of every setting must equal the whole prompt's,
or it stops. Memory is generation_memory.py's (ru_maxrss only rises, so it needs a process per setting).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


class SegmentSeconds:
    def __init__(self, segments: set[str]):
        self.segments, self.seconds = segments, 0.0

    def on_graph(self, name, feeds, outputs, seconds) -> None:
        self.seconds += seconds if name in self.segments else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--chunks", default="whole,512", help="comma-separated: 'whole' or a token count")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", default="What colour is the large shape?")
    args = parser.parse_args()
    settings = [None if c == "whole" else int(c) for c in args.chunks.split(",")]
    import numpy as np

    from iwp.demo import demo_image
    from iwp.runtime.pipeline import Pipeline
    pipeline = Pipeline.from_engine(args.engine)
    batch = pipeline.prepare(demo_image(), args.prompt)
    print(f"{args.engine.name}: prompt of {batch.input_ids.shape[1]} tokens", flush=True)
    segments = {g.name for g in pipeline.manifest.segments()}
    times = {c: [] for c in settings}
    reference = None
    for round_ in range(args.rounds):
        for chunk in settings:
            pipeline.prefill_chunk = chunk
            observer = SegmentSeconds(segments)
            pipeline.observe(observer)
            start = time.perf_counter()
            pre = pipeline.prefill(batch)
            seconds = time.perf_counter() - start
            pipeline.observe(None)
            result = ([k.tolist() for k in pre.kept], int(np.argmax(pre.logits)))
            reference = reference or result
            if result != reference:
                raise SystemExit(f"chunk {chunk}: kept indices or first token differ from the first setting's")
            times[chunk].append((seconds, observer.seconds))
            print(f"round {round_}  chunk {chunk or 'whole':>5}  prefill {seconds:7.3f} s  "
                  f"segments {observer.seconds:7.3f} s", flush=True)
    base = statistics.median(s for s, _ in times[settings[0]])
    for chunk in settings:
        median = statistics.median(s for s, _ in times[chunk])
        segs = statistics.median(s for _, s in times[chunk])
        print(f"median  chunk {chunk or 'whole':>5}  prefill {median:7.3f} s  segments {segs:7.3f} s  "
              f"{median / base:.3f}x the {settings[0] or 'whole'} setting", flush=True)


if __name__ == "__main__":
    main()
