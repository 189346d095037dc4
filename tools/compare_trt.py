"""`iwp compare-trt`: each TensorRT plan of an engine against ONNX Runtime, on the same real inputs.

A run is one graph in one phase: (graph, "prefill") and, for the graphs decode runs again (embed and every
segment, one token), (graph, "decode"). A segment's plan takes each phase through its own optimization profile
(export/tensorrt.py: PREFILL, DECODE), so both are compared.

The inputs are recorded from one short generation through the pipeline's observer (`Recorder`): the feeds of
each graph's first run in each phase. polygraphy's Comparator then runs each of those through two runners and
compares the outputs: integer and boolean outputs (kept indices, cache validity) exactly, float outputs
within atol (1e-3 fp32, 2e-2 fp16).

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
PHASES = ("prefill", "decode")


class Recorder:
    """An observer of the pipeline that keeps a copy of the feeds of each graph's first run in each phase,
    by (graph, phase). A graph's first run is its prefill's; decode runs embed and the segments again."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.feeds: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def on_graph(self, name, feeds, outputs, seconds) -> None:
        phase = "decode" if (name, "prefill") in self.feeds else "prefill"
        if (name, phase) in self.feeds:
            return
        # decode's feeds are the arena's buffers, rewritten by later steps: copy
        self.feeds[(name, phase)] = {key: np.array(value, copy=True) for key, value in feeds.items()}


def record(pipeline, image=None, prompt: str = "What is in the image?") -> dict[tuple[str, str], dict]:
    """Each graph's feeds in each phase of one generation of two tokens (so decode runs once)."""
    from iwp.demo import demo_image
    image = image or demo_image(0, tuple(pipeline.manifest.model.resolution[::-1]))
    if pipeline.max_new_tokens < 2:
        raise ValueError(f"engine {pipeline.directory} has room for {pipeline.max_new_tokens} new token, so its decode "
                         f"step never runs; build it with --max-new-tokens 2 or more to compare it")
    recorder = Recorder(pipeline.manifest)
    pipeline.observe(recorder)
    # TensorRT's prefill runs each segment once over the whole prompt, so the feeds to compare are one run's
    chunk, pipeline.prefill_chunk = pipeline.prefill_chunk, None
    try:   # no stop token: decode runs even when the first token is EOS
        pipeline.decode(pipeline.prefill(pipeline.prepare(image, prompt)), 2, stop_tokens=[])
    finally:
        pipeline.observe(None)
        pipeline.prefill_chunk = chunk
    return recorder.feeds


def default_atol(manifest) -> float:
    return 2e-2 if manifest.dtype == "fp16" else 1e-3


def profile_index(plan, phase: str) -> int:
    """The optimization profile a plan (engine_format.Plan) takes a phase through: a segment's DECODE profile
    for its decode step, profile 0 for everything else (embed has one range for both)."""
    from iwp.export.tensorrt import DECODE, PREFILL
    return DECODE if phase == "decode" and len(plan.profiles) > DECODE else PREFILL


def compare_graphs(pipeline, feeds: dict, candidate: Callable[[str, str], object], runs=None,
                   atol: float | None = None, progress=print) -> dict[tuple[str, str], bool]:
    """Each recorded run (graph, phase) through `candidate(graph, phase)` (a polygraphy runner) against the
    pipeline's own ONNX Runtime session on the same feeds: True where every output agrees."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    try:   # polygraphy 0.53 and later; CompareFunc.simple, its older spelling, goes in 0.60
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:
        from polygraphy.comparator import CompareFunc
        SimpleCompareFunc = CompareFunc.simple

    manifest = pipeline.manifest
    atol = default_atol(manifest) if atol is None else atol
    verdicts = {}
    for graph, phase in runs or feeds:
        reference = OnnxrtRunner(lambda s=pipeline.sessions[graph]: s, name=f"onnxruntime-{graph}-{phase}")
        results = Comparator.run([candidate(graph, phase), reference],
                                 data_loader=[OrderedDict(feeds[(graph, phase)])])
        exact = {spec.name: 0.0 for spec in manifest.io[graph].outputs if spec.dtype in INTEGER_DTYPES}
        check = SimpleCompareFunc(atol={"": atol, **exact}, rtol={"": 0.0, **exact}, check_shapes=True)
        verdicts[(graph, phase)] = bool(Comparator.compare_accuracy(results, compare_func=check))
        progress(f"{graph:10s} {phase:7s} {'match' if verdicts[(graph, phase)] else 'MISMATCH'}")
    return verdicts


def compare(directory, image=None, prompt: str = "What is in the image?", atol: float | None = None,
            progress=print) -> dict[tuple[str, str], bool]:
    """Each TensorRT plan of an engine built with BACKEND=tensorrt against ONNX Runtime, in each phase."""
    import tensorrt as trt
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from iwp.export.tensorrt import check_plans, load_plugin
    from iwp.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_engine(Path(directory))
    plans = pipeline.manifest.tensorrt
    check_plans(plans, trt.__version__)
    load_plugin(trt.__version__)
    feeds = record(pipeline, image, prompt)
    missing = sorted({graph for graph, _ in feeds} - set(plans.plans))
    if missing:
        raise ValueError(f"engine {directory} records no plan for {', '.join(missing)}; rebuild it with "
                         "`make engine BACKEND=tensorrt`")
    engines = {}

    def runner(graph: str, phase: str):
        plan = plans.plans[graph]
        if graph not in engines:   # one deserialized engine per plan; each runner makes its own context
            engines[graph] = EngineFromBytes((Path(directory) / plan.file).read_bytes())()
        return TrtRunner(engines[graph], name=f"tensorrt-{graph}-{phase}",
                         optimization_profile=profile_index(plan, phase))
    return compare_graphs(pipeline, feeds, runner, atol=atol, progress=progress)


def disagreements(verdicts: dict[tuple[str, str], bool]) -> list[str]:
    """The runs that disagree, as `graph (phase)`."""
    return [f"{graph} ({phase})" for (graph, phase), same in verdicts.items() if not same]


def command(args) -> None:
    from iwp.export.tensorrt import resolve_backend
    resolve_backend("tensorrt")  # a clear one-line error where TensorRT is missing
    wrong = disagreements(compare(args.engine, args.image, args.prompt, args.atol))
    if wrong:
        raise SystemExit(f"TensorRT and ONNX Runtime disagree on: {', '.join(wrong)}; see the mismatches above")
