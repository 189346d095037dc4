"""Resident memory of one generation on an engine, stage by stage and graph by graph (issue 15): where the
ONNX Runtime process's peak comes from.

    .venv/bin/python benchmarks/generation_memory.py ENGINE [--new-tokens 4]

Prints the resident set (VmRSS) and the process's peak so far (ru_maxrss) after: loading the pipeline (every
session), prepare, each graph run of the prefill (through the pipeline's observer), and the decode. A graph
whose run raises the peak above the resident set before and after it holds that much transiently.
Figures are GB of 1e9 bytes (ru_maxrss's KiB * 1024).
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path


def resident_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class Marks:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, what: str) -> None:
        print(f"{what:<12} resident {resident_gb():6.2f} GB   peak {peak_gb():6.2f} GB   "
              f"{time.perf_counter() - self.start:7.1f} s", flush=True)

    def on_graph(self, name: str, feeds: dict, outputs: dict, seconds: float) -> None:
        self(f"  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--prompt", default="What colour is the large shape?")
    args = parser.parse_args()
    from iwp.demo import demo_image
    from iwp.runtime.pipeline import Pipeline
    mark = Marks()
    mark("start")
    pipeline = Pipeline.from_engine(args.engine)
    mark("loaded")
    batch = pipeline.prepare(demo_image(), args.prompt)
    mark("prepared")
    pipeline.observe(mark)
    prefill = pipeline.prefill(batch)
    mark("prefilled")
    pipeline.observe(None)
    ids = pipeline.decode(prefill, args.new_tokens, stop_tokens=[])
    mark(f"decoded {len(ids)}")


if __name__ == "__main__":
    main()
