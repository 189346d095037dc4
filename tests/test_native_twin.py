"""SELECT=native: the selection inlined as plain ONNX ops (TopK, ArgMax, Gather...), no custom op, so any
ONNX runtime (and TensorRT without the plugin) runs it. It must give the plugin node's indices."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from iwp.demo import demo_image
from iwp.export.graphs import PREFILL_INPUTS, PrefillGraph, export
from iwp.inputs import make_batch
from iwp.plugins.visual_token_select import METHODS, make_method
from iwp.plugins.visual_token_select.ort_op import session


def _plain_session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_native_twin_gives_the_plugin_nodes_indices(tiny, tiny_model, name):
    batch = make_batch(tiny, demo_image(6), "Which shape is on the left?")
    method = make_method(name)
    budget = 72 if name in ("btp", "transprune") else 24  # average-per-layer budgets need more
    plan = method.plan(tiny_model.n_layers, batch.n_visual, budget)
    args = PrefillGraph(tiny_model, batch, method, plan).example_inputs(tiny_model.embed(batch))
    feeds = {n: a.numpy() for n, a in zip(PREFILL_INPUTS, args)}
    outputs = {}
    for native in (False, True):
        graph = PrefillGraph(tiny_model, batch, method, plan, native=native)
        model = export(graph, args, PREFILL_INPUTS, graph.output_names())
        has_plugin = any(node.domain == "iwp" for node in model.graph.node)
        assert has_plugin != native
        outputs[native] = (_plain_session(model) if native else session(model)).run(None, feeds)
    for stage in range(len(plan.stages)):
        assert outputs[True][1 + stage].tolist() == outputs[False][1 + stage].tolist()
    np.testing.assert_allclose(outputs[True][0], outputs[False][0], atol=1e-4, rtol=0)


def test_stable_sort_translation_breaks_ties_by_lower_index():
    class Sort(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=-1, descending=True, stable=True).indices

    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    model = export(Sort(), (x,), ["x"], ["indices"])
    (got,) = _plain_session(model).run(None, {"x": x.numpy()})
    assert got.tolist() == Sort()(x).tolist() == [[1, 2, 4, 0, 5, 3], [0, 1, 2, 3, 4, 5]]


def test_native_engine_generates_the_plugin_engines_tokens(tmp_path):
    from iwp.export.engine import EngineSpec, build
    from iwp.runtime.pipeline import Pipeline
    tokens = {}
    for select in ("plugin", "native"):
        spec = EngineSpec("tiny-llava-ov", "iwp", 32, max_text_tokens=48, max_new_tokens=8, select=select)
        directory = build(spec, tmp_path, progress=lambda _: None)
        assert ("-native-" in directory.name) == (select == "native"), directory.name
        pipeline = Pipeline.from_engine(directory)
        assert pipeline.manifest.select == select
        tokens[select] = pipeline.generate_ids(demo_image(7), "What is here?", 8)
    assert tokens["native"][0] == tokens["plugin"][0]
    assert tokens["native"][1][0].tolist() == tokens["plugin"][1][0].tolist()
