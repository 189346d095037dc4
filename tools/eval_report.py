"""The `iwp eval` report: eval.json (everything, predictions included), eval.md (accuracy and retention per
method × budget, prefill FLOPs, the per-type breakdown, engine agreement) and eval.png (retention against the
fraction of visual tokens kept, and against the prefill FLOPs), written all-or-nothing."""
from __future__ import annotations

import json
from pathlib import Path

from iwp.atomic import staged_directory
from iwp.flops import describe_counts


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "—"
    if row["note"]:
        return "not run"
    return format(row[key], fmt)


def markdown(report: dict) -> str:
    rows, budgets, n = report["rows"], report["budgets"], report["n_visual"]
    none = next(r for r in rows if r["method"] == "none")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    at = {(r["method"], r["budget"]): r for r in rows}
    head = " | ".join(f"{b} ({b / n:.0%})" for b in budgets)
    rule = "|---|" + "---|" * len(budgets)
    low, high = none["interval"]
    lines = [f"# Accuracy: {report['model']} at grid {report['grid']} (N={n} visual tokens), "
             f"{report['count']} questions from {report['items']}, metric {report['metric']}", "",
             f"Unpruned accuracy **{none['accuracy']:.1%}** (95% CI {low:.1%}–{high:.1%}). Cells: accuracy (retention against unpruned). "
             f"BTP and TransPrune read the budget as the average visual tokens per layer; the other methods keep "
             f"it from their pruning layer on.", "", f"| method | {head} |", rule]
    for m in methods:
        cells = [f"{r['accuracy']:.1%} ({r['retention']:.1%})" if r and not r["note"] else "not run"
                 for r in (at.get((m, b)) for b in budgets)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any(r.get("vs_iwp") or (r["method"] == "iwp" and not r["note"]) for r in rows):
        lines += ["", "Paired differences on the same questions, in accuracy points with their 95% interval: each "
                  "method against IWP at the same budget (IWP's row: against unpruned). **Bold**: the interval "
                  "excludes 0.", "", f"| method | {head} |", rule]
        for m in methods:
            cells = []
            for b in budgets:
                r = at.get((m, b))
                d = r and (r.get("vs_none") if m == "iwp" else r.get("vs_iwp"))
                text = f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d else "—"
                cells.append(f"**{text}**" if d and d["significant"] else text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Prefill FLOPs over visual tokens, against unpruned:", "", f"| method | {head} |", rule]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_cell(at.get((m, b)), "flops_ratio", ".1%") for b in budgets) + " |")
    types = list(report["types"])
    if len(types) > 1:
        lines += ["", "By question type (accuracy):"]
        type_head = " | ".join(f"{t} ({report['types'][t]})" for t in types)
        for b in budgets:
            lines += ["", f"Budget {b} ({b / n:.0%}):", "", f"| method | {type_head} |", "|---|" + "---|" * len(types),
                      "| none | " + " | ".join(f"{none['by_type'][t]:.1%}" for t in types) + " |"]
            for m in methods:
                r = at.get((m, b))
                cells = [f"{r['by_type'][t]:.1%}" if r and not r["note"] else "not run" for t in types]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    notes = [r for r in rows if r["note"]]
    if notes:
        lines += ["", "Not run:"] + [f"- {r['method']} at {r['budget']}: {r['note']}" for r in notes]
    lines += ["", "Visual tokens per layer:", ""]
    for r in rows:
        if not r["note"]:
            lines.append(f"- {r['method']} {r['budget']}: {describe_counts(r['tokens_per_layer'])}")
    if report.get("engines"):
        lines += ["", "Through ONNX Runtime engines, against the PyTorch pruned forward on the same questions:", "",
                  "| engine | method | budget | ONNX Runtime | PyTorch | identical answers |", "|---|---|---|---|---|---|"]
        for e in report["engines"]:
            lines.append(f"| {Path(e['engine']).name} | {e['method']} | {e['budget']} | {e['onnxruntime_accuracy']:.1%} "
                         f"| {e['pytorch_accuracy']:.1%} | {e['agreement']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r["note"] and r["method"] != "none"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        style = dict(marker="o", linewidth=2.5 if method == "iwp" else 1.2, label=method)
        axes[0].plot([r["fraction"] for r in mine], [r["retention"] for r in mine], **style)
        axes[1].plot([r["flops_ratio"] for r in mine], [r["retention"] for r in mine], **style)
    for ax, label in zip(axes, ("budget / N (visual tokens kept)", "prefill FLOPs over visual tokens / unpruned")):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy retained (pruned / unpruned)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']} grid {report['grid']} (N={report['n_visual']}), {report['count']} questions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, out_dir: Path) -> Path:
    with staged_directory(out_dir) as staging:
        (staging / "eval.json").write_text(json.dumps(report, indent=1))
        (staging / "eval.md").write_text(markdown(report))
        plot(report, staging / "eval.png")
    return Path(out_dir)
