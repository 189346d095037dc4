"""`iwp compare-trt`: each TensorRT plan of an engine against ONNX Runtime, on the same real inputs.

The inputs are recorded from one short generation through the pipeline's observer (`Recorder`): the first
feeds each graph sees, prompt and first decode step alike. polygraphy's Comparator then runs every graph
through two runners on those feeds and compares the outputs: integer outputs (kept indices) exactly, float
outputs within atol (1e-3 fp32, 2e-2 fp16).

The recording and the comparison do not depend on TensorRT (`compare_graphs` takes any candidate runner), so
CI runs them with ONNX Runtime on both sides, and with a corrupted candidate the comparison must catch
(tests/test_compare_trt.py); only `compare`, which builds the TensorRT runners, needs TensorRT.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

INTEGER_DTYPES = ("int64", "int32", "bool")


class Recorder:
    """An observer of the pipeline that keeps a copy of the first feeds each graph is run with."""

    def __init__(self):
        self.feeds: dict[str, dict[str, np.ndarray]] = {}

    def on_graph(self, name, feeds, outputs, seconds) -> None:
        if name not in self.feeds:  # decode's feeds are the arena's buffers, rewritten by later steps: copy
            self.feeds[name] = {key: np.array(value, copy=True) for key, value in feeds.items()}


def record(pipeline, image=None, prompt: str = "What is in the image?") -> dict[str, dict[str, np.ndarray]]:
    """Every graph's first feeds in one generation of two tokens (so decode runs once)."""
    from iwp.demo import demo_image
    image = image or demo_image(0, tuple(pipeline.manifest.model.resolution[::-1]))
    if pipeline.max_new_tokens < 2:
        raise ValueError(f"engine {pipeline.directory} has room for {pipeline.max_new_tokens} new token, so its decode "
                         f"graph never runs; build it with --max-new-tokens 2 or more to compare it")
    recorder = Recorder()
    pipeline.observe(recorder)
    try:   # no stop token: decode runs even when the first token is EOS
        pipeline.decode(pipeline.prefill(pipeline.prepare(image, prompt)), 2, stop_tokens=[])
    finally:
        pipeline.observe(None)
    return recorder.feeds


def default_atol(manifest) -> float:
    return 2e-2 if manifest.dtype == "fp16" else 1e-3


def compare_graphs(pipeline, feeds: dict, candidate: Callable[[str], object], graphs=None, atol: float | None = None,
                   progress=print) -> dict[str, bool]:
    """Each graph through `candidate(name)` (a polygraphy runner) against the pipeline's own ONNX Runtime
    session, on the recorded feeds: True where every output agrees."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    manifest = pipeline.manifest
    atol = default_atol(manifest) if atol is None else atol
    verdicts = {}
    for name in graphs or manifest.io:
        reference = OnnxrtRunner(lambda s=pipeline.sessions[name]: s, name=f"onnxruntime-{name}")
        results = Comparator.run([candidate(name), reference], data_loader=[OrderedDict(feeds[name])])
        exact = {spec.name: 0.0 for spec in manifest.io[name].outputs if spec.dtype in INTEGER_DTYPES}
        check = CompareFunc.simple(atol={"": atol, **exact}, rtol={"": 0.0, **exact}, check_shapes=True)
        verdicts[name] = bool(Comparator.compare_accuracy(results, compare_func=check))
        progress(f"{name:8s} {'match' if verdicts[name] else 'MISMATCH'}")
    return verdicts


def compare(directory, image=None, prompt: str = "What is in the image?", atol: float | None = None,
            progress=print) -> dict[str, bool]:
    """Each TensorRT plan of an engine built with BACKEND=tensorrt against ONNX Runtime."""
    import tensorrt as trt
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from iwp.export.tensorrt import check_plans, load_plugin
    from iwp.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_engine(Path(directory))
    plans = pipeline.manifest.tensorrt
    check_plans(plans, trt.__version__)
    load_plugin(trt.__version__)
    feeds = record(pipeline, image, prompt)

    def runner(name: str):
        plan = (Path(directory) / plans.plans[name].file).read_bytes()
        return TrtRunner(EngineFromBytes(plan), name=f"tensorrt-{name}")
    return compare_graphs(pipeline, feeds, runner, graphs=list(plans.plans), atol=atol, progress=progress)


def command(args) -> None:
    from iwp.export.tensorrt import resolve_backend
    resolve_backend("tensorrt")  # a clear one-line error where TensorRT is missing
    verdicts = compare(args.engine, args.image, args.prompt, args.atol)
    if not all(verdicts.values()):
        raise SystemExit(f"TensorRT and ONNX Runtime disagree on: {', '.join(k for k, v in verdicts.items() if not v)}")
