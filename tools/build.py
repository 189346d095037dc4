"""`iwp engine`: build an engine directory, then one smoke generation through it, and a short summary.

Every build setting's default is EngineSpec's (export/engine.py); the command line passes only what was given."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .options import method_options, parse_options

# command-line flag -> EngineSpec field; a flag left out keeps the field's default
SPEC_FLAGS = {"max_text_tokens": "max_text_tokens", "max_new_tokens": "max_new_tokens", "dtype": "dtype",
              "select": "select", "model_path": "model_path", "random_weights": "random_weights",
              "grid": "grid", "budget": "budget", "trt_workspace_gb": "trt_workspace_gb",
              "quant": "quant"}


DEMO_PROMPT = "What is in the image?"
SMOKE_QUESTION = 0       # the OVQA test question ovqa-small answers when no image or prompt is given


def smoke_input(args):
    """(image, prompt, expected answer or None) of the smoke generation: what was given, else for ovqa-small an
    OVQA test scene with its question and answer, else the demo scene and a generic prompt."""
    if args.model == "ovqa-small" and args.image is None and args.prompt is None:
        from iwp.calibration import ovqa
        example = ovqa.example("test", SMOKE_QUESTION)
        return example.image(), example.question, example.answer
    return args.image, args.prompt if args.prompt is not None else DEMO_PROMPT, None


def spec_default(field: str):
    from iwp.export.spec import EngineSpec
    return next(f.default for f in dataclasses.fields(EngineSpec) if f.name == field)


def engine_spec(args):
    """The EngineSpec the arguments ask for; bad methods, options, images and backends fail here, before any work."""
    from iwp.export.spec import EngineSpec
    from iwp.export.tensorrt import resolve_backend
    from iwp.inputs import check_prompt
    from iwp.zoo import get_spec

    spec = get_spec(args.model, args.grid)
    if args.prompt is not None:
        check_prompt(args.prompt)
    if args.image:
        from iwp.inputs import load_image
        load_image(args.image)  # an unreadable image fails now, not after the export
    if args.method == "none" and args.option:
        raise ValueError(f"--option {args.option[0]} is for a selection method; METHOD=none prunes nothing and "
                         f"takes no options")
    options = method_options(spec, args.method, parse_options(args.option)) if args.method != "none" else {}
    if args.method != "none":
        from iwp.plugins.visual_token_select import make_method
        make_method(args.method, **options)
    given = {field: getattr(args, flag) for flag, field in SPEC_FLAGS.items()
             if getattr(args, flag) is not None and getattr(args, flag) is not False}  # 0.0 == False: keep it
    return EngineSpec(args.model, args.method, options=tuple(sorted(options.items())),
                      backend=resolve_backend(args.backend), **given)


def command(args) -> None:
    from iwp.demo import demo_image
    from iwp.export.engine import build
    from iwp.flops import describe_counts
    from iwp.runtime.pipeline import Pipeline

    engine = engine_spec(args)
    start = time.perf_counter()
    directory = build(engine, Path(args.out), progress=lambda line: print(line, flush=True))
    built = time.perf_counter() - start
    pipeline = Pipeline.from_engine(directory)
    m, method = pipeline.manifest, pipeline.manifest.method
    image, prompt, expected = smoke_input(args)
    image = image or demo_image(0, tuple(m.model.resolution[::-1]))
    start = time.perf_counter()
    tokens, kept = pipeline.generate_ids(image, prompt)
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(directory).iterdir())
    n = m.model.n_visual
    print(f"engine    {directory} ({size / 1e6:.1f} MB, {built:.1f}s)")
    print(f"model     {m.model.name} ({m.model.source}), grid {m.model.grid}, N={n} visual tokens, "
          f"prompt capacity {m.shapes.max_prompt} tokens, {m.shapes.max_new_tokens} new")
    print(f"method    {method.name} {method.config}")
    for (layer, keep), indices in zip(method.stages, kept):
        shown = indices[0].tolist()
        print(f"kept      layer {layer}: {keep}/{n} visual tokens: {shown[:16]}{' ...' if len(shown) > 16 else ''}")
    print(f"tokens    per layer {describe_counts(method.tokens_per_layer)}")
    f = m.flops
    print(f"flops     prefill over visual tokens {f.pruned / 1e9:.3f} of {f.unpruned / 1e9:.3f} GFLOPs "
          f"({1 - f.ratio:.1%} saved)")
    answer = pipeline.processor.tokenizer.decode(tokens, skip_special_tokens=True)
    if expected is not None:
        print(f"question  {prompt!r} about OVQA test scene {SMOKE_QUESTION}")
        print(f"answer    {answer!r}, expected {expected!r}  ({len(tokens)} tokens in {elapsed:.2f}s, ONNX Runtime)")
    else:
        print(f"answer    {answer!r}  ({len(tokens)} tokens in {elapsed:.2f}s, ONNX Runtime)")
    if m.build is not None:
        from iwp.export.engine import peak_rss_bytes
        phases = ", ".join(f"{phase} {peak / 1e9:.2f} GB" for phase, peak in m.build.peak_rss_bytes.items())
        print(f"memory    peak RSS: {phases} (when built); {peak_rss_bytes() / 1e9:.2f} GB in this process "
              f"after the smoke generation")
