"""`iwp compare-trt`'s recording and comparison, exercised without TensorRT: the pipeline's observer records
each graph's real feeds, and polygraphy's Comparator holds ONNX Runtime against ONNX Runtime through the same
path the TensorRT runners take, including a candidate that disagrees, which it must catch."""
import numpy as np
import pytest
from polygraphy.backend.onnxrt import OnnxrtRunner

from iwp.demo import demo_image
from iwp.export.engine import EngineSpec, build
from iwp.runtime.pipeline import Pipeline
from iwp.tools.compare_trt import compare_graphs, record


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    spec = EngineSpec("tiny-llava-ov", "iwp", 48, max_text_tokens=48, max_new_tokens=4)
    return Pipeline.from_engine(build(spec, tmp_path_factory.mktemp("engines"), progress=lambda _: None))


@pytest.fixture(scope="module")
def feeds(pipeline):
    return record(pipeline)


def test_recorder_keeps_every_graphs_first_feeds_by_the_manifests_names(pipeline, feeds):
    io = pipeline.manifest.io
    assert set(feeds) == {"embed", "vision", "prefill", "decode"}
    for graph, recorded in feeds.items():
        assert list(recorded) == [t.name for t in io[graph].inputs]
    assert feeds["embed"][io["embed"].inputs[0].name].shape == (1, pipeline.manifest.shapes.max_prompt)  # the prompt's
    step = pipeline.manifest.find("decode", "inputs", "step").name
    assert int(feeds["decode"][step]) == 0
    # decode's feeds are copies: the arena's buffers they were bound from are rewritten by later generations
    key = pipeline.manifest.find("decode", "inputs", "key", layer=0).name
    before = feeds["decode"][key].copy()
    pipeline.generate_ids(demo_image(3), "Other colours?", 4)   # 3 decode steps: both arena sets rewritten
    assert np.array_equal(feeds["decode"][key], before)
    assert not np.array_equal(pipeline.arena.key(0, 0), before) and not np.array_equal(pipeline.arena.key(1, 0), before)


def test_onnxruntime_against_itself_matches(pipeline, feeds):
    same = lambda name: OnnxrtRunner(lambda s=pipeline.sessions[name]: s, name=f"candidate-{name}")  # noqa: E731
    assert compare_graphs(pipeline, feeds, same, progress=lambda _: None) == dict.fromkeys(
        ("embed", "vision", "prefill", "decode"), True)


class Corrupted(OnnxrtRunner):
    """ONNX Runtime with one output changed after the run: a float by `delta`, or an integer by one."""

    def __init__(self, session, output: str, delta: float, name: str):
        super().__init__(lambda: session, name=name)
        self.output, self.delta = output, delta

    def infer_impl(self, feed_dict, *args, **kwargs):
        outputs = super().infer_impl(feed_dict, *args, **kwargs)
        if self.output in outputs:
            value = np.asarray(outputs[self.output])
            outputs[self.output] = (value + self.delta if value.dtype.kind == "f" else value + 1).astype(value.dtype)
        return outputs


@pytest.mark.parametrize("graph, role, kwargs, delta", [
    ("decode", "logits", {}, 1e-2),                 # past a float tolerance of 1e-3
    ("prefill", "kept", {"stage": 0}, 0),           # a kept index off by one: integers must match exactly
    ("prefill", "key", {"layer": 3}, 5e-3),
])
def test_a_disagreeing_candidate_is_caught(pipeline, feeds, graph, role, kwargs, delta):
    output = pipeline.manifest.find(graph, "outputs", role, **kwargs).name

    def candidate(name):
        return Corrupted(pipeline.sessions[name], output if name == graph else "", delta, f"corrupted-{name}")
    verdicts = compare_graphs(pipeline, feeds, candidate, progress=lambda _: None)
    assert verdicts == {name: name != graph for name in ("embed", "vision", "prefill", "decode")}
    # within a tolerance that admits the change, the float corruption passes: the tolerance is what decides
    if delta:
        assert compare_graphs(pipeline, feeds, candidate, graphs=[graph], atol=2 * delta, progress=lambda _: None) \
            == {graph: True}
