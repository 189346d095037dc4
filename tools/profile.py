"""`iwp profile`: where the time goes in one engine, stage by stage, and how close pruning gets to its ideal.

Per stage (median and spread over `repeats` runs after `warmup`): preprocessing, vision, selection (the
VisualTokenSelect nodes inside prefill), prefill, time to first token, decode per token, end to end. It also
reports the process's peak memory, the KV arena's bytes against an unpruned engine's, the analytic FLOPs of
the prefill over visual tokens (4nd² + 2n²d + 3ndm per layer) and, given an unpruned `baseline` engine
profiled in the same run, the measured prefill speedup over the FLOP-ideal one.

On Jetson, `tegrastats` is sampled while the profile runs (GPU and EMC load, RAM, input power), with the
power mode from `nvpmodel -q`. The report (JSON, Markdown, PNG) is written to a temporary directory and
renamed into place, so an interrupted run leaves no partial report.
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from iwp.atomic import staged_directory

STAGES = ("preprocess", "vision", "selection", "prefill", "ttft", "decode_per_token", "end_to_end")


def spread(values: list[float]) -> dict:
    """Median and spread of seconds, in milliseconds."""
    ms = sorted(v * 1e3 for v in values)
    q = np.percentile(ms, [25, 75]) if len(ms) > 1 else [ms[0], ms[0]]
    return {"median_ms": statistics.median(ms), "p25_ms": float(q[0]), "p75_ms": float(q[1]),
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


class Tegrastats:
    """Samples Jetson's `tegrastats` in the background when it is on PATH; a no-op elsewhere."""

    PATTERNS = {"gpu_load_pct": r"GR3D_FREQ (\d+)%", "emc_load_pct": r"EMC_FREQ (\d+)%",
                "ram_used_mb": r"RAM (\d+)/\d+MB", "power_in_mw": r"VDD_IN (\d+)mW"}

    def __init__(self, interval_ms: int = 100):
        self.binary, self.interval, self.samples, self.process = shutil.which("tegrastats"), interval_ms, [], None

    def __enter__(self):
        if self.binary:
            self.process = subprocess.Popen([self.binary, "--interval", str(self.interval)], stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self):
        for line in self.process.stdout:
            sample = {k: float(m.group(1)) for k, p in self.PATTERNS.items() if (m := re.search(p, line))}
            if sample:
                self.samples.append(sample)

    def __exit__(self, *exc):
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=5)
            self.reader.join(timeout=5)

    def summary(self) -> dict | None:
        if not self.binary:
            return None
        out = {"samples": len(self.samples), "power_mode": _power_mode()}
        for key in self.PATTERNS:
            values = [s[key] for s in self.samples if key in s]
            if values:
                out[key] = {"mean": statistics.mean(values), "max": max(values)}
        return out


def _power_mode() -> str | None:
    if not shutil.which("nvpmodel"):
        return None
    try:
        result = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((line.strip() for line in result.stdout.splitlines() if line.strip()), None)


class StageTimes:
    """An observer of the pipeline's graph runs: the seconds of each, in order."""

    def __init__(self):
        self.runs: list[tuple[str, float]] = []

    def on_graph(self, name, feeds, outputs, seconds) -> None:
        self.runs.append((name, seconds))

    def seconds(self, name: str) -> list[float]:
        return [s for graph, s in self.runs if graph == name]


def _one_run(pipeline, image, prompt: str, new_tokens: int) -> dict:
    from iwp.plugins.visual_token_select.ort_op import selection_seconds
    from iwp.runtime.pipeline import Sampler

    t, times = {}, StageTimes()
    pipeline.observe(times)
    try:
        start = time.perf_counter()
        batch = pipeline.prepare(image, prompt)
        t["preprocess"] = time.perf_counter() - start
        selection = selection_seconds()
        pre = pipeline.prefill(batch)
        t["selection"] = selection_seconds() - selection
        (t["vision"],) = times.seconds("vision")
        decoder = {g.name for g in pipeline.manifest.graphs if g.kind in ("segment", "select")}
        t["prefill"] = sum(s for graph, s in times.runs if graph in decoder)   # every segment and select
        sampler = Sampler()
        sampler.core().sample(pre.logits)                # the first token
        t["ttft"] = time.perf_counter() - start
        prompt_runs = len(times.runs)
        pipeline.decode(pre, new_tokens, sampler, stop_tokens=[])
        t["end_to_end"] = time.perf_counter() - start
    finally:
        pipeline.observe(None)
    # a decode step is its token's embedding, then every segment
    steps, per_step = times.runs[prompt_runs:], 1 + len(pipeline.manifest.segments())
    t["decode_steps"] = [sum(s for _, s in steps[i:i + per_step]) for i in range(0, len(steps), per_step)]
    return t


def profile_engine(directory, image=None, prompt: str = "What is in the image?", warmup: int = 1,
                   repeats: int = 5, new_tokens: int = 16, progress=print) -> dict:
    from iwp.demo import demo_image
    from iwp.runtime.pipeline import Pipeline

    if warmup < 0 or repeats < 1 or new_tokens < 2:
        raise ValueError("profile: warmup must be >= 0, repeats >= 1 and new tokens >= 2")
    pipeline = Pipeline.from_engine(directory)
    m = pipeline.manifest
    if new_tokens > pipeline.max_new_tokens:
        raise ValueError(f"profile: --new-tokens {new_tokens} exceeds this engine's {pipeline.max_new_tokens}")
    image = image or demo_image(0, tuple(m.model.resolution[::-1]))
    runs = []
    for i in range(warmup + repeats):
        progress(f"{Path(directory).name}: {'warm-up' if i < warmup else 'run'} {i + 1}/{warmup + repeats}")
        run = _one_run(pipeline, image, prompt, new_tokens)
        if i >= warmup:
            runs.append(run)
    stages = {name: spread([r[name] for r in runs]) for name in STAGES if name != "decode_per_token"}
    stages["decode_per_token"] = spread([step for r in runs for step in r["decode_steps"]])
    if m.select == "native" or m.method.name == "none":
        stages["selection"] = None     # inside the graph's own ops (native twin), or no selection at all
    arena = pipeline.arena
    full_capacity = m.shapes.max_prompt + m.shapes.max_new_tokens
    f = m.flops
    return {
        "engine": str(directory), "model": m.model.name, "method": m.method.name,
        "budget": m.method.budget, "n_visual": m.model.n_visual, "dtype": m.dtype,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "settings": {"warmup": warmup, "repeats": repeats, "new_tokens": new_tokens, "prompt": prompt},
        "stages": stages,
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "kv_arena_bytes": arena.bytes, "kv_set_bytes": arena.set_bytes,
                   "kv_set_bytes_unpruned": arena.unpruned_set_bytes(full_capacity),
                   "kv_ratio": arena.set_bytes / arena.unpruned_set_bytes(full_capacity)},
        "flops": {"prefill_visual": f.pruned, "prefill_visual_unpruned": f.unpruned,
                  "ideal_speedup": f.unpruned / f.pruned},
    }


def compare_to_baseline(report: dict, baseline: dict) -> dict:
    """Measured prefill speedup against the unpruned engine, and its ratio to the FLOP-ideal speedup."""
    if baseline["method"] != "none":
        raise ValueError(f"the baseline must be an unpruned engine (METHOD=none), not {baseline['method']}")
    measured = baseline["stages"]["prefill"]["median_ms"] / report["stages"]["prefill"]["median_ms"]
    ideal = report["flops"]["ideal_speedup"]
    selection = report["stages"]["selection"]
    return {"baseline": baseline["engine"], "prefill_speedup": measured, "flop_ideal_speedup": ideal,
            "measured_over_ideal": measured / ideal,
            "ttft_speedup": baseline["stages"]["ttft"]["median_ms"] / report["stages"]["ttft"]["median_ms"],
            "selection_share_of_prefill": (selection["median_ms"] / report["stages"]["prefill"]["median_ms"]
                                           if selection else None)}


def markdown(report: dict) -> str:
    lines = [f"# Profile: {report['model']} {report['method']} (budget {report['budget']} of "
             f"{report['n_visual']} visual tokens, {report['dtype']})", "",
             f"{report['machine']['processor']}, {report['machine']['cpus']} CPUs; median of "
             f"{report['settings']['repeats']} runs after {report['settings']['warmup']} warm-up, "
             f"{report['settings']['new_tokens']} new tokens", "",
             "| stage | median (ms) | p25–p75 (ms) | min–max (ms) |", "|---|---|---|---|"]
    for name in STAGES:
        s = report["stages"][name]
        lines.append(f"| {name} | " + ("inside the graph | | |" if s is None else
                     f"{s['median_ms']:.2f} | {s['p25_ms']:.2f}–{s['p75_ms']:.2f} | {s['min_ms']:.2f}–{s['max_ms']:.2f} |"))
    mem, f = report["memory"], report["flops"]
    lines += ["", f"- peak RSS {mem['peak_rss_mb']:.0f} MB; KV cache {mem['kv_set_bytes'] / 1e6:.2f} MB per set "
              f"against {mem['kv_set_bytes_unpruned'] / 1e6:.2f} MB unpruned ({mem['kv_ratio']:.1%}); the arena "
              f"holds two sets ({mem['kv_arena_bytes'] / 1e6:.2f} MB)",
              f"- prefill FLOPs over visual tokens {f['prefill_visual'] / 1e9:.3f} of "
              f"{f['prefill_visual_unpruned'] / 1e9:.3f} GFLOPs: FLOP-ideal speedup {f['ideal_speedup']:.2f}x"]
    if report.get("speedup"):
        s = report["speedup"]
        share = f"{s['selection_share_of_prefill']:.1%}" if s["selection_share_of_prefill"] is not None else "n/a"
        lines.append(f"- against {s['baseline']}: prefill {s['prefill_speedup']:.2f}x measured, "
                     f"{s['measured_over_ideal']:.2f} of the FLOP-ideal; time to first token {s['ttft_speedup']:.2f}x; "
                     f"selection {share} of the pruned prefill")
    if report.get("tegrastats"):
        lines.append(f"- tegrastats: {json.dumps(report['tegrastats'])}")
    return "\n".join(lines) + "\n"


def plot(report: dict, baseline: dict | None, path: Path) -> None:
    """The stage breakdown of time to first token (and the decode per token), beside the baseline's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("pruned", report)] + ([("unpruned", baseline)] if baseline else [])
    parts = ("preprocess", "vision", "selection", "prefill rest", "decode per token")
    colors = ("#bbbbbb", "#4c72b0", "#dd8452", "#55a868", "#8172b2")
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.8 * len(rows)))
    for y, (label, r) in enumerate(rows):
        st = r["stages"]
        selection = st["selection"]["median_ms"] if st["selection"] else 0.0
        values = (st["preprocess"]["median_ms"], st["vision"]["median_ms"], selection,
                  st["prefill"]["median_ms"] - selection, st["decode_per_token"]["median_ms"])
        left = 0.0
        for part, value, color in zip(parts, values, colors):
            ax.barh(y, value, left=left, color=color, label=part if y == 0 else None)
            left += value
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlabel("milliseconds (median): time to first token, then one decode step")
    ax.set_title(f"{report['model']} {report['method']} budget {report['budget']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, baseline: dict | None, out_dir: Path) -> Path:
    """profile.json, profile.md and profile.png, all or nothing: staged, then renamed into place."""
    with staged_directory(out_dir) as staging:
        (staging / "profile.json").write_text(json.dumps({**report, "baseline_report": baseline}, indent=1))
        (staging / "profile.md").write_text(markdown(report))
        plot(report, baseline, staging / "profile.png")
    return out_dir


def run(engine, baseline=None, image=None, prompt: str = "What is in the image?", warmup: int = 1,
        repeats: int = 5, new_tokens: int = 16, out: Path = Path("profiles"), progress=print) -> Path:
    with Tegrastats() as tegra:
        report = profile_engine(engine, image, prompt, warmup, repeats, new_tokens, progress)
        base = profile_engine(baseline, image, prompt, warmup, repeats, new_tokens, progress) if baseline else None
    report["tegrastats"] = tegra.summary()
    report["speedup"] = compare_to_baseline(report, base) if base else None
    target = write_report(report, base, Path(out) / Path(engine).name)
    progress(markdown(report))
    return target


def command(args) -> None:
    """`iwp profile` from its parsed arguments."""
    run(args.engine, args.baseline, args.image, args.prompt, args.warmup, args.repeats, args.new_tokens,
        Path(args.out))
