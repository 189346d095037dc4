"""This machine's memory bandwidth by a plain copy (STREAM's "copy": read + write bytes over time), the
bound decode runs against: each generated token reads every decoder weight once.

    python benchmarks/bandwidth.py [--gib 2] [--repeats 5]   -> one JSON line
"""
import argparse
import json
import time

import numpy as np


def copy_bandwidth(gib: float = 2.0, repeats: int = 5) -> dict:
    n = int(gib * 2 ** 30) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)                        # both touched once before timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"bytes_copied": src.nbytes, "best_s": best, "copy_gb_s": 2 * src.nbytes / best / 1e9,
            "read_gb_s": src.nbytes / best / 1e9, "repeats": repeats}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(copy_bandwidth(args.gib, args.repeats)))
