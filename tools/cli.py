"""The `iwp` command line. Each Makefile target calls one subcommand; errors are one line on stderr, exit 2.

    iwp engine        build an engine directory (ONNX graphs + manifest), then one smoke generation
    iwp run           generate from an engine directory, streaming tokens
    iwp compare       fidelity table of several methods against the unpruned model
    iwp calibrate     BTP stage layers from adjacent-layer hidden-state change
    iwp ablate        IWP's open choices, one at a time around the defaults
    iwp bench-select  IWP selection time on CPU
    iwp bench         prefill speedup of every method x budget against unpruned, with the FLOP-ideal (ONNX Runtime)
    iwp bench-cuda    VisualTokenSelect CUDA kernel times (GPU)
    iwp profile       per-stage latency, memory and the FLOP-ideal ratio of an engine (JSON, Markdown, PNG)
    iwp compare-trt   an engine's TensorRT plans against ONNX Runtime
    iwp train         train ovqa-small on the OVQA benchmark (CPU, about 30 minutes)
    iwp eval          visual-QA accuracy per method x budget (OVQA or a JSONL benchmark), JSON/Markdown/PNG
    iwp ovqa-export   an OVQA split as a JSONL file and PNG images (the format `iwp eval --data` reads)
    iwp prepare       token ids and pixel values of one image and prompt, for the C++ app iwp_generate
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from iwp.demo import demo_image


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_options(items: list[str]) -> dict:
    """--option name=value (JSON values: 0.5, 4, [1,3,5], "last"; bare words are strings)."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r} is not of the form name=value, e.g. lam=0.5")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key] = tuple(value) if isinstance(value, list) else value
    return options


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llava-ov", help="preset name: tiny-llava-ov, llava-ov-0.5b, llava-ov-7b")
    p.add_argument("--grid", default=None, help="crop grid RxC beside the base crop (default: the preset's)")
    p.add_argument("--model-path", default=None, help="checkpoint directory (else the HF cache)")
    p.add_argument("--random-weights", action="store_true", help="real-size architecture, random weights")
    p.add_argument("--budget", type=positive_int, default=None, help="visual tokens kept (default: the preset's)")


def _scene_args(p: argparse.ArgumentParser, images: int) -> None:
    p.add_argument("--prompt", default="What colour is the largest shape?")
    p.add_argument("--images", type=positive_int, default=images, help="seeded synthetic demo scenes")


def _demo_batch(loaded, args):
    from iwp.inputs import make_batch
    size = loaded.resolution[::-1]
    images = [demo_image(seed, size) for seed in range(args.images)]
    return make_batch(loaded, images, [args.prompt] * args.images)


def _method_options(spec, method: str, cli_options: dict) -> dict:
    return {**spec.method_defaults.get(method, {}), **cli_options}


def _load(args):
    from iwp.model import PrunedLlavaOnevision
    from iwp.zoo import load
    loaded = load(args.model, grid=args.grid, model_path=args.model_path, random_weights=args.random_weights)
    return loaded, PrunedLlavaOnevision(loaded.model)


def cmd_engine(args) -> None:
    """Build the engine directory, then one smoke generation through it, and a short summary."""
    from pathlib import Path

    from iwp.export.engine import EngineSpec, build
    from iwp.runtime.pipeline import Pipeline
    from iwp.zoo import get_spec

    spec = get_spec(args.model, args.grid)
    if args.image:
        from iwp.inputs import load_image
        load_image(args.image)  # an unreadable image fails now, not after the export
    options = _method_options(spec, args.method, parse_options(args.option)) if args.method != "none" else {}
    if args.method != "none":
        from iwp.plugins.visual_token_select import make_method
        make_method(args.method, **options)  # bad methods and options fail before any work
    from iwp.export.tensorrt import resolve_backend
    backend = resolve_backend(args.backend)
    engine = EngineSpec(args.model, args.method, args.budget or spec.budget, args.grid, args.max_text_tokens,
                        args.max_new_tokens, args.dtype, args.select, args.model_path, args.random_weights,
                        tuple(sorted(options.items())), backend=backend)
    start = time.perf_counter()
    directory = build(engine, Path(args.out), progress=lambda line: print(line, flush=True))
    built = time.perf_counter() - start
    pipeline = Pipeline.from_engine(directory)
    m, method = pipeline.manifest, pipeline.manifest["method"]
    image = args.image or demo_image(0, tuple(m["model"]["resolution"][::-1]))
    start = time.perf_counter()
    tokens, kept = pipeline.generate_ids(image, args.prompt)
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(directory).iterdir())
    n = m["model"]["n_visual"]
    print(f"engine    {directory} ({size / 1e6:.1f} MB, {built:.1f}s)")
    print(f"model     {m['model']['name']} ({m['model']['source']}), grid {m['model']['grid']}, N={n} visual tokens, "
          f"prompt capacity {m['shapes']['max_prompt']} tokens, {m['shapes']['max_new_tokens']} new")
    print(f"method    {method['name']} {method['config']}")
    for (layer, keep), indices in zip(method["stages"], kept):
        shown = indices[0].tolist()
        print(f"kept      layer {layer}: {keep}/{n} visual tokens: {shown[:16]}{' ...' if len(shown) > 16 else ''}")
    from iwp.flops import describe_counts
    print(f"tokens    per layer {describe_counts(method['tokens_per_layer'])}")
    f = m["flops"]
    print(f"flops     prefill over visual tokens {f['pruned'] / 1e9:.3f} of {f['unpruned'] / 1e9:.3f} GFLOPs "
          f"({1 - f['ratio']:.1%} saved)")
    answer = pipeline.processor.tokenizer.decode(tokens, skip_special_tokens=True)
    print(f"answer    {answer!r}  ({len(tokens)} tokens in {elapsed:.2f}s, ONNX Runtime)")


def cmd_compare_trt(args) -> None:
    from iwp.export.tensorrt import compare, resolve_backend
    resolve_backend("tensorrt")  # a clear one-line error where TensorRT is missing
    verdicts = compare(args.engine, args.image, args.prompt, args.atol)
    if not all(verdicts.values()):
        raise SystemExit(f"TensorRT and ONNX Runtime disagree on: {', '.join(k for k, v in verdicts.items() if not v)}")


def cmd_run(args) -> None:
    from iwp.runtime.pipeline import Pipeline
    pipeline = Pipeline.from_engine(args.engine, budget=args.budget)
    pipeline.generate(args.image, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                      on_text=lambda text: print(text, end="", flush=True))
    print()


def cmd_compare(args) -> None:
    from .compare import compare, markdown
    from iwp.plugins.visual_token_select import METHODS

    loaded, model = _load(args)
    budget = args.budget or loaded.spec.budget
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        if name != "none" and name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from: none, {', '.join(METHODS)}")
    batch = _demo_batch(loaded, args)
    options = {name: _method_options(loaded.spec, name, {}) for name in methods}
    layer = options.get("iwp", {}).get("layer", METHODS["iwp"].Config().layer)
    rows = compare(model, batch, budget, methods, layer, options)
    print(f"{loaded.spec.name}, grid {loaded.spec.grid_name}, N={batch.n_visual}, budget {budget}, "
          f"{args.images} demo images")
    print(markdown(rows, layer))


def cmd_calibrate(args) -> None:
    from iwp.calibration.calibrate import calibrate, markdown
    from iwp.atomic import staged_directory
    from iwp.calibration.evaluate import budgets_from_fractions, ovqa_items
    from iwp.zoo import METHOD_DEFAULTS, bundled_dir, load

    loaded = load(args.model, grid=args.grid, model_path=args.model_path, random_weights=args.random_weights)
    if args.write_defaults and not loaded.spec.bundled:
        raise ValueError(f"--write-defaults writes a bundled model's defaults; {loaded.spec.name} is not bundled, "
                         f"so pass the printed values as --option instead")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"btp", "iwp"})
    if unknown:
        raise ValueError(f"calibrate knows btp and iwp, not {unknown}")
    items = ovqa_items("calibration", args.examples)
    budgets = budgets_from_fractions(_csv(args.fractions, float), loaded.n_visual)
    result = calibrate(loaded, items, methods, args.stages, budgets, batch_size=args.batch_size,
                       progress=lambda line: print(line, flush=True))
    text = markdown(result)
    with staged_directory(Path(args.out) / f"{loaded.spec.name}-{loaded.spec.grid_name}") as staging:
        (staging / "calibration.json").write_text(json.dumps(result, indent=1))
        (staging / "calibration.md").write_text(text)
    if args.write_defaults:   # beside the weights: the defaults and the sweep that chose them
        directory = bundled_dir(loaded.spec.name)
        defaults = {**loaded.spec.method_defaults, **result["defaults"]}
        for name, content in ((METHOD_DEFAULTS, json.dumps(defaults, indent=1)), ("calibration.md", text),
                              ("calibration.json", json.dumps(result, indent=1))):
            tmp = directory / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(directory / name)   # atomic per file
    print(text)
    for method, options in result["defaults"].items():
        flags = " ".join(f"--option {k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())
        print(f"{method}: {flags}")


def cmd_ablate(args) -> None:
    from .ablate import ablate

    loaded, model = _load(args)
    budget = args.budget or loaded.spec.budget
    batch = _demo_batch(loaded, args)
    print(f"{loaded.spec.name}, grid {loaded.spec.grid_name}, N={batch.n_visual}, budget {budget}, "
          f"{args.images} demo images")
    print(ablate(model, batch, budget))


def cmd_bench_prefill(args) -> None:
    from iwp.runtime.pipeline import Pipeline
    print("| engine | method | tokens per layer | vision ms | prefill ms | prefill vs first | FLOP-ideal |")
    print("|---|---|---|---|---|---|---|")
    first = None
    for directory in args.engine:
        pipeline = Pipeline.from_engine(directory)
        m = pipeline.manifest
        image = demo_image(0, tuple(m["model"]["resolution"][::-1]))
        t = pipeline.time_stages(image, "What is in the image?", args.repeats)
        first = first or (t["prefill"], m["flops"]["pruned"])
        from iwp.flops import describe_counts
        print(f"| {Path(directory).name} | {m['method']['name']} | {describe_counts(m['method']['tokens_per_layer'])} "
              f"| {t['vision'] * 1e3:.0f} | {t['prefill'] * 1e3:.0f} | {first[0] / t['prefill']:.2f}x | "
              f"{first[1] / m['flops']['pruned']:.2f}x |", flush=True)
        del pipeline  # multi-GB sessions: free one engine before loading the next
        import gc
        gc.collect()


def cmd_bench_select(args) -> None:
    from .bench_select import run
    run(args.repeats)


def cmd_profile(args) -> None:
    from pathlib import Path

    from .profile import run
    run(args.engine, args.baseline, args.image, args.prompt, args.warmup, args.repeats, args.new_tokens,
        Path(args.out))


def cmd_soak(args) -> None:
    from .soak import run
    result = run(args.engine, args.generations, args.new_tokens)
    print(f"{result['generations']} generations in {result['seconds']:.0f}s; RSS growth after warm-up "
          f"{result['growth_mb']:+.1f} MB")


def method_options_for(spec, methods, items: list[str]) -> dict:
    """Per-method options: the model's calibrated defaults, then --option method.name=value."""
    overrides: dict = {}
    for item in items:
        name, dot, rest = item.partition(".")
        if not dot:
            raise ValueError(f"--option {item!r} must name its method, e.g. iwp.lam=0.5")
        overrides.setdefault(name, []).append(rest)
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise ValueError(f"--option names method(s) {unknown} that are not evaluated; evaluated: {', '.join(methods)}")
    return {m: _method_options(spec, m, parse_options(overrides.get(m, []))) for m in methods if m != "none"}


def _csv(text: str, kind):
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None


def cmd_eval(args) -> None:
    from .eval_report import markdown, write
    from iwp.calibration.evaluate import budgets_from_fractions, jsonl_items, ovqa_items, sweep
    from .engine_agreement import engine_agreement
    from iwp.zoo import load

    loaded = load(args.model, grid=args.grid, model_path=args.model_path, random_weights=args.random_weights)
    items = jsonl_items(args.data, args.prompt_suffix) if args.data else ovqa_items(args.split, args.examples)
    budgets = (sorted(set(_csv(args.budgets, int))) if args.budgets
               else budgets_from_fractions(_csv(args.fractions, float), loaded.n_visual))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = method_options_for(loaded.spec, methods, args.option)
    report = sweep(loaded, items, methods, budgets, options, args.metric, args.batch_size,
                   progress=lambda line: print(line, flush=True))
    report["items"] = str(args.data) if args.data else f"OVQA {args.split}"
    engine_items = items[: args.engine_examples]
    report["engines"] = [engine_agreement(e, loaded, engine_items, args.metric, lambda line: print(line, flush=True))
                         for e in args.engine]
    source = Path(args.data).stem if args.data else f"ovqa-{args.split}"
    out = write(report, Path(args.out) / f"{loaded.spec.name}-{loaded.spec.grid_name}-{source}")
    print(markdown(report))
    print(f"report    {out}/eval.json, eval.md, eval.png")


def cmd_train(args) -> None:
    from .train import TrainConfig, train
    from iwp.zoo import bundled_dir
    config = TrainConfig(**{k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("seed", args.seed))
                            if v is not None})
    out = Path(args.out) if args.out else bundled_dir("ovqa-small")
    summary = train(out, config, progress=lambda line: print(line, flush=True))
    print(f"trained   {out} in {summary['seconds'] / 60:.1f} min; dev accuracy "
          f"{summary['history'][-1]['dev_accuracy']:.1%}")


def cmd_prepare(args) -> None:
    """The inputs of the C++ example app: the prompt's token ids and the processor's pixel values."""
    import numpy as np
    import onnx

    from iwp.processor import processor_from_checkpoint
    from iwp.runtime.pipeline import prepare, read_manifest
    directory = Path(args.engine)
    manifest = read_manifest(directory, verify_files=False)
    batch = prepare(directory, manifest, processor_from_checkpoint(directory), args.image, args.prompt)
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()      # unpadded: the app pads
    vision = onnx.load(str(directory / "vision.onnx"), load_external_data=False).graph.input[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vision.type.tensor_type.elem_type)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.ids").write_text(" ".join(map(str, ids)) + "\n")
    Path(f"{out}.pixels").write_bytes(np.ascontiguousarray(batch.pixel_values.numpy().astype(dtype)).tobytes())
    print(f"wrote     {out}.ids ({len(ids)} tokens) and {out}.pixels ({dtype.name}, "
          f"{tuple(batch.pixel_values.shape)}) for iwp_generate")


def cmd_ovqa_export(args) -> None:
    from iwp.calibration.ovqa import export_jsonl
    path = export_jsonl(args.split, args.examples, Path(args.out))
    print(f"wrote     {path} ({args.examples} questions, images beside it)")


def cmd_bench(args) -> None:
    from .bench import run
    run(args.model, _csv(args.methods, str), _csv(args.budgets, int), args.repeats, args.warmup,
        args.random_weights, args.model_path, out=Path(args.out), progress=lambda line: print(line, flush=True),
        backend=args.backend, device=args.device, dtype=args.dtype, grid=args.grid)


def cmd_bench_cuda(args) -> None:
    from .bench_cuda import run
    run(args.repeats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iwp", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("engine", help="build an engine directory and smoke-test it")
    _model_args(p)
    p.add_argument("--method", default="iwp", help="iwp, btp, transprune, fastv, dart, divprune, random, none")
    p.add_argument("--option", action="append", default=[], help="method option name=value, repeatable")
    p.add_argument("--image", default=None, help="smoke-test image (default: a synthetic demo scene)")
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--max-text-tokens", type=positive_int, default=128, help="prompt tokens beside the image")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--select", default="plugin", choices=["plugin", "native"])
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "auto"],
                   help="tensorrt also builds a .plan per graph; auto picks it when TensorRT is present")
    p.add_argument("--out", default="engines", help="directory that holds engine directories")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("compare-trt", help="each TensorRT plan of an engine against ONNX Runtime, same inputs")
    p.add_argument("engine", help="an engine directory built with --backend tensorrt")
    p.add_argument("--image", default=None)
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--atol", type=float, default=None, help="float tolerance (default 1e-3 fp32, 2e-2 fp16)")
    p.set_defaults(func=cmd_compare_trt)

    p = sub.add_parser("run", help="generate from an engine directory, streaming tokens")
    p.add_argument("--engine", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--budget", type=positive_int, default=None, help="refuse an engine built for another budget")
    p.add_argument("--max-new-tokens", type=positive_int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="fidelity of methods against unpruned")
    _model_args(p)
    p.add_argument("--methods", default="iwp,btp,transprune,fastv,dart,divprune,random")
    _scene_args(p, images=4)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("calibrate", help="choose BTP stage layers and IWP options on the OVQA calibration split")
    _model_args(p)
    p.set_defaults(model="ovqa-small")
    p.add_argument("--methods", default="btp,iwp", help="btp, iwp or both")
    p.add_argument("--stages", type=positive_int, default=3, help="BTP stages")
    p.add_argument("--examples", type=positive_int, default=300, help="OVQA calibration questions")
    p.add_argument("--fractions", default="0.05,0.1,0.25", help="budgets (fractions of N) IWP is scored at")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--write-defaults", action="store_true",
                   help="write the chosen values into the bundled model's method_defaults.json")
    p.add_argument("--out", default="calibrations", help="the sweep goes to OUT/<model>-<grid>/")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("ablate", help="IWP's options one at a time around the defaults")
    _model_args(p)
    _scene_args(p, images=8)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("bench-prefill", help="vision and prefill time of engines; the first is the baseline")
    p.add_argument("--engine", action="append", required=True, help="engine directory, repeatable")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.set_defaults(func=cmd_bench_prefill)

    p = sub.add_parser("bench-select", help="IWP selection time on CPU")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.set_defaults(func=cmd_bench_select)

    p = sub.add_parser("profile", help="per-stage latency, memory and FLOP-ideal ratio of an engine")
    p.add_argument("--engine", required=True, help="the engine directory to profile")
    p.add_argument("--baseline", default=None, help="an unpruned engine (METHOD=none) for the measured speedup")
    p.add_argument("--image", default=None)
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument("--out", default="profiles", help="reports go to OUT/<engine name>/")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("soak", help="many generations in one process, watching memory")
    p.add_argument("--engine", required=True)
    p.add_argument("--generations", type=positive_int, default=1000)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("eval", help="visual-QA accuracy per method x budget")
    _model_args(p)
    p.set_defaults(model="ovqa-small")
    p.add_argument("--methods", default="none,iwp,btp,transprune,fastv,dart,divprune,random")
    p.add_argument("--budgets", default=None, help="visual tokens kept, comma-separated (default: --fractions of N)")
    p.add_argument("--fractions", default="0.05,0.1,0.15,0.25,0.5", help="budgets as fractions of N")
    p.add_argument("--split", default="test", choices=["train", "calibration", "test"], help="OVQA split")
    p.add_argument("--examples", type=positive_int, default=500, help="OVQA questions")
    p.add_argument("--data", default=None, help="a JSONL VQA file instead of OVQA (the bridge for real checkpoints)")
    p.add_argument("--metric", default="exact", choices=["exact", "vqa"])
    p.add_argument("--prompt-suffix", default="", help="appended to every JSONL question, e.g. "
                   "'Answer the question using a single word or phrase.'")
    p.add_argument("--option", action="append", default=[], help="method option method.name=value, repeatable")
    p.add_argument("--engine", action="append", default=[], help="also answer through this ONNX Runtime engine "
                   "and compare with PyTorch (repeatable)")
    p.add_argument("--engine-examples", type=positive_int, default=100, help="questions run through each engine")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", default="evals", help="reports go to OUT/<model>-<grid>-<source>/")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train ovqa-small on the OVQA train split")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--batch", type=positive_int, default=None, help="images per step (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None, help="(default: the recipe's)")
    p.add_argument("--out", default=None, help="model directory (default: the bundled iwp/weights/ovqa-small)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="token ids and pixel values of one image and prompt, for the C++ app")
    p.add_argument("--engine", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="writes OUT.ids and OUT.pixels")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("ovqa-export", help="write an OVQA split as JSONL + PNG images")
    p.add_argument("--split", default="test", choices=["train", "calibration", "test"])
    p.add_argument("--examples", type=positive_int, default=500)
    p.add_argument("--out", default="ovqa-test", help="directory for questions.jsonl and images/")
    p.set_defaults(func=cmd_ovqa_export)

    p = sub.add_parser("bench", help="prefill speedup of every method x budget against unpruned (ONNX Runtime)")
    p.add_argument("--model", default="llava-ov-0.5b")
    p.add_argument("--model-path", default=None)
    p.add_argument("--random-weights", action="store_true", help="real-size architecture, random weights")
    p.add_argument("--methods", default="none,iwp,btp,transprune,fastv,dart,divprune")
    p.add_argument("--budgets", default="64,128,256,576")
    p.add_argument("--grid", default=None, help="crop grid RxC (default: the preset's)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--device", default="cpu", help="torch backend: cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="torch backend's dtype")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="benchmarks", help="reports go to OUT/<model>-<grid>/")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-cuda", help="VisualTokenSelect CUDA kernel times (needs a GPU)")
    p.add_argument("--repeats", type=positive_int, default=50)
    p.set_defaults(func=cmd_bench_cuda)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"iwp: error: {err}", file=sys.stderr)
        sys.exit(2)
