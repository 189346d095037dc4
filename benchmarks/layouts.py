"""Engine layouts side by side (issue 14): each engine measured by the code tree that built it, in one sitting.

Usage:
    python benchmarks/layouts.py --engine DIR --tree TREE [--label NAME] [--engine DIR --tree TREE ...] \
        --out PREFIX

`--tree` is the import root of the iwp that built the engine, one per `--engine`, in order:
- a repository checkout (a folder with pyproject.toml: its iwp/, export/, runtime/, ... are mapped to iwp.*
  the way [tool.setuptools.package-dir] maps them), e.g. /work/main;
- or a shim folder that already holds an `iwp` package (e.g. /work/oldpkg, whose iwp/ mirrors an older
  checkout's folders by symlinks).
Each engine runs in its own child process that puts its tree first on sys.path and drops the editable install's
finder, so two layouts (format 3 and format 4) run from one command with one interpreter. The child checks that
`iwp` was imported from the tree and refuses otherwise.

Per engine:
- engine bytes: every file under the directory (hard links once), and per file;
- distinct weight bytes: the model's parameters (tied weights once, as `model.parameters()` yields them) in the
  engine's dtype, from the tree's `iwp.zoo.load(name, random_weights=True)` built on the meta device (no
  weights are allocated); and, as a cross-check, the ONNX initializers' bytes deduplicated by content hash
  (a transposed tied head counts again there, so it is an upper bound on what a layout must store);
- peak RSS: a fresh child that loads the engine, prefills the prompt and decodes 32 tokens, read from
  wait4()'s rusage for that child alone;
- prefill ms and decode ms per step: `Pipeline.from_engine` -> `prepare` -> `prefill` -> `decode` (the public
  steps), the prompt short (about 20 text tokens) with the demo image. Decode runs with no stop token, so every
  repeat makes the same 32 tokens: 31 decode steps after the prefill's token. Each round loads the engine once,
  warms up, and times a few repeats; the rounds go engine by engine in order (old, new, old, new ...), and
  the medians are over every round's repeats.

Output: PREFIX.json (every sample) and PREFIX.md (the table).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "What colour is the large shape?"
NEW_TOKENS = 32
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


# --- the child: one engine, one tree ---

def _use_tree(tree: Path) -> None:
    """Import iwp from `tree` only: an editable install's finder would otherwise map iwp.* to its checkout."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    if (tree / "pyproject.toml").is_file():
        sys.meta_path.insert(0, _TreeFinder({"iwp": tree / "iwp", "iwp.export": tree / "export",
                                             "iwp.runtime": tree / "runtime", "iwp.plugins": tree / "plugins",
                                             "iwp.calibration": tree / "calibration", "iwp.tools": tree / "tools"}))
    else:
        sys.path.insert(0, str(tree))
    import iwp
    import iwp.runtime
    for module in (iwp, iwp.runtime):
        where = Path(module.__file__).absolute()
        if tree.absolute() not in where.parents:
            raise SystemExit(f"layouts: {module.__name__} was imported from {where}, not from --tree {tree}")


class _TreeFinder:
    """Maps iwp and its five subpackages to a checkout's folders, as the package-dir table does."""

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, fullname, path=None, target=None):
        import importlib.util
        if fullname in self.mapping:
            folder = self.mapping[fullname]
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
        return None


def _manifest(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


def _dtype(manifest: dict) -> str:
    for key in ("dtype", "precision"):
        if isinstance(manifest.get(key), str):
            return manifest[key]
        for section in manifest.values():
            if isinstance(section, dict) and isinstance(section.get(key), str):
                return section[key]
    raise SystemExit("layouts: the manifest names no dtype")


def child_weights(engine: Path) -> dict:
    """The model's distinct parameter bytes in the engine's dtype (meta device: nothing is allocated)."""
    import torch
    from iwp import zoo
    manifest = _manifest(engine)
    model = manifest["model"]
    with torch.device("meta"):
        loaded = zoo.load(model["name"], grid=model.get("grid"), random_weights=True)
    params = list(loaded.model.parameters())            # tied parameters are yielded once
    named = sum(1 for _ in loaded.model.named_parameters(remove_duplicate=False))
    dtype = _dtype(manifest)
    count = sum(p.numel() for p in params)
    return {"parameters": count, "tensors": len(params), "tied_aliases": named - len(params), "dtype": dtype,
            "distinct_weight_bytes": count * DTYPE_BYTES[dtype]}


def child_run(engine: Path, rounds_warmup: int, repeats: int, new_tokens: int) -> dict:
    """Load, warm up, then time `repeats` prefills and decodes; with repeats 0, one generation (the RSS run)."""
    from iwp.demo import demo_image
    from iwp.runtime.pipeline import Pipeline
    start = time.perf_counter()
    pipeline = Pipeline.from_engine(engine)
    load_s = time.perf_counter() - start
    image = demo_image()
    batch = pipeline.prepare(image, PROMPT)
    text_tokens = _text_tokens(pipeline, batch)
    prefill_s, decode_s, steps = [], [], []
    for i in range(max(rounds_warmup, 0) + max(repeats, 1)):
        t0 = time.perf_counter()
        pre = pipeline.prefill(batch)
        t1 = time.perf_counter()
        ids = pipeline.decode(pre, new_tokens, stop_tokens=[])
        t2 = time.perf_counter()
        if len(ids) != new_tokens:
            raise SystemExit(f"layouts: decode made {len(ids)} tokens, not {new_tokens}")
        if i >= rounds_warmup:
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
            steps.append(len(ids) - 1)       # the first token is the prefill's
    import resource
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
            "tokens": [int(t) for t in ids], "text_tokens": text_tokens,
            "input_ids_shape": list(batch.input_ids.shape),
            "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _text_tokens(pipeline, batch) -> int | None:
    """Prompt tokens beside the image, padding excluded (from the attention mask when the batch has one)."""
    mask = getattr(batch, "attention_mask", None)
    if mask is None:
        return None
    return int(mask.sum()) - int(batch.n_visual)


def child_main(args) -> None:
    tree, engine = Path(args.tree), Path(args.engine)
    _use_tree(tree)
    import iwp
    if args.child == "weights":
        result = child_weights(engine)
    else:
        result = child_run(engine, args.warmup, args.repeats, args.new_tokens)
    result["iwp_file"] = iwp.__file__
    Path(args.result).write_text(json.dumps(result))


# --- the parent: bytes on disk, then the children ---

def engine_bytes(engine: Path) -> dict:
    files, seen, total = {}, set(), 0
    for path in sorted(p for p in engine.rglob("*") if p.is_file()):
        st = path.stat()
        files[str(path.relative_to(engine))] = st.st_size
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return {"engine_bytes": total, "files": files}


def initializer_bytes(engine: Path) -> dict:
    """ONNX initializers across every graph, total and deduplicated by (dtype, content) hash."""
    import onnx
    total, unique = 0, {}
    for graph_path in sorted(engine.rglob("*.onnx")):
        model = onnx.load(str(graph_path), load_external_data=False)
        for init in model.graph.initializer:
            data = _initializer_data(init, graph_path.parent)
            if data is None:
                continue
            total += len(data)
            unique.setdefault(hashlib.sha256(bytes([init.data_type]) + data).hexdigest(), len(data))
    return {"initializer_bytes": total, "unique_initializer_bytes": sum(unique.values())}


def _initializer_data(init, folder: Path) -> bytes | None:
    from onnx import numpy_helper
    if init.data_location == 1:    # EXTERNAL
        info = {e.key: e.value for e in init.external_data}
        with open(folder / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if init.raw_data:
        return bytes(init.raw_data)
    return numpy_helper.to_array(init).tobytes()


def run_child(kind: str, engine: str, tree: str, args, scratch: Path) -> tuple[dict, int]:
    """The child's result and its own peak RSS in KiB (wait4: this child alone)."""
    result = scratch / f"{kind}-{os.getpid()}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--engine", engine, "--tree", tree,
           "--result", str(result), "--warmup", str(args.warmup if kind == "time" else 0),
           "--repeats", str(args.repeats if kind == "time" else 1), "--new-tokens", str(args.new_tokens)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)           # the child chooses its tree itself
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"layouts: the {kind} child for {engine} exited {code}")
    data = json.loads(result.read_text())
    result.unlink()
    return data, usage.ru_maxrss


def _median_ms(values) -> float:
    return 1000 * statistics.median(values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", action="append", default=[], help="engine directory (repeatable)")
    parser.add_argument("--tree", action="append", default=[], help="the iwp tree that built it, one per --engine")
    parser.add_argument("--label", action="append", default=[], help="a name per engine (default: the folder's)")
    parser.add_argument("--out", help="output prefix: PREFIX.json and PREFIX.md")
    parser.add_argument("--rounds", type=int, default=3, help="timing children per engine, interleaved (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prefill+decode per child (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill+decode per child (default 3)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--no-initializers", action="store_true", help="skip the ONNX initializer hashing")
    parser.add_argument("--child", choices=("weights", "time", "rss"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(argv_args(args))
    if not args.engine or len(args.engine) != len(args.tree):
        parser.error(f"give one --tree per --engine (got {len(args.engine)} engines, {len(args.tree)} trees)")
    if args.label and len(args.label) != len(args.engine):
        parser.error(f"give one --label per --engine or none (got {len(args.label)} for {len(args.engine)})")
    if not args.out:
        parser.error("--out PREFIX is required")
    for engine in args.engine:
        if not (Path(engine) / "manifest.json").is_file():
            parser.error(f"--engine {engine} holds no manifest.json; build it with `make engine`")
    for tree in args.tree:
        if not (Path(tree) / "iwp" / "__init__.py").is_file():
            parser.error(f"--tree {tree} holds no iwp/__init__.py; give a checkout or a shim folder with iwp/")
    labels = args.label or [Path(e).name for e in args.engine]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent

    rows = []
    for label, engine, tree in zip(labels, args.engine, args.tree):
        manifest = _manifest(Path(engine))
        row = {"label": label, "engine": str(Path(engine).resolve()), "tree": tree,
               "format": manifest.get("format"), "model": manifest.get("model", {}).get("name"),
               "method": manifest.get("method", {}).get("name"), "budget": manifest.get("method", {}).get("budget"),
               **engine_bytes(Path(engine))}
        print(f"layouts: {label}: {row['engine_bytes'] / 1e9:.3f} GB on disk", flush=True)
        if not args.no_initializers:
            row.update(initializer_bytes(Path(engine)))
        row["weights"], _ = run_child("weights", engine, tree, args, scratch)
        row["ratio"] = row["engine_bytes"] / row["weights"]["distinct_weight_bytes"]
        row["rounds"] = []
        rows.append(row)

    for row in rows:                      # RSS children one after another, each alone on the machine
        data, maxrss = run_child("rss", row["engine"], row["tree"], args, scratch)
        row["rss"] = {"peak_rss_kib": maxrss, **data}
        print(f"layouts: {row['label']}: peak RSS {maxrss / 2**20:.2f} GiB", flush=True)

    for r in range(args.rounds):          # interleaved: every engine once per round, in the order given
        for row in rows:
            data, _ = run_child("time", row["engine"], row["tree"], args, scratch)
            row["rounds"].append(data)
            print(f"layouts: round {r + 1} {row['label']}: prefill {_median_ms(data['prefill_s']):.1f} ms, "
                  f"decode {_median_ms([d / s for d, s in zip(data['decode_s'], data['decode_steps'])]):.2f} "
                  f"ms/step", flush=True)

    for row in rows:
        prefill = [s for d in row["rounds"] for s in d["prefill_s"]]
        per_step = [t / s for d in row["rounds"] for t, s in zip(d["decode_s"], d["decode_steps"])]
        row["prefill_ms"] = _median_ms(prefill)
        row["decode_ms_per_step"] = _median_ms(per_step)
        row["text_tokens"] = row["rounds"][0]["text_tokens"]
        row["input_ids_shape"] = row["rounds"][0]["input_ids_shape"]

    report = {"prompt": PROMPT, "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
              "repeats": args.repeats, "host": platform.node(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "python": sys.version.split()[0],
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "engines": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def argv_args(args):
    args.engine, args.tree = args.engine[0], args.tree[0]
    return args


def markdown(report: dict) -> str:
    lines = [f"Prompt {report['prompt']!r} with the demo image, {report['new_tokens']} new tokens; "
             f"{report['rounds']} interleaved rounds × {report['repeats']} timed repeats after "
             f"{report['warmup']} warm-up; {report['cpus']} CPUs, load {report['load_average'][0]:.2f}; "
             f"{report['finished']}.", "",
             "| engine | format | method | B | dtype | text tokens | engine GB | distinct weights GB | ratio "
             "| unique initializers GB | peak RSS GiB | prefill ms | decode ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["engines"]:
        unique = row.get("unique_initializer_bytes")
        lines.append(
            f"| {row['label']} | {row['format']} | {row['method']} | {row['budget']} | {row['weights']['dtype']} "
            f"| {row['text_tokens']} | {row['engine_bytes'] / 1e9:.3f} "
            f"| {row['weights']['distinct_weight_bytes'] / 1e9:.3f} | {row['ratio']:.2f} "
            f"| {'' if unique is None else f'{unique / 1e9:.3f}'} | {row['rss']['peak_rss_kib'] / 2**20:.2f} "
            f"| {row['prefill_ms']:.1f} | {row['decode_ms_per_step']:.2f} |")
    lines += ["", "Engine bytes per file:", ""]
    for row in report["engines"]:
        files = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in row["files"].items() if size >= 1e6)
        lines.append(f"- {row['label']}: {files}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
