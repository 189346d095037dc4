"""The pruned prefill exported to ONNX, with the selection as iwp nodes, against the PyTorch reference on
ONNX Runtime: identical kept indices at every stage, logits and present K/V within fp32 tolerance."""
import numpy as np
import onnx
import pytest
import torch

from iwp.demo import demo_image
from iwp.export.graphs import PREFILL_INPUTS, PrefillGraph, export
from iwp.inputs import make_batch
from iwp.plugins.visual_token_select import contract, make_method
from iwp.plugins.visual_token_select.ort_op import session

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


@torch.no_grad()
def test_decode_graph_on_onnxruntime_matches_pytorch_for_eight_steps(tiny, tiny_model):
    from iwp.export.graphs import DecodeGraph
    batch = make_batch(tiny, demo_image(4), "Where is the square?")
    method = make_method("iwp")
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 32)
    steps = 8
    pre = tiny_model.prefill(tiny_model.embed(batch), batch, method, plan, max_new_tokens=steps)
    graph = DecodeGraph(tiny_model, pre.cache.prefill_len)
    token = pre.logits[:, -1].argmax(-1)
    past = [t for layer in zip(pre.cache.keys, pre.cache.values, pre.cache.valid) for t in layer]
    embeds = tiny_model.embed_tokens(token)[:, None]
    args = (embeds, pre.next_position, torch.tensor(0), *past)
    model = export(graph, args, graph.input_names(), graph.output_names())
    sess = session(model)
    feeds_past = [t.numpy() for t in past]
    for step in range(steps):
        embeds = tiny_model.embed_tokens(token)[:, None]
        position = pre.next_position + step
        want = tiny_model.decode(token, position, pre.cache, step)         # PyTorch, in place on pre.cache
        got, *feeds_past = sess.run(None, dict(zip(graph.input_names(), [
            embeds.numpy(), position.numpy(), np.array(step, dtype=np.int64), *feeds_past])))
        np.testing.assert_allclose(got, want.numpy(), atol=TOL, rtol=0)
        assert int(got.argmax(-1)[0]) == int(want.argmax(-1)[0])
        token = want.argmax(-1)
    valid = feeds_past[2]
    assert valid.sum() == pre.cache.valid[0].sum() and valid.shape == tuple(pre.cache.valid[0].shape)


@torch.no_grad()
def test_vision_and_embed_graphs_match_hf(tiny, tiny_model):
    from iwp.export.graphs import EmbedGraph, VisionGraph
    batch = make_batch(tiny, [demo_image(1), demo_image(2)], ["a", "b"])
    vision = VisionGraph(tiny_model, tiny.resolution)
    model = export(vision, (batch.pixel_values,), ["pixel_values"], ["image_features"])
    (features,) = session(model).run(None, {"pixel_values": batch.pixel_values.numpy()})
    assert features.shape == (2, batch.n_visual, tiny.model.config.text_config.hidden_size)
    merged = tiny_model.embed(batch)  # HF's own image features, merged at the image tokens
    for i in range(2):
        start = int(batch.visual_start[i])
        np.testing.assert_allclose(features[i], merged[i, start:start + batch.n_visual].numpy(), atol=TOL, rtol=0)
    embed = export(EmbedGraph(tiny_model), (batch.input_ids,), ["input_ids"], ["inputs_embeds"])
    (embeds,) = session(embed).run(None, {"input_ids": batch.input_ids.numpy()})
    text = (batch.input_ids != tiny.processor.image_token_id).numpy()
    np.testing.assert_array_equal(embeds[text], merged.numpy()[text])


def test_polygraphy_comparator_checks_prefill_and_catches_a_mismatch(tiny, tiny_model):
    """polygraphy's Comparator over an OnnxrtRunner (with iwp's op registered) against the PyTorch module."""
    from iwp.export.parity import compare
    batch = make_batch(tiny, demo_image(3), "How many shapes are there?")
    method = make_method("iwp")
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 40)
    graph = PrefillGraph(tiny_model, batch, method, plan, max_new_tokens=4)
    args = graph.example_inputs(tiny_model.embed(batch))
    model = export(graph, args, PREFILL_INPUTS, graph.output_names())
    feeds = {name: a.numpy() for name, a in zip(PREFILL_INPUTS, args)}
    assert compare(model, graph, feeds)
    other = PrefillGraph(tiny_model, batch, make_method("random"), plan, max_new_tokens=4)  # other kept set
    assert not compare(model, other, feeds)
