"""Engine directories and the ONNX Runtime pipeline: parity with the PyTorch reference, atomic and cached
builds, and one-line errors for a damaged or mismatched engine."""
import json
import re
import shutil

import numpy as np
import pytest

from iwp.demo import demo_image
from iwp.export.engine import EngineSpec, build
from iwp.inputs import make_batch
from iwp.plugins.visual_token_select import make_method
from iwp.runtime.pipeline import Pipeline, Sampler, read_manifest

SPEC = EngineSpec("tiny-llava-ov", "iwp", 64, max_text_tokens=96, max_new_tokens=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(SPEC, tmp_path_factory.mktemp("engines"), progress=lambda _: None)


@pytest.fixture(scope="module")
def pipeline(built):
    return Pipeline.from_engine(built)


def test_greedy_32_tokens_and_kept_indices_match_pytorch(pipeline, tiny, tiny_model):
    prompt = "What colour is the circle?"
    ids, kept = pipeline.generate_ids(demo_image(5), prompt, 32)
    batch = make_batch(tiny, demo_image(5), prompt)
    method = make_method("iwp")
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 64)
    reference, pre = tiny_model.generate(batch, method, plan, 32, tiny.processor.tokenizer.eos_token_id)
    assert kept[0].tolist() == pre.kept[0].tolist()
    assert ids == reference[0].tolist() and len(ids) == 32


def test_manifest_records_the_resolved_build(built):
    manifest = read_manifest(built)
    assert manifest.format == 4
    assert manifest.method.config["lam"] == 0.3 and manifest.method.stages == ((2, 64),)
    assert manifest.method.nodes[0]["plugin_namespace"] == "iwp" and manifest.method.options == {}
    assert manifest.shapes.max_prompt == 336 + 96
    assert [(g.name, g.kind, g.layers, g.stage) for g in manifest.graphs] == [
        ("embed", "embed", None, None), ("vision", "vision", None, None), ("segment.0", "segment", (0, 2), None),
        ("select.0", "select", None, 0), ("segment.1", "segment", (2, 8), None)]
    first, second = manifest.segments()
    assert manifest.segment_prefill_len(first, 400) == 400 and manifest.segment_prefill_len(second, 400) == 400 - 336 + 64
    assert manifest.shapes.cache_len[0] == 96 + 336 + 32 and manifest.shapes.cache_len[2] == 96 + 64 + 32
    assert manifest.token_table.shape == (manifest.model.vocab_size, manifest.model.hidden_size)
    assert not manifest.token_table.tied and manifest.weights.copies[0].graph == "select.0"
    assert 0 < manifest.flops.ratio < 1
    assert set(manifest.files) >= {"embed.onnx", "vision.onnx", "segment.0.onnx", "select.0.onnx", "segment.1.onnx",
                                   "token_table.bin"}
    assert {"torch", "transformers", "onnx", "onnxruntime", "iwp"} <= set(manifest.tools)


def test_io_section_is_each_graphs_own_names_shapes_and_dtypes(built):
    """The io section is read off the exported graphs: same names in the same order, symbolic dims by name."""
    import onnx
    manifest = read_manifest(built)
    for graph, io in manifest.io.items():
        model = onnx.load(built / f"{graph}.onnx", load_external_data=False).graph
        for recorded, values in ((io.inputs, model.input), (io.outputs, model.output)):
            assert [t.name for t in recorded] == [v.name for v in values]
            assert [list(t.shape) for t in recorded] == [[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                                                         for v in values]
    assert manifest.find("embed", "inputs", "token_ids").shape == (1, "tokens")
    assert manifest.find("select.0", "outputs", "kept", stage=0).dtype == "int64"
    assert manifest.find("select.0", "outputs", "hidden").shape == (1, "tokens - 272", 64)   # 336 -> 64 kept
    valid = manifest.find("segment.1", "inputs", "valid", layer=3)
    assert valid.dtype == "bool" and valid.shape == (1, manifest.shapes.cache_len[3])
    assert [t.role for t in manifest.io["segment.1"].inputs[:3]] == ["hidden", "positions", "offset"]
    assert manifest.find("segment.1", "inputs", "hidden").shape == (1, "tokens", 64)        # prefill or one token
    with pytest.raises(ValueError, match="segment.0 has no key .layer 2. input"):
        manifest.find("segment.0", "inputs", "key", layer=2)                                # layer 2 is segment.1's


def test_rebuild_with_the_same_inputs_is_reused(built):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    again = build(SPEC, built.parent, progress=lambda _: None)
    assert again == built and {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


def test_build_over_a_damaged_engine_rebuilds_it(built, tmp_path):
    """`iwp engine`, the advised fix, works over any damage: a manifest of another shape is rebuilt, not read."""
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    (copy / "manifest.json").write_text('{"format": 3, "files": {}}')
    assert build(SPEC, tmp_path, progress=lambda _: None) == copy
    assert read_manifest(copy).inputs_hash == read_manifest(built).inputs_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == [built.name]       # no staging or .old directories


def test_interrupted_build_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    from iwp.export import graphs
    calls = []
    original = graphs.export_program

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(graphs, "export_program", failing)
    with pytest.raises(KeyboardInterrupt):
        build(SPEC, tmp_path, progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
    (lambda d: (d / "segment.1.onnx").unlink(), "segment.1.onnx is missing"),
    (lambda d: (d / "token_table.bin").unlink(), "token_table.bin is missing"),
    (lambda d: (d / "token_table.bin").write_bytes(b"garbage"), "token_table.bin does not match the hash"),
    (lambda d: (d / "segment.0.onnx").write_bytes(b"garbage"), "segment.0.onnx does not match the hash"),
    (lambda d: _edit_manifest(d, format=99), "manifest format 99"),
    (lambda d: _edit_manifest(d, format=3), "manifest format 3 is not this iwp's format 4"),   # the older layout
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "manifest.json is an array, not an object"),
    (lambda d: (d / "manifest.json").write_text('{"format": 4, "files": {}}'), "field inputs_hash is missing"),
    (lambda d: _edit_graphs(d, lambda g: g.pop(3)), "graphs[3] is a segment after a segment"),
    (lambda d: _edit_graphs(d, lambda g: g[4].update(layers=[3, 8])), "graphs[4].layers is [3, 8], not a range"),
    (lambda d: (d / "manifest.json").write_text('{"format": 2, "files": {}}'), "manifest format 2"),
    (lambda d: _edit_manifest(d, model="tiny"), "field model is a string, not an object"),
    (lambda d: _edit_io(d, "segment.0", "inputs", 4, layer="0"),
     'io["segment.0"].inputs[4].layer is a string, not an integer'),
    (lambda d: _edit_io(d, "segment.0", "inputs", 0, role="pixels"), 'io["segment.0"].inputs[0].role is "pixels"'),
    (lambda d: _swap_graph(d, "embed", "vision"), "vision.onnx is not the vision graph of this engine"),
    (lambda d: _swap_graph(d, "segment.0", "segment.1"), "segment.1.onnx is not the segment.1 graph"),
    (lambda d: _edit_io(d, "select.0", "outputs", 0, name="renamed"), "select.0.onnx is not the select.0 graph"),
])
def test_damaged_engine_gets_one_line_error(built, tmp_path, damage, words):
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    damage(copy)
    with pytest.raises(ValueError, match=re.escape(words)) as err:
        Pipeline.from_engine(copy)
    assert "\n" not in str(err.value) and "make engine" in str(err.value)


def _edit_manifest(directory, **changes):
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(changes)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _edit_io(directory, graph, kind, index, **changes):
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["io"][graph][kind][index].update(changes)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _edit_graphs(directory, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest["graphs"])
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _swap_graph(directory, source, target):
    """`target`.onnx replaced by a copy of `source`.onnx, with its hash in the manifest edited to match."""
    from iwp.engine_format import sha256
    shutil.copy(directory / f"{source}.onnx", directory / f"{target}.onnx")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][f"{target}.onnx"] = sha256(directory / f"{target}.onnx")
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_missing_engine_and_wrong_budget(built, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Pipeline.from_engine(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not an engine directory"):
        Pipeline.from_engine(tmp_path / "file")
    with pytest.raises(ValueError, match="built for budget 64, not 128"):
        Pipeline.from_engine(built, budget=128)


def test_prompt_past_capacity_names_the_capacity(pipeline):
    with pytest.raises(ValueError, match="capacity is 432"):
        pipeline.generate_ids(demo_image(0), "word " * 200, 4)
    for steps in (33, 0, -1, 2.0, True):   # 0 is refused, not read as "the default"
        with pytest.raises(ValueError, match="max_new_tokens must be in 1..32"):
            pipeline.generate_ids(demo_image(0), "hi", steps)
    for prompt in (None, ["hi"], 3):
        with pytest.raises(TypeError, match="prompt must be a string"):
            pipeline.generate_ids(demo_image(0), prompt, 2)


def test_public_steps_compose_to_generate_ids_and_the_observer_sees_every_graph_run(pipeline):
    """prepare -> prefill -> decode is generate_ids; one observer sees each graph run, decode steps included
    (the arrays bound through IOBinding), by the names the manifest records, with their seconds."""
    seen = []

    class Observer:
        def on_graph(self, name, feeds, outputs, seconds):
            seen.append((name, list(feeds), list(outputs), seconds))
    image, prompt = demo_image(5), "What colour is the circle?"
    expected, kept = pipeline.generate_ids(image, prompt, 5)
    batch = pipeline.prepare(image, prompt)
    pipeline.observe(Observer())
    try:
        pre = pipeline.prefill(batch)
        ids = pipeline.decode(pre, 5)
    finally:
        pipeline.observe(None)
    assert ids == expected and [k.tolist() for k in pre.kept] == [k.tolist() for k in kept]
    assert pre.logits.shape == (pipeline.manifest.model.vocab_size,) and len(pre.caches) == 3 * pipeline.manifest.model.n_layers
    io = pipeline.manifest.io
    prefill = ["embed", "vision", "segment.0", "select.0", "segment.1"]
    assert [name for name, *_ in seen] == prefill + ["embed", "segment.0", "segment.1"] * 4   # 5 tokens: 4 steps
    for name, feeds, outputs, seconds in seen:
        assert feeds == [t.name for t in io[name].inputs] and outputs == [t.name for t in io[name].outputs]
        assert seconds > 0
    seen.clear()
    pipeline.generate_ids(image, prompt, 2)
    assert seen == []                       # observe(None) detached it


def test_sampler_is_seeded_and_top_p_narrows():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 3.0])
    draws = [Sampler(1.0, 1.0, seed=7)(logits) for _ in range(3)]
    assert len(set(draws)) == 1                                   # same seed, same draw
    spread = {Sampler(1.0, 1.0, seed=s)(logits) for s in range(50)}
    assert len(spread) > 1
    assert {Sampler(1.0, 1e-6, seed=s)(logits) for s in range(20)} == {4}  # top-p ~0 is greedy
    assert Sampler()(logits) == 4
    with pytest.raises(ValueError):
        Sampler(-1.0)


def test_sampled_generation_is_reproducible(pipeline):
    a = pipeline.generate(demo_image(2), "Describe it.", 6, temperature=0.8, top_p=0.9, seed=3)
    b = pipeline.generate(demo_image(2), "Describe it.", 6, temperature=0.8, top_p=0.9, seed=3)
    assert a == b


def test_bench_prefill_reports_each_engine(built, capsys):
    from iwp.tools.cli import main
    main(["bench-prefill", "--engine", str(built), "--repeats", "1"])
    out = capsys.readouterr().out
    assert f"| {built.name} | iwp | 336x2 64x6 |" in out and "1.00x" in out
    assert oct(built.stat().st_mode & 0o777) == "0o755"


def test_fp16_engine_is_fp16_in_the_file_and_keeps_the_references_tokens(tmp_path):
    """TensorRT 11 builds only strongly typed networks, so an FP16 engine's graphs are FP16 in the file.
    On ONNX Runtime the selection still scores in fp32 and keeps what the fp16 PyTorch reference keeps."""
    import onnx
    import torch

    from iwp.model import PrunedLlavaOnevision
    from iwp.zoo import load
    spec = EngineSpec("tiny-llava-ov", "iwp", 32, max_text_tokens=48, max_new_tokens=8, dtype="fp16")
    directory = build(spec, tmp_path, progress=lambda _: None)
    assert re.fullmatch(r".*-fp16-[0-9a-f]{8}", directory.name), directory.name   # dtype, then the settings hash
    segment = onnx.load(directory / "segment.1.onnx")
    assert segment.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16    # the hidden states
    assert read_manifest(directory).token_table.dtype == "float16"
    floats = [t for t in segment.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 64 * 64
              and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)  # the weights are fp16
    pipeline = Pipeline.from_engine(directory)
    ids, kept = pipeline.generate_ids(demo_image(5), "What colour is the circle?", 8)
    loaded = load("tiny-llava-ov", dtype=torch.float16)
    model = PrunedLlavaOnevision(loaded.model)
    batch = make_batch(loaded, demo_image(5), "What colour is the circle?")
    method = make_method("iwp")
    reference, pre = model.generate(batch, method, method.plan(model.n_layers, batch.n_visual, 32), 8)
    assert kept[0].tolist() == pre.kept[0].tolist()
    assert ids[0] == reference[0, 0].item()


def test_external_data_engine_loads_and_generates_the_same_tokens(pipeline, tmp_path):
    """The >2 GB path, forced on a small model: weights in side files, checked and loaded by path."""
    spec = EngineSpec("tiny-llava-ov", "iwp", 64, max_text_tokens=96, max_new_tokens=32, external_data=True)
    directory = build(spec, tmp_path, progress=lambda _: None)
    data = sorted(p.name for p in directory.iterdir() if p.suffix == ".data")
    assert {"vision.onnx.data", "segment.0.onnx.data", "select.0.onnx.data", "segment.1.onnx.data"} <= set(data)
    assert set(data) <= set(read_manifest(directory).files)  # the side files are hashed too
    external = Pipeline.from_engine(directory)
    prompt = "What colour is the circle?"
    assert external.generate_ids(demo_image(5), prompt, 8)[0] == pipeline.generate_ids(demo_image(5), prompt, 8)[0]


# --- the runtime core (runtime/core, C++): the loop, the sampler and the arena behind generate_ids ---

@pytest.mark.parametrize("temperature, top_p, seed", [(0.0, 1.0, 0), (0.8, 0.9, 1), (1.5, 1.0, 2), (1.0, 0.5, 3)])
def test_core_loop_gives_the_python_paths_tokens(pipeline, temperature, top_p, seed):
    """The C++ decode loop over the ONNX Runtime backend against the pure-Python loop: same tokens."""
    core, _ = pipeline.generate_ids(demo_image(5), "What is here?", 24, Sampler(temperature, top_p, seed))
    assert core == pipeline.generate_ids_reference(demo_image(5), "What is here?", 24,
                                                   Sampler(temperature, top_p, seed))
    assert len(core) == 24 or core[-1] == pipeline.manifest.tokens.eos


def test_core_sampler_draws_what_the_python_sampler_draws():
    rng = np.random.default_rng(0)
    for temperature, top_p in [(0.0, 1.0), (0.7, 1.0), (1.0, 0.9), (2.0, 0.3)]:
        python, core = Sampler(temperature, top_p, seed=5), Sampler(temperature, top_p, seed=5).core()
        for _ in range(200):
            logits = (rng.standard_normal(1000) * 3).astype(np.float32)
            assert core.sample(logits) == python(logits)


def test_arena_is_sized_from_the_manifest(pipeline):
    arena, m = pipeline.arena, pipeline.manifest
    assert arena.capacities == list(m.shapes.cache_len)
    assert arena.key(0, 0).shape == (1, m.model.n_kv_heads, m.shapes.cache_len[0], m.model.head_dim)
    assert arena.key(0, 0).dtype == np.float32 and arena.valid(1, 5).dtype == np.bool_
    unpruned = arena.unpruned_set_bytes(m.shapes.cache_len[0])
    assert arena.set_bytes < unpruned                   # pruned layers hold fewer slots
    with pytest.raises(IndexError):
        arena.key(0, m.model.n_layers)


def test_core_reads_the_manifest_and_prepares_prompts_as_python_does(pipeline, built):
    """The C++ manifest reader and prefill inputs (what a C++ app uses) against the Python pipeline's own: the
    graphs and the io section, and the unpadded prompt's first segment and select inputs element by element."""
    from iwp.engine_format import FORMAT, ROLES
    from iwp.runtime import _core
    from iwp.runtime.prompt import prefill_arrays
    assert _core.MANIFEST_FORMAT == FORMAT
    assert _core.role_table() == ROLES
    core, m = _core.read_manifest(str(built)), pipeline.manifest
    assert (core.n_visual, core.max_prompt, core.cache_len, core.tokens_per_layer, core.stages) == (
        m.model.n_visual, m.shapes.max_prompt, m.shapes.cache_len, m.method.tokens_per_layer, m.method.stages)
    assert (core.image_token, core.eos_token, core.pad_token, core.dtype) == (
        m.tokens.image, m.tokens.eos, m.tokens.pad, "fp32")
    assert [(g.name, g.kind, g.layers, g.stage, g.layer) for g in core.graphs] == [
        (g.name, g.kind, g.layers, g.stage, g.layer) for g in m.graphs]
    assert (core.token_table.file, core.token_table.shape, core.token_table.tied) == (
        m.token_table.file, m.token_table.shape, m.token_table.tied)
    for graph, io in m.io.items():   # the same io section, tensor for tensor
        for kind in ("inputs", "outputs"):
            assert [(t.name, tuple(t.shape), t.dtype, t.role, t.layer, t.stage) for t in getattr(core.io[graph], kind)] \
                == [(t.name, t.shape, t.dtype, t.role, t.layer, t.stage) for t in getattr(io, kind)], (graph, kind)
    for prompt in ("hi", "What colour is the largest shape on the left?"):
        batch = pipeline.prepare(demo_image(0), prompt)
        assert bool(batch.attention_mask.all())                              # the prompt's own length
        inputs = _core.prefill_inputs(batch.input_ids[0].tolist(), core)
        assert np.array_equal(inputs["token_ids"], batch.input_ids.numpy())
        expected = prefill_arrays(batch, embeds=None)
        for role in expected.keys() - {"hidden"}:
            assert inputs[role].dtype == expected[role].dtype and inputs[role].shape == expected[role].shape, role
            assert np.array_equal(inputs[role], expected[role]), role
        prompt_len = batch.input_ids.shape[1]
        assert inputs["prompt_len"] == prompt_len and inputs["next_position"] == int(batch.positions[0, -1]) + 1
        assert [core.segment_prefill_len(s, prompt_len) for s in core.segments()] == [
            m.segment_prefill_len(s, prompt_len) for s in m.segments()]
    with pytest.raises(ValueError, match="capacity is 432"):
        _core.prefill_inputs([m.tokens.image] * 433, core)
    with pytest.raises(ValueError, match="expects 336"):
        _core.prefill_inputs([1, 2, 3], core)
    with pytest.raises(ValueError, match="no text follows the image"):
        _core.prefill_inputs([1] + [m.tokens.image] * 336, core)
    with pytest.raises(RuntimeError, match="no readable manifest.json"):
        _core.read_manifest("/nonexistent")


def test_streaming_callback_can_stop_generation(pipeline):
    seen = []
    ids, _ = pipeline.generate_ids(demo_image(5), "What is here?", 16, on_token=lambda t: seen.append(t) or len(seen) < 3)
    assert ids == seen and len(ids) == 3


def test_two_processes_building_the_same_engine_leave_it_intact(tmp_path):
    """Concurrent `iwp engine` runs into one directory: both succeed, the engine verifies, nothing is left over."""
    import subprocess
    import sys
    argv = [sys.executable, "-m", "iwp", "engine", "--model", "tiny-llava-ov", "--budget", "40",
            "--max-text-tokens", "48", "--max-new-tokens", "3", "--out", str(tmp_path)]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    assert all(code == 0 for code, _ in results), results
    engines = list(tmp_path.iterdir())
    assert len(engines) == 1 and re.fullmatch(r"tiny-llava-ov-iwp-b40-2x2-[0-9a-f]{8}", engines[0].name), engines
    read_manifest(engines[0])                                                # every file matches its hash
    assert Pipeline.from_engine(engines[0]).generate_ids(demo_image(1), "hi", 3)[0]


def test_prepare_writes_the_cpp_apps_inputs(built, pipeline, tmp_path):
    """`iwp prepare`: the prompt's own ids, from which the C++ core builds the pipeline's own unpadded inputs,
    and the raw pixel values."""
    from iwp.tools.cli import main
    from iwp.runtime import _core
    image = tmp_path / "scene.png"
    demo_image(2).save(image)
    main(["prepare", "--engine", str(built), "--image", str(image), "--prompt", "What is here?",
          "--out", str(tmp_path / "p")])
    ids = [int(x) for x in (tmp_path / "p.ids").read_text().split()]
    batch = pipeline.prepare(str(image), "What is here?")
    assert ids == batch.input_ids[0].tolist()
    inputs = _core.prefill_inputs(ids, _core.read_manifest(str(built)))
    for role in ("token_ids", "positions", "query_idx", "query_mask"):
        assert np.array_equal(inputs[role], getattr(batch, "input_ids" if role == "token_ids" else role).numpy()), role
    pixels = np.frombuffer((tmp_path / "p.pixels").read_bytes(), dtype=np.float32)
    assert np.array_equal(pixels, batch.pixel_values.numpy().reshape(-1))
