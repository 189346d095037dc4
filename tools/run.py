"""`iwp run` (generate from an engine, streaming) and `iwp prepare` (the C++ example app's inputs)."""
from __future__ import annotations

from pathlib import Path


def command(args) -> None:
    from iwp.runtime.pipeline import Pipeline
    pipeline = Pipeline.from_engine(args.engine, budget=args.budget)
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
