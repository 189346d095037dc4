"""Paired accuracy differences between two `iwp eval` reports on the same questions, row by row.

    python benchmarks/paired_evals.py A/eval.json B/eval.json [--method iwp] [--label-a λ=0.3 --label-b λ=0]

For every (method, budget) the two reports both ran, prints A − B in accuracy points with its 95% interval
(the normal approximation of the per-question differences, as `iwp eval` pairs methods) and whether the
interval excludes 0. Use it for a method against itself under other options, e.g. IWP's duplication term
(`--option iwp.lam=0` in one run, the calibrated λ in the other).
"""
from __future__ import annotations

import argparse
import json

from iwp.calibration.evaluate import paired_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--method", default=None, help="only this method's rows")
    parser.add_argument("--label-a", default="A")
    parser.add_argument("--label-b", default="B")
    args = parser.parse_args()
    reports = [json.load(open(path)) for path in (args.a, args.b)]
    if reports[0]["count"] != reports[1]["count"] or reports[0]["items"] != reports[1]["items"]:
        raise SystemExit("the two reports did not answer the same questions; rerun with the same --split/--examples")
    rows = [{(r["method"], r["budget"]): r for r in report["rows"] if not r["note"]} for report in reports]
    print(f"| method | budget | {args.label_a} | {args.label_b} | {args.label_a} − {args.label_b} (points, 95% CI) |")
    print("|---|---|---|---|---|")
    for key in sorted(set(rows[0]) & set(rows[1]), key=lambda k: (k[0] != "none", k[0], k[1])):
        if args.method and key[0] != args.method:
            continue
        a, b = rows[0][key], rows[1][key]
        d = paired_difference(a["scores"], b["scores"])
        text = f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        print(f"| {key[0]} | {key[1]} | {a['accuracy']:.1%} | {b['accuracy']:.1%} | "
              f"{'**' + text + '**' if d['significant'] else text} |")


if __name__ == "__main__":
    main()
