"""`iwp bench` (`make bench`): prefill latency of every method × budget against the unpruned prefill, measured
in one run, with the FLOP-ideal speedup beside each measurement and selection's share.

Two backends:
- onnxruntime (CPU, the engines' runtime here): for each (method, budget) the engine's decoder graphs alone
  (its segments and selections; vision and embedding do not depend on the method) are exported, loaded with
  the iwp op, run in order on the prompt's real length after a warm-up, and deleted; a full engine per
  setting would cost minutes and gigabytes at 0.5b scale. The time inside the VisualTokenSelect nodes is
  read from the op itself.
- torch (a GPU where there is one, bf16 and SDPA): the PyTorch pruned forward's prefill, with the selection on
  the CUDA kernels (build/plugins) when they load, else the reference. Selection time is measured in
  separate runs that synchronize around each selection, so the prefill timings carry no extra syncs.

- measured speedup = unpruned prefill median / pruned prefill median (same process, same inputs);
- FLOP-ideal speedup = the unpruned prefill's FLOPs over the pruned one's, 4nd² + 2n²d + 3ndm per layer over
  the visual tokens (the published convention, iwp/flops.py); the ideal that also counts the engine's
  prompt's text tokens is reported beside it;
- selection share = time inside the selection nodes / pruned prefill.

Output: bench.json, bench.md and bench.png (speedup against budget per method, with each budget's FLOP-ideal
speedup), written all-or-nothing.
"""
from __future__ import annotations

import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from iwp.atomic import staged_directory
from iwp.flops import describe_counts, model_dims, prefill_flops

METHODS = ("none", "iwp", "btp", "transprune", "fastv", "dart", "divprune")
BUDGETS = (64, 128, 256, 576)


def _time(run, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds of each repeat, and the seconds spent inside the selection op during each."""
    from iwp.plugins.visual_token_select.ort_op import selection_seconds
    for _ in range(warmup):
        run()
    walls, selections = [], []
    for _ in range(repeats):
        before, start = selection_seconds(), time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
        selections.append(selection_seconds() - before)
    return walls, selections


def _onnxruntime_timer(pruned, loaded, batch, embeds, length: int, out: Path, warmup: int, repeats: int):
    """Per (method, plan): the engine's decoder graphs alone (segments and selections; embed and vision do not
    depend on the method), exported to a temporary directory, run in order on the prompt's real length."""
    from iwp.export.graphs import Decoder, export_program, graph_jobs, names, save
    from iwp.plugins.visual_token_select.ort_op import session
    from iwp.runtime.prompt import prefill_arrays
    arrays = prefill_arrays(batch, embeds.numpy())   # by role, the first segment's and selection's inputs

    def measure(method, plan) -> tuple[list[float], list[float]]:
        decoder = Decoder.of(pruned, method, plan, batch.n_visual)
        tokens = plan.tokens_per_layer if plan else (batch.n_visual,) * pruned.n_layers
        cache_len = [length - batch.n_visual + k + 16 for k in tokens]
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            graphs = []
            for graph, module, args, dynamic in graph_jobs(pruned, decoder, method, loaded, batch, length, cache_len):
                if graph["kind"] in ("embed", "vision"):
                    continue
                inputs, outputs = decoder.tensors(graph)
                with torch.no_grad():
                    program = export_program(module, args, names(inputs), names(outputs), dynamic)
                save(program, Path(tmp) / f"{graph['name']}.onnx")
                caches = {(role, layer): a.numpy() for (_, role, layer, _), a in zip(inputs, args) if layer is not None}
                graphs.append((session(Path(tmp) / f"{graph['name']}.onnx"), inputs, outputs, caches))
                del program, module
                gc.collect()

            def chain():
                state = dict(arrays)
                for sess, inputs, outputs, caches in graphs:
                    feeds = {name: caches[(role, layer)] if layer is not None else state[role]
                             for name, role, layer, _ in inputs}
                    for (_, role, layer, _), value in zip(outputs, sess.run(None, feeds)):
                        if layer is None:
                            state["alive" if role == "kept" else role] = value
            try:
                return _time(chain, warmup, repeats)
            finally:
                del graphs
                gc.collect()
    return measure


def _torch_timer(pruned, batch, embeds, device: torch.device, warmup: int, repeats: int):
    from iwp.plugins.visual_token_select.torch_op import select as reference_select
    kernel = None
    if device.type == "cuda":
        try:
            from iwp.plugins.visual_token_select import cuda
            cuda.library()
            # the indices stay on the device (cuda.select copies them to the host), as in the engine
            kernel = lambda m, view, keep: cuda.Selector(m, view, keep).run()   # noqa: E731
        except (FileNotFoundError, OSError, RuntimeError):
            kernel = None   # not built: the reference selects on the GPU
    selector = kernel or reference_select

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(method, plan) -> tuple[list[float], list[float]]:
        def prefill(select=selector):
            with torch.no_grad():
                pruned.prefill(embeds, batch, method, plan, last_logits_only=True, select=select)
        spent = [0.0]

        def timed_select(m, view, keep):
            sync()
            start = time.perf_counter()
            out = selector(m, view, keep)
            sync()
            spent[0] += time.perf_counter() - start
            return out
        walls = []
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            prefill()
            sync()
            if i >= warmup:
                walls.append(time.perf_counter() - start)
        selections = []
        for _ in range(repeats if method else 0):
            spent[0] = 0.0
            prefill(timed_select)
            selections.append(spent[0])
        return walls, selections or [0.0] * repeats
    return measure, ("CUDA kernels" if kernel else "reference")


def run(model: str = "llava-ov-0.5b", methods=METHODS, budgets=BUDGETS, repeats: int = 3, warmup: int = 1,
        random_weights: bool = True, model_path: str | None = None, max_text_tokens: int = 128,
        out: Path = Path("benchmarks"), progress=print, backend: str = "onnxruntime", device: str = "cpu",
        dtype: str = "fp32", grid: str | None = None) -> dict:
    from iwp.demo import demo_image
    from iwp.inputs import fit_capacity, make_batch
    from iwp.model import PrunedLlavaOnevision
    from iwp.plugins.visual_token_select import make_method
    from iwp.zoo import load

    if backend not in ("onnxruntime", "torch"):
        raise ValueError(f"bench backend {backend!r} is not one of onnxruntime, torch")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes or (backend == "onnxruntime" and dtype != "fp32"):
        raise ValueError(f"bench dtype {dtype!r}: onnxruntime benches fp32 graphs; torch takes fp32, fp16 or bf16")
    loaded = load(model, grid=grid, model_path=model_path, random_weights=random_weights, dtype=dtypes[dtype])
    target_device = torch.device(device)
    pruned = PrunedLlavaOnevision(loaded.model.to(target_device))
    n, layers = loaded.n_visual, pruned.n_layers
    d, m = model_dims(loaded.model)
    length = n + max_text_tokens
    batch = fit_capacity(make_batch(loaded, demo_image(0, loaded.resolution[::-1]), "Describe the image."), length)
    text_tokens = batch.input_ids.shape[1] - n     # the prompt's own: prefills run unpadded
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if backend == "torch":
        import dataclasses
        batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(target_device)
                                              for f in dataclasses.fields(batch)
                                              if isinstance(getattr(batch, f.name), torch.Tensor)})
    with torch.no_grad():
        embeds = pruned.embed(batch)
    if backend == "torch":
        measure, selection_path = _torch_timer(pruned, batch, embeds, target_device, warmup, repeats)
        label = f"torch {dtype} on {target_device} (selection: {selection_path})"
    else:
        measure = _onnxruntime_timer(pruned, loaded, batch, embeds, length, out, warmup, repeats)
        label = "onnxruntime (CPU)"
    full = prefill_flops((n,) * layers, d, m)
    full_text = prefill_flops((n,) * layers, d, m, text_tokens=text_tokens)
    settings = [("none", n)] + [(name, b) for name in methods if name != "none" for b in budgets if b <= n]
    rows = []
    for i, (name, budget) in enumerate(settings):
        method = make_method(name, **loaded.spec.method_defaults.get(name, {})) if name != "none" else None
        row = {"method": name, "budget": budget}
        try:
            plan = method.plan(layers, n, budget) if method else None
        except ValueError as err:   # a multi-stage budget below what its unpruned layers cost
            rows.append({**row, "note": str(err)})
            progress(f"[{i + 1}/{len(settings)}] {name} {budget}: not run ({err})")
            continue
        tokens = plan.tokens_per_layer if plan else (n,) * layers
        progress(f"[{i + 1}/{len(settings)}] {name} {budget}: measuring ...")
        walls, selections = measure(method, plan)
        flops = prefill_flops(tokens, d, m)
        rows.append({**row, "note": "", "tokens_per_layer": list(tokens), "prefill_ms": [w * 1e3 for w in walls],
                     "prefill_median_ms": statistics.median(walls) * 1e3,
                     "selection_median_ms": statistics.median(selections) * 1e3 if method else 0.0,
                     "flops": flops, "ideal_speedup": full / flops,
                     "ideal_speedup_with_text": full_text / prefill_flops(tokens, d, m, text_tokens=text_tokens)})
        progress(f"[{i + 1}/{len(settings)}] {name} {budget}: prefill {rows[-1]['prefill_median_ms']:.1f} ms")
    base = rows[0]["prefill_median_ms"]
    for row in rows:
        if not row["note"]:
            row["speedup"] = base / row["prefill_median_ms"]
            row["measured_over_ideal"] = row["speedup"] / row["ideal_speedup"]
            row["selection_share"] = row["selection_median_ms"] / row["prefill_median_ms"]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
    if target_device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(target_device)
    report = {"model": loaded.spec.name, "source": loaded.source, "grid": loaded.spec.grid_name, "n_visual": n,
              "prompt_capacity": length, "text_tokens": text_tokens, "backend": label, "repeats": repeats,
              "warmup": warmup,
              "machine": machine, "rows": rows}
    target = out / f"{loaded.spec.name}-{loaded.spec.grid_name}-{backend}"
    with staged_directory(target) as staging:
        (staging / "bench.json").write_text(json.dumps(report, indent=1))
        (staging / "bench.md").write_text(markdown(report))
        plot(report, staging / "bench.png")
    progress(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['model']} ({report['source']}), grid {report['grid']}, N={report['n_visual']} visual tokens, "
             f"prompt capacity {report['prompt_capacity']}; {report['backend']}, median of {report['repeats']} after "
             f"{report['warmup']} warm-up", "",
             "| method | budget | tokens per layer | prefill ms | selection ms | measured speedup | FLOP-ideal | "
             "measured / ideal | ideal with the text tokens | selection share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["note"]:
            lines.append(f"| {r['method']} | {r['budget']} | not run: {r['note']} | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['budget']} | {describe_counts(r['tokens_per_layer'])} | "
                     f"{r['prefill_median_ms']:.1f} | {r['selection_median_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['ideal_speedup']:.2f}x | {r['measured_over_ideal']:.2f} | "
                     f"{r['ideal_speedup_with_text']:.2f}x | {r['selection_share']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r["note"] and r["method"] != "none"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        budgets = [r["budget"] for r in mine]
        line, = ax.plot(budgets, [r["speedup"] for r in mine], marker="o", label=method,
                        linewidth=2.5 if method == "iwp" else 1.2)
        ax.plot(budgets, [r["ideal_speedup"] for r in mine], linestyle="--", color=line.get_color(), linewidth=0.9)
    ax.plot([], [], "k--", linewidth=0.9, label="FLOP-ideal (dashed, per method)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (visual tokens kept)")
    ax.set_ylabel("prefill speedup vs unpruned (measured)")
    ax.set_title(f"{report['model']} N={report['n_visual']}, {report['backend']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command(args) -> None:
    """`iwp bench` from its parsed arguments."""
    from .options import csv_list
    run(args.model, csv_list(args.methods, str), csv_list(args.budgets, int), args.repeats, args.warmup,
        args.random_weights, args.model_path, out=Path(args.out), progress=lambda line: print(line, flush=True),
        backend=args.backend, device=args.device, dtype=args.dtype, grid=args.grid)
