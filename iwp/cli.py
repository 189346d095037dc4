"""The `iwp` command line. Each Makefile target calls one subcommand; errors are one line on stderr, exit 2.

    iwp engine        build an engine directory (ONNX graphs + manifest), then one smoke generation
    iwp run           generate from an engine directory, streaming tokens
    iwp compare       fidelity table of several methods against the unpruned model
    iwp calibrate     BTP stage layers from adjacent-layer hidden-state change
    iwp ablate        IWP's open choices, one at a time around the defaults
    iwp bench-select  IWP selection time on CPU
    iwp bench-cuda    VisualTokenSelect CUDA kernel times (GPU)
    iwp profile       per-stage latency, memory and the FLOP-ideal ratio of an engine (JSON, Markdown, PNG)
    iwp compare-trt   an engine's TensorRT plans against ONNX Runtime
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .demo import demo_image


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
    from .inputs import make_batch
    size = loaded.resolution[::-1]
    images = [demo_image(seed, size) for seed in range(args.images)]
    return make_batch(loaded, images, [args.prompt] * args.images)


def _method_options(spec, method: str, cli_options: dict) -> dict:
    return {**spec.method_defaults.get(method, {}), **cli_options}


def _load(args):
    from .model import PrunedLlavaOnevision
    from .zoo import load
    loaded = load(args.model, grid=args.grid, model_path=args.model_path, random_weights=args.random_weights)
    return loaded, PrunedLlavaOnevision(loaded.model)


def cmd_engine(args) -> None:
    """Build the engine directory, then one smoke generation through it, and a short summary."""
    from pathlib import Path

    from iwp.export.engine import EngineSpec, build
    from iwp.runtime.pipeline import Pipeline
    from .zoo import get_spec

    spec = get_spec(args.model, args.grid)
    if args.image:
        from .inputs import load_image
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
    from .flops import describe_counts
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
    from iwp.calibration.layer_similarity import adjacent_layer_change, choose_stage_layers

    loaded, model = _load(args)
    batch = _demo_batch(loaded, args)
    change = adjacent_layer_change(model, model.embed(batch), batch)
    print("| layer | 1 - cos(h_l, h_l+1) |\n|---|---|")
    for layer, value in enumerate(change.tolist()):
        print(f"| {layer} | {value:.4f} |")
    print(f"btp stage layers ({args.stages} stages): {choose_stage_layers(change, args.stages)}")


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
        from .flops import describe_counts
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

    p = sub.add_parser("calibrate", help="choose BTP stage layers from hidden-state change")
    _model_args(p)
    p.add_argument("--stages", type=positive_int, default=3)
    _scene_args(p, images=8)
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
