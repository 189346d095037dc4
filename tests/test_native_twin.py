"""SELECT=native: the selection inlined as plain ONNX ops (TopK, ArgMax, Gather...), no custom op, so any
ONNX runtime (and TensorRT without the plugin) runs it. It must give the plugin node's indices."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from iwp.demo import demo_image
from iwp.export.graphs import Decoder, SelectGraph, export, graph_jobs, names
from iwp.inputs import fit_capacity, make_batch
from iwp.plugins.visual_token_select import METHODS, make_method
from iwp.plugins.visual_token_select.ort_op import session


def _plain_session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_native_twin_gives_the_plugin_nodes_indices(tiny, tiny_model, name):
    """Every select graph of the method's engine, exported with the op and as the twin, on the same inputs."""
    batch = make_batch(tiny, demo_image(6), "Which shape is on the left?")
    method = make_method(name)
    budget = 72 if name in ("btp", "transprune") else 24  # average-per-layer budgets need more
    plan = method.plan(tiny_model.n_layers, batch.n_visual, budget)
    decoder = Decoder.of(tiny_model, method, plan, batch.n_visual)
    length = batch.n_visual + 64
    batch = fit_capacity(batch, length)
    cache_len = [length - batch.n_visual + k + 4 for k in plan.tokens_per_layer]
    stages = 0
    for graph, module, args, dynamic in graph_jobs(tiny_model, decoder, method, tiny, batch, length, cache_len):
        if graph["kind"] != "select":
            continue
        inputs, outputs = (names(t) for t in decoder.tensors(graph))
        feeds = {n: a.numpy() for n, a in zip(inputs, args)}
        results = {}
        for native in (False, True):
            twin = SelectGraph(tiny_model, decoder, method, graph["stage"], batch.visual_xy[None], native=native)
            model = export(twin, args, inputs, outputs, dynamic)
            assert any(node.domain == "iwp" for node in model.graph.node) != native
            results[native] = (_plain_session(model) if native else session(model)).run(None, feeds)
        assert results[True][0].tolist() == results[False][0].tolist(), graph["name"]      # the kept indices
        for got, want in zip(results[True][1:], results[False][1:]):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        stages += 1
    assert stages == len(plan.stages)


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
