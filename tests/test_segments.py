"""Format 4's graphs on ONNX Runtime against the PyTorch reference: the segments and selections of the
prefill (identical kept indices at every stage, logits and every layer's K/V within fp32 tolerance), eight
decode steps through every segment, the vision and embed graphs against HF, and each weight stored once."""
import numpy as np
import onnx
import pytest
import torch

from iwp.demo import demo_image
from iwp.export.engine import EngineSpec, build
from iwp.inputs import make_batch
from iwp.plugins.visual_token_select import contract, make_method
from iwp.runtime.pipeline import Pipeline

TOL = 1e-4  # fp32, across two runtimes' kernels
PROMPT = "What colour is the circle?"


class Logits:
    """Copies of the last segment's logits at each decode step (its bound buffer is reused)."""

    def __init__(self, manifest):
        self.last = manifest.segments()[-1].name
        self.name = manifest.find(self.last, "outputs", "logits").name
        self.steps = []

    def on_graph(self, name, feeds, outputs, seconds):
        if name == self.last:
            self.steps.append(outputs[self.name].copy())


@pytest.fixture(scope="module", params=[("iwp", 48), ("btp", 64), ("transprune", 64), ("none", None)],
                ids=lambda p: p[0])
def engine(request, tmp_path_factory):
    name, budget = request.param
    spec = EngineSpec("tiny-llava-ov", name, budget, max_text_tokens=48, max_new_tokens=8)
    return name, budget, Pipeline.from_engine(build(spec, tmp_path_factory.mktemp("engines"), progress=lambda _: None))


@torch.no_grad()
def test_segments_match_pytorch_in_prefill_and_eight_decode_steps(engine, tiny, tiny_model):
    name, budget, pipeline = engine
    m = pipeline.manifest
    batch = make_batch(tiny, demo_image(2), PROMPT)
    method = make_method(name) if budget else None
    plan = method.plan(tiny_model.n_layers, batch.n_visual, budget) if method else None
    pre = tiny_model.prefill(tiny_model.embed(batch), batch, method, plan, max_new_tokens=8)

    got = pipeline.prefill(pipeline.prepare(demo_image(2), PROMPT))
    assert got.prompt_len == batch.input_ids.shape[1]           # the prompt's own length: nothing padded
    assert len(m.segments()) == (len(plan.stages) + 1 if plan else 1)
    assert [k.tolist() for k in got.kept] == [k.tolist() for k in pre.kept]
    np.testing.assert_allclose(got.logits, pre.logits[0, -1].numpy(), atol=TOL, rtol=0)
    caches = iter(got.caches)
    for layer in range(m.model.n_layers):
        fill = pre.cache.prefill_len[layer]
        assert fill == m.segment_prefill_len(next(s for s in m.segments() if s.layers[0] <= layer < s.layers[1]),
                                             got.prompt_len)
        key, value, valid = next(caches), next(caches), next(caches)
        assert key.shape[2] == m.shapes.cache_len[layer] and valid[0, :fill].all() and not valid[0, fill:].any()
        np.testing.assert_allclose(key[:, :, :fill], pre.cache.keys[layer][:, :, :fill].numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(value[:, :, :fill], pre.cache.values[layer][:, :, :fill].numpy(), atol=TOL,
                                   rtol=0)

    observer = Logits(m)
    pipeline.observe(observer)
    try:
        ids = pipeline.decode(got, 8, stop_tokens=[])
    finally:
        pipeline.observe(None)
    token = pre.logits[:, -1].argmax(-1)
    assert ids[0] == int(token)
    for step, logits in enumerate(observer.steps):                # 7 decode steps after the prefill's token
        want = tiny_model.decode(token, pre.next_position + step, pre.cache, step)
        np.testing.assert_allclose(logits, want.numpy(), atol=TOL, rtol=0)
        token = want.argmax(-1)
        assert ids[step + 1] == int(token)
    assert len(observer.steps) == 7


class SegmentRuns:
    """The offset and token count of every run of one segment."""

    def __init__(self, graph: str):
        self.graph, self.runs = graph, []

    def on_graph(self, name, feeds, outputs, seconds):
        if name == self.graph:
            self.runs.append((int(feeds["offset"]), feeds["hidden"].shape[1]))


def test_a_prompt_run_in_chunks_gives_the_whole_prompts_prefill(engine):
    """A segment's prefill in chunks (consecutive runs at increasing offsets, each reading the caches the last
    wrote) keeps the same tokens at every stage, and the same logits, caches and greedy tokens, as one run."""
    _, _, pipeline = engine
    m = pipeline.manifest
    chunked = Pipeline(m, pipeline.processor, pipeline.sessions, prefill_chunk=13)
    batch = pipeline.prepare(demo_image(2), PROMPT)
    whole = Pipeline(m, pipeline.processor, pipeline.sessions, prefill_chunk=None).prefill(batch)
    runs = SegmentRuns("segment.0")
    chunked.observe(runs)
    got = chunked.prefill(batch)
    chunked.observe(None)
    tokens = batch.input_ids.shape[1]
    assert runs.runs == [(start, min(13, tokens - start)) for start in range(0, tokens, 13)] and len(runs.runs) > 2
    assert [k.tolist() for k in got.kept] == [k.tolist() for k in whole.kept]
    np.testing.assert_allclose(got.logits, whole.logits, atol=TOL, rtol=0)
    assert len(got.caches) == len(whole.caches)
    for a, b in zip(got.caches, whole.caches):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    assert chunked.decode(got, 8, stop_tokens=[]) == pipeline.decode(whole, 8, stop_tokens=[])


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_a_bad_prefill_chunk_is_refused(engine, chunk):
    _, _, pipeline = engine
    with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens"):
        Pipeline(pipeline.manifest, pipeline.processor, pipeline.sessions, prefill_chunk=chunk)


def _initializer_bytes(path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer)


def test_each_decoder_weight_is_stored_once(engine, tiny_model):
    """Every decoder weight is in exactly one segment (the segments together hold the decoder's bytes, not
    twice them), the token table is a file of its own, and the only copies are the named ones: each
    selection's layer norm and q/k/v."""
    name, budget, pipeline = engine
    m, directory = pipeline.manifest, pipeline.directory
    w = m.weights
    copies = sum(c.bytes for c in w.copies)
    assert [c.graph for c in w.copies] == [g.name for g in m.selects()]
    per_graph = {g.name: _initializer_bytes(directory / f"{g.name}.onnx") for g in m.graphs}
    table = (directory / m.token_table.file).stat().st_size
    assert w.stored_bytes == sum(per_graph.values()) + table <= w.distinct_bytes + copies
    decoder = sum(p.numel() * p.element_size() for module in (tiny_model.layers, tiny_model.norm, tiny_model.lm_head)
                  for p in module.parameters())
    segments = sum(per_graph[g.name] for g in m.segments())
    # once, not twice: within 1% (the exporter folds identical all-ones norms; RoPE adds its frequencies)
    assert decoder * 0.99 <= segments <= decoder * 1.01 + 4096
    selects = sum(per_graph[g.name] for g in m.selects())
    assert copies <= selects <= copies + (16 << 10) * len(m.selects())   # plus the crop grid's token coordinates
    vocab, hidden = m.token_table.shape
    assert table == vocab * hidden * 4
    for graph in m.graphs:
        proto = onnx.load(str(directory / f"{graph.name}.onnx"), load_external_data=False)
        nodes = [n for n in proto.graph.node if n.op_type == contract.OP_TYPE]
        assert len(nodes) == (1 if graph.kind == "select" else 0)
    stored = np.fromfile(directory / m.token_table.file, dtype=np.float32).reshape(vocab, hidden)
    assert np.array_equal(stored, tiny_model.embed_tokens.weight.detach().numpy())


def test_tied_lm_head_reads_the_token_table(tmp_path):
    """ovqa-small ties its LM head to the token table (as 0.5b does): the last segment takes the table as an
    input, no graph stores it, and the engine keeps the reference's tokens."""
    from iwp.model import PrunedLlavaOnevision
    from iwp.zoo import load
    spec = EngineSpec("ovqa-small", "iwp", 32, max_text_tokens=48, max_new_tokens=8)
    pipeline = Pipeline.from_engine(build(spec, tmp_path, progress=lambda _: None))
    m = pipeline.manifest
    assert m.token_table.tied and m.find(m.segments()[-1].name, "inputs", "token_table").shape == \
        tuple(m.token_table.shape)
    for graph in m.graphs:
        proto = onnx.load(str(pipeline.directory / f"{graph.name}.onnx"), load_external_data=False)
        assert not any(list(t.dims) == list(m.token_table.shape) for t in proto.graph.initializer), graph.name
    loaded = load("ovqa-small")
    model = PrunedLlavaOnevision(loaded.model)
    image, prompt = demo_image(3, tuple(m.model.resolution[::-1])), "What colour is the circle?"
    batch = make_batch(loaded, image, prompt)
    method = make_method("iwp")
    reference, pre = model.generate(batch, method, method.plan(model.n_layers, batch.n_visual, 32), 8)
    ids, kept = pipeline.generate_ids(image, prompt, 8)
    assert kept[0].tolist() == pre.kept[0].tolist()
    assert ids == reference[0].tolist()[:len(ids)] and ids


@torch.no_grad()
def test_vision_and_embed_graphs_match_hf(engine, tiny, tiny_model):
    _, _, pipeline = engine
    m, run = pipeline.manifest, pipeline.graphs.run
    batch = make_batch(tiny, demo_image(1), "a")
    features = run("vision", {"pixels": batch.pixel_values.numpy()})[m.find("vision", "outputs", "features").name]
    merged = tiny_model.embed(batch)  # HF's own image features, merged at the image tokens
    start = int(batch.visual_start[0])
    np.testing.assert_allclose(features[0], merged[0, start:start + batch.n_visual].numpy(), atol=TOL, rtol=0)
    embeds = run("embed", {"token_ids": batch.input_ids.numpy()})[m.find("embed", "outputs", "embeddings").name]
    text = (batch.input_ids != tiny.processor.image_token_id).numpy()
    np.testing.assert_array_equal(embeds[text], merged.numpy()[text])


def test_polygraphy_comparator_checks_a_select_graph_and_catches_a_mismatch(tiny, tiny_model):
    """polygraphy's Comparator over an OnnxrtRunner (with iwp's op registered) against the PyTorch module."""
    from iwp.export.graphs import Decoder, SelectGraph, export, graph_jobs, names
    from iwp.export.parity import compare
    from iwp.inputs import fit_capacity
    batch = make_batch(tiny, demo_image(3), "How many shapes are there?")
    method = make_method("iwp")
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 40)
    decoder = Decoder.of(tiny_model, method, plan, batch.n_visual)
    length = batch.n_visual + 64
    batch = fit_capacity(batch, length)
    cache_len = [length - batch.n_visual + k + 4 for k in plan.tokens_per_layer]
    for graph, module, args, dynamic in graph_jobs(tiny_model, decoder, method, tiny, batch, length, cache_len):
        if graph["kind"] == "select":
            break
    inputs, outputs = decoder.tensors(graph)
    model = export(module, args, names(inputs), names(outputs), dynamic)
    feeds = {name: a.numpy() for name, a in zip(names(inputs), args)}
    assert compare(model, module, feeds)
    other = SelectGraph(tiny_model, decoder, make_method("random"), 0, batch.visual_xy[None])  # other kept set
    assert not compare(model, other, feeds)
