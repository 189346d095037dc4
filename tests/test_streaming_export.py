"""The export that never holds the model (iwp/weight_source.py, export/lazy.py): weight sources give the same
tensors in any order, a checkpoint is read lazily with its shapes checked first, and the export's peak memory
does not grow with the number of layers."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlavaOnevisionConfig

from iwp.weight_source import Checkpoint, SeededRandom, is_meta, materialize, skeleton
from iwp.zoo import CONFIG_DIR, load


def _config(layers: int = 2, hidden: int = 256, mlp: int = 512, vocab: int = 512) -> LlavaOnevisionConfig:
    """llava-ov-0.5b's architecture at a chosen depth and width (vision one layer)."""
    stored = json.loads((CONFIG_DIR / "llava-ov-0.5b.json").read_text())
    stored["text_config"].update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=mlp,
                                 vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2)
    stored["vision_config"].update(num_hidden_layers=1)
    stored.update(image_token_index=vocab - 1, video_token_index=vocab - 2)
    return LlavaOnevisionConfig(**{k: v for k, v in stored.items() if k not in ("architectures", "model_type")})


def test_a_skeleton_holds_no_weight_bytes_and_keeps_the_tie():
    model = skeleton(_config(), torch.float16)
    assert is_meta(model) and all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())          # RoPE frequencies are real
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float16


def test_seeded_random_gives_each_tensor_the_same_values_in_any_order():
    model = skeleton(_config(), torch.float32)
    names = [n for n, _ in model.named_parameters()]
    forward = {n: SeededRandom(model, 0).tensor(n) for n in names}
    source = SeededRandom(model, 0)
    backward = {n: source.tensor(n) for n in reversed(names)}
    assert all(torch.equal(forward[n], backward[n]) for n in names)
    q_name = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(SeededRandom(model, 1).tensor(q_name), forward[q_name])     # another seed
    assert not torch.equal(forward["model.language_model.layers.0.self_attn.q_proj.weight"], forward[q_name])
    # HF's own init of each owning module: linear weights N(0, 0.02), norms ones, biases zeros
    q = forward["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - 0.02) < 0.002
    assert torch.equal(forward["model.language_model.layers.0.input_layernorm.weight"], torch.ones(256))
    assert not forward["model.language_model.layers.0.self_attn.q_proj.bias"].any()


def test_materialize_fills_the_skeleton_from_the_source_and_reties():
    model = skeleton(_config(), torch.float32)
    source = SeededRandom(skeleton(_config(), torch.float32), 0)
    materialize(model, source)
    with pytest.raises(ValueError, match="reads from a skeleton"):
        SeededRandom(model, 0)
    assert not is_meta(model)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    for name, p in model.named_parameters():
        assert torch.equal(p, source.tensor(name))


def test_random_real_size_loads_agree_lazy_and_whole():
    whole = load("llava-ov-0.5b", random_weights=True)
    lazy = load("llava-ov-0.5b", random_weights=True, lazy=True)
    assert is_meta(lazy.model) and not is_meta(whole.model)
    for name in ("model.language_model.layers.23.mlp.down_proj.weight", "model.multi_modal_projector.linear_1.bias",
                 "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(lazy.weights.tensor(name), whole.model.get_parameter(name))


def test_a_checkpoint_is_read_lazily_under_its_own_key_layout(tmp_path):
    model = skeleton(_config(), torch.float32)
    materialize(model, SeededRandom(skeleton(_config(), torch.float32), 3))
    model.save_pretrained(tmp_path)                  # transformers writes its original (language_model.model.*) keys
    lazy = skeleton(LlavaOnevisionConfig.from_pretrained(tmp_path), torch.float32)
    source = Checkpoint(tmp_path, lazy, torch.float32)
    for name, p in model.named_parameters():
        assert torch.equal(source.tensor(name), p)


def test_a_checkpoint_of_other_shapes_is_refused_before_any_work(tmp_path):
    model = skeleton(_config(hidden=128), torch.float32)
    materialize(model, SeededRandom(skeleton(_config(hidden=128), torch.float32), 0))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"image_newline has shape \[128\] where the preset has \[256\]; pass the "
                                         r"checkpoint of this preset"):
        Checkpoint(tmp_path, skeleton(_config(hidden=256), torch.float32), torch.float32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        Checkpoint(empty, skeleton(_config(), torch.float32), torch.float32)


_PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import iwp.zoo as zoo
    from iwp.export.engine import build, peak_rss_bytes
    from iwp.export.spec import EngineSpec
    layers, out = int(sys.argv[1]), Path(sys.argv[2])
    stored = json.loads((zoo.CONFIG_DIR / "llava-ov-0.5b.json").read_text())
    stored["text_config"].update(num_hidden_layers=layers, hidden_size=1024, intermediate_size=4096,
                                 num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)
    stored["vision_config"].update(num_hidden_layers=1)
    (out / "configs").mkdir(exist_ok=True)
    (out / "configs" / "wide.json").write_text(json.dumps(stored))
    zoo.CONFIG_DIR = out / "configs"
    zoo.PRESETS["wide"] = zoo.ModelSpec("wide", "test/wide", grid=(1, 1), budget=64)
    before = peak_rss_bytes()
    directory = build(EngineSpec("wide", "iwp", 64, random_weights=True, max_text_tokens=64, max_new_tokens=4),
                      out / "engines", progress=lambda _: None)
    weights = json.loads((directory / "manifest.json").read_text())["weights"]["distinct_bytes"]
    print(json.dumps({"before": before, "after": peak_rss_bytes(), "weights": weights}))
""")


def test_the_exports_peak_memory_does_not_grow_with_the_layers(tmp_path):
    """A 0.5b-shaped model, 1024 wide, at 3 and at 13 layers (61 MB of fp32 weights a layer): a whole-model
    export would peak at least 600 MB higher for the deeper one; streaming, the two peaks stay within a
    fraction of that (one segment's graph, not its weights)."""
    runs = {}
    for layers in (3, 13):
        out = tmp_path / str(layers)
        out.mkdir()
        done = subprocess.run([sys.executable, "-c", _PEAK, str(layers), str(out)], capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[layers] = json.loads(done.stdout.strip().splitlines()[-1])
    grown = (runs[13]["after"] - runs[13]["before"]) - (runs[3]["after"] - runs[3]["before"])
    added = runs[13]["weights"] - runs[3]["weights"]
    assert added > 500e6
    print(f"\npeak growth {grown / 1e6:.0f} MB for {added / 1e6:.0f} MB more weights")
    assert grown < 0.2 * added


def test_a_disk_too_small_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil as real_shutil

    from iwp.export import engine
    from iwp.export.spec import EngineSpec
    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda _: usage._replace(free=1_000_000))
    with pytest.raises(ValueError, match=r"the engine needs about 0\.\d GB in .*, which has 0\.0 GB free; free some "
                                         r"space or pass --out on a larger disk"):
        engine.build(EngineSpec("tiny-llava-ov", "iwp", 64), tmp_path / "engines", progress=lambda _: None)
    assert not (tmp_path / "engines").exists()


def test_a_disk_that_fills_while_writing_leaves_nothing_and_says_how_much(tmp_path, monkeypatch):
    import errno

    from iwp.export import engine, graphs
    from iwp.export.spec import EngineSpec
    real = graphs.save_ir

    def fills(model, path, external_data=True):
        if "segment.1" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(model, path, external_data)
    monkeypatch.setattr(graphs, "save_ir", fills)
    with pytest.raises(ValueError, match=r"filled up while the engine was written \(it needs about 0\.\d GB\); "
                                         r"the partial engine was removed"):
        engine.build(EngineSpec("tiny-llava-ov", "iwp", 64), tmp_path / "engines", progress=lambda _: None)
    assert not any((tmp_path / "engines").iterdir())


def test_the_estimate_is_what_an_engine_stores(tmp_path):
    """The disk check's estimate against the bytes a built engine stores (tiny: fp32 and int4)."""
    from iwp.engine_format import EngineManifest
    from iwp.export.engine import build, estimated_bytes
    from iwp.export.spec import EngineSpec
    for quant in ("none", "int4"):
        directory = build(EngineSpec("tiny-llava-ov", "iwp", 64, quant=quant), tmp_path, progress=lambda _: None)
        manifest = EngineManifest.read(directory)
        stored = manifest.weights.stored_bytes
        assert manifest.build.seconds > 0 and manifest.build.peak_rss_bytes["export"] > 100e6   # recorded
        estimate = estimated_bytes(load("tiny-llava-ov", lazy=True).model, quant)
        assert 0.9 * stored <= estimate <= 1.2 * stored, (quant, estimate, stored)
