"""The pruned prefill exported to ONNX, with the selection as iwp nodes, against the PyTorch reference on
ONNX Runtime: identical kept indices at every stage, logits and present K/V within fp32 tolerance."""
import numpy as np
import onnx
import pytest

from iwp.demo import demo_image
from iwp.export.graphs import PREFILL_INPUTS, PrefillGraph, export
from iwp.inputs import make_batch
from iwp.plugins.visual_token_select import contract, make_method
from iwp.runtime.ort_ops import session

TOL = 1e-4  # fp32, across two runtimes' kernels


@pytest.mark.parametrize("name, budget", [("iwp", 48), ("btp", 64)])
def test_prefill_on_onnxruntime_matches_pytorch(tiny, tiny_model, name, budget):
    batch = make_batch(tiny, demo_image(2), "What colour is the circle?")
    method = make_method(name)
    plan = method.plan(tiny_model.n_layers, batch.n_visual, budget)
    graph = PrefillGraph(tiny_model, batch, method, plan)
    args = graph.example_inputs(tiny_model.embed(batch))
    model = export(graph, args, PREFILL_INPUTS, graph.output_names())

    nodes = [n for n in model.graph.node if n.op_type == contract.OP_TYPE]
    assert len(nodes) == len(plan.stages) and {n.domain for n in nodes} == {"iwp"}
    inferred = onnx.shape_inference.infer_shapes(model)
    assert [o.name for o in inferred.graph.output] == graph.output_names()

    sess = session(model)
    outputs = sess.run(None, {name: a.numpy() for name, a in zip(PREFILL_INPUTS, args)})
    reference = [t.numpy() for t in graph(*args)]
    n_stages = len(plan.stages)
    for stage in range(n_stages):
        assert outputs[1 + stage].tolist() == reference[1 + stage].tolist(), f"stage {stage} kept differ"
    np.testing.assert_allclose(outputs[0], reference[0], atol=TOL, rtol=0)
    for got, want in zip(outputs[1 + n_stages:], reference[1 + n_stages:]):
        assert got.shape == want.shape  # per-layer lengths after pruning
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
