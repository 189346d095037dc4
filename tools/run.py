"""`iwp run` (generate from an engine, streaming) and `iwp prepare` (the C++ example app's inputs)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import parse_options


def check_asked(directory, method, asked_method: str | None, asked_options: dict) -> None:
    """Refuse an engine built otherwise than the command line asks: its method, or any option given."""
    if asked_method is not None and asked_method != method.name:
        raise ValueError(f"engine {directory} runs method {method.name}, not {asked_method}; build one with "
                         f"`make engine METHOD={asked_method}`")
    if not asked_options:
        return
    if method.name == "none":
        raise ValueError(f"engine {directory} is unpruned (method none); it has no options to match")
    from iwp.plugins.visual_token_select import make_method
    wanted = make_method(method.name, **asked_options).config      # checked and typed as the build does
    for name in sorted(asked_options):
        built, asked = method.config[name], getattr(wanted, name)
        if (list(built) if isinstance(built, (list, tuple)) else built) != \
                (list(asked) if isinstance(asked, (list, tuple)) else asked):
            raise ValueError(f"engine {directory} was built with {name}={json.dumps(built)}, not "
                             f"{json.dumps(asked, default=list)}; build one with `iwp engine --method {method.name} "
                             f"--option {name}={json.dumps(asked, default=list, separators=(',', ':'))}`")


def command(args) -> None:
    from iwp.runtime.pipeline import Pipeline, read_manifest
    # the asked-for method and options are checked before the files are hashed and the sessions loaded
    check_asked(args.engine, read_manifest(args.engine, verify_files=False).method, args.method,
                parse_options(args.option))
    pipeline = Pipeline.from_engine(args.engine, budget=args.budget)
    method = pipeline.manifest.method
    print(f"engine    {args.engine}: {method.name}, budget {method.budget}, options {json.dumps(method.config)}",
          file=sys.stderr, flush=True)
    pipeline.generate(args.image, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                      on_text=lambda text: print(text, end="", flush=True))
    print()


def prepare_command(args) -> None:
    """The prompt's token ids and the processor's pixel values, for iwp_generate."""
    import numpy as np
    import onnx

    from iwp.processor import processor_from_checkpoint
    from iwp.runtime.pipeline import prepare, read_manifest
    directory = Path(args.engine)
    manifest = read_manifest(directory, verify_files=False)
    batch = prepare(manifest, processor_from_checkpoint(directory), args.image, args.prompt)
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()      # unpadded: the app pads
    vision = onnx.load(str(directory / "vision.onnx"), load_external_data=False).graph.input[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vision.type.tensor_type.elem_type)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.ids").write_text(" ".join(map(str, ids)) + "\n")
    Path(f"{out}.pixels").write_bytes(np.ascontiguousarray(batch.pixel_values.numpy().astype(dtype)).tobytes())
    print(f"wrote     {out}.ids ({len(ids)} tokens) and {out}.pixels ({dtype.name}, "
          f"{tuple(batch.pixel_values.shape)}) for iwp_generate")
