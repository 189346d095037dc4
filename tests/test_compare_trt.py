"""`iwp compare-trt`'s recording and comparison, exercised without TensorRT: the pipeline's observer records
each graph's real feeds in each phase (prefill, and decode for embed and the segments), and polygraphy's
Comparator holds ONNX Runtime against ONNX Runtime through the same path the TensorRT runners take,
including a candidate that disagrees, which it must catch and name."""
import numpy as np
import pytest
from polygraphy.backend.onnxrt import OnnxrtRunner

from iwp.demo import demo_image
from iwp.engine_format import Plan
from iwp.export.engine import EngineSpec, build
from iwp.runtime.pipeline import PREFILL_CHUNK, Pipeline
from iwp.tools.compare_trt import compare_graphs, disagreements, profile_index, record


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    spec = EngineSpec("tiny-llava-ov", "iwp", 48, max_text_tokens=48, max_new_tokens=4)
    return Pipeline.from_engine(build(spec, tmp_path_factory.mktemp("engines"), progress=lambda _: None))


@pytest.fixture(scope="module")
def feeds(pipeline):
    """Recorded from a pipeline that prefills in chunks of 7 tokens: the recording runs each segment over the
    whole prompt (TensorRT's prefill) and gives the pipeline its chunks back."""
    pipeline.prefill_chunk = 7
    recorded = record(pipeline)
    assert pipeline.prefill_chunk == 7
    pipeline.prefill_chunk = PREFILL_CHUNK
    return recorded


def runs(manifest) -> list[tuple[str, str]]:
    """Every run compare-trt checks, in the pipeline's order."""
    prefill = [(g.name, "prefill") for g in manifest.graphs]
    return prefill + [("embed", "decode")] + [(g.name, "decode") for g in manifest.segments()]


def test_recorder_keeps_each_graphs_first_feeds_in_each_phase(pipeline, feeds):
    m = pipeline.manifest
    assert [g.name for g in m.graphs] == ["embed", "vision", "segment.0", "select.0", "segment.1"]
    assert list(feeds) == runs(m)
    for (graph, _), recorded in feeds.items():
        assert list(recorded) == [t.name for t in m.io[graph].inputs]
    ids = m.find("embed", "inputs", "token_ids").name
    prompt_len = feeds[("embed", "prefill")][ids].shape[1]
    assert prompt_len < m.shapes.max_prompt                        # the prompt's real length, not padded
    assert feeds[("embed", "decode")][ids].shape == (1, 1)
    for segment in m.segments():
        hidden, offset = (m.find(segment.name, "inputs", role).name for role in ("hidden", "offset"))
        assert feeds[(segment.name, "prefill")][hidden].shape[1] == m.segment_prefill_len(segment, prompt_len)
        assert int(feeds[(segment.name, "prefill")][offset]) == 0
        assert feeds[(segment.name, "decode")][hidden].shape[1] == 1
        assert int(feeds[(segment.name, "decode")][offset]) == m.segment_prefill_len(segment, prompt_len)   # step 0
        assert feeds[(segment.name, "decode")][offset].shape == ()   # 0-d, as the graph (and TensorRT) takes it
    # decode's feeds are copies: the arena's buffers they were bound from are rewritten by later generations
    key = m.find("segment.0", "inputs", "key", layer=0).name
    before = feeds[("segment.0", "decode")][key].copy()
    assert before.any()                                             # the prefill's keys, in decode's past
    pipeline.generate_ids(demo_image(3), "Other colours?", 4)   # 3 decode steps: both arena sets rewritten
    assert np.array_equal(feeds[("segment.0", "decode")][key], before)
    assert not np.array_equal(pipeline.arena.key(0, 0), before) and not np.array_equal(pipeline.arena.key(1, 0), before)


def test_onnxruntime_against_itself_matches(pipeline, feeds):
    def same(graph, phase):
        return OnnxrtRunner(lambda s=pipeline.sessions[graph]: s, name=f"candidate-{graph}-{phase}")
    verdicts = compare_graphs(pipeline, feeds, same, progress=lambda _: None)
    assert verdicts == dict.fromkeys(runs(pipeline.manifest), True) and disagreements(verdicts) == []


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


@pytest.mark.parametrize("run, role, kwargs, delta", [
    (("segment.1", "decode"), "logits", {}, 1e-2),         # past a float tolerance of 1e-3
    (("select.0", "prefill"), "kept", {"stage": 0}, 0),    # a kept index off by one: integers must match exactly
    (("segment.0", "prefill"), "key", {"layer": 1}, 5e-3),
    (("segment.1", "prefill"), "logits", {}, 1e-2),        # the same graph's other phase is its own verdict
])
def test_a_disagreeing_candidate_is_caught(pipeline, feeds, run, role, kwargs, delta):
    output = pipeline.manifest.find(run[0], "outputs", role, **kwargs).name

    def candidate(graph, phase):
        return Corrupted(pipeline.sessions[graph], output if (graph, phase) == run else "", delta,
                         f"corrupted-{graph}-{phase}")
    verdicts = compare_graphs(pipeline, feeds, candidate, progress=lambda _: None)
    assert verdicts == {r: r != run for r in runs(pipeline.manifest)}
    assert disagreements(verdicts) == [f"{run[0]} ({run[1]})"]
    # within a tolerance that admits the change, the float corruption passes: the tolerance is what decides
    if delta:
        assert compare_graphs(pipeline, feeds, candidate, runs=[run], atol=2 * delta, progress=lambda _: None) \
            == {run: True}


def test_each_phase_takes_its_plans_profile():
    segment = Plan("segment.0.plan", ({"hidden": ((1, 1, 8), (1, 9, 8), (1, 9, 8))},
                                      {"hidden": ((1, 1, 8),) * 3}))
    embed = Plan("embed.plan", ({"input_ids": ((1, 1), (1, 9), (1, 9))},))
    assert [profile_index(segment, phase) for phase in ("prefill", "decode")] == [0, 1]
    assert [profile_index(embed, phase) for phase in ("prefill", "decode")] == [0, 0]
    assert profile_index(Plan("vision.plan", ()), "prefill") == 0
