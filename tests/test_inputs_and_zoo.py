"""Inputs (images, prompts, derived positions) and the model zoo: behaviour and one-line errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from iwp.demo import demo_image
from iwp.inputs import load_image, make_batch
from iwp.zoo import CONFIG_DIR, PRESETS, get_spec, load


def test_visual_positions_follow_the_tokenizer(tiny):
    for system in (None, "You are a robot.", "You are a very talkative assistant with a long system prompt."):
        batch = make_batch(tiny, demo_image(0), "What colour is the triangle?", system=system)
        ids = batch.input_ids[0]
        image = (ids == tiny.processor.image_token_id).nonzero().squeeze(1)
        assert int(batch.visual_start[0]) == int(image[0]) and image.numel() == batch.n_visual == tiny.n_visual
        after = int(image[-1]) + 1
        assert batch.query_idx[0].tolist() == list(range(after, ids.shape[0]))
        assert int(batch.last_idx[0]) == ids.shape[0] - 1


def test_visual_xy_covers_the_grid(tiny):
    xy = make_batch(tiny, demo_image(0), "x").visual_xy
    assert xy.shape == (tiny.n_visual, 2)
    assert float(xy.min()) > 0 and float(xy.max()) <= 1.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_image_modes_are_converted(tiny, mode, tmp_path):
    rgb = demo_image(3, (80, 60))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
        assert image.mode.startswith("I;16")
    else:
        image = rgb.convert(mode)
    path = tmp_path / "im.png" if mode != "CMYK" else tmp_path / "im.jpg"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (80, 60)
    if mode == "I;16":  # 16-bit is scaled to 8 bits, not clipped to white
        assert abs(np.asarray(loaded).mean() - np.asarray(rgb.convert("L")).mean()) < 2
    make_batch(tiny, path, "What is here?")


def test_unreadable_images_get_one_line_errors(tiny, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    for path, words in [(tmp_path / "missing.png", "does not exist"), (empty, "0 bytes"), (corrupt, "cannot be read")]:
        with pytest.raises(ValueError, match=words) as err:
            make_batch(tiny, path, "What is here?")
        assert "\n" not in str(err.value)


def test_image_and_prompt_counts_must_match(tiny):
    with pytest.raises(ValueError, match="one image per prompt"):
        make_batch(tiny, [demo_image(0), demo_image(1)], "one prompt")
    with pytest.raises(ValueError, match="exactly one image per prompt"):
        make_batch(tiny, demo_image(0), "compare <image> with this one")
    with pytest.raises(ValueError, match="one image per prompt"):
        make_batch(tiny, [], [])


def test_unknown_model_and_grid():
    with pytest.raises(ValueError, match="unknown model 'llava-9000'.*tiny-llava-ov"):
        get_spec("llava-9000")
    with pytest.raises(ValueError, match="RxC"):
        get_spec("tiny-llava-ov", grid="big")
    with pytest.raises(ValueError, match="4x4' is not one tiny-llava-ov can run.*1x1, 1x2, 1x3, 2x1, 2x2, 2x3, 3x1"):
        get_spec("tiny-llava-ov", grid="4x4")
    assert get_spec("llava-ov-7b", grid="1x4").grid == (1, 4)   # a pinpoint of the real processor, 4 crops
    with pytest.raises(ValueError, match="2x5' is not one llava-ov-7b can run"):
        get_spec("llava-ov-7b", grid="2x5")                   # a pinpoint, but 10 crops: past anyres_max_9


def test_missing_weights_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no config.json.*MODEL_PATH.*RANDOM_WEIGHTS=1") as err:
        load("llava-ov-0.5b", model_path=str(tmp_path))
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the HF cache.*llava-hf/llava-onevision-qwen2-7b-ov-hf"):
        load("llava-ov-7b")


def test_tiny_is_built_locally_and_deterministic():
    a, b = load("tiny-llava-ov"), load("tiny-llava-ov")
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="built locally"):
        load("tiny-llava-ov", model_path="/somewhere")


def test_checkpoint_directory_loads_like_a_real_model(tiny, tmp_path):
    """The real-weights path: a saved checkpoint directory (config, safetensors, tokenizer, processor)."""
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.tokenizer.save_pretrained(tmp_path)
    tiny.processor.image_processor.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(tiny.processor.chat_template)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"num_image_tokens": 64, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    real = load("llava-ov-0.5b", model_path=str(tmp_path), grid="2x2")
    assert real.source == str(tmp_path)
    a = make_batch(tiny, demo_image(0), "What is it?")
    b = make_batch(real, demo_image(0), "What is it?")
    assert torch.equal(a.input_ids, b.input_ids)
    with torch.no_grad():
        la = tiny.model(input_ids=a.input_ids, pixel_values=a.pixel_values, image_sizes=a.image_sizes).logits
        lb = real.model(input_ids=b.input_ids, pixel_values=b.pixel_values, image_sizes=b.image_sizes).logits
    torch.testing.assert_close(la, lb)


@pytest.mark.parametrize("name", ["llava-ov-0.5b", "llava-ov-7b"])
def test_stored_real_configs_are_the_published_architectures(name):
    from transformers import LlavaOnevisionConfig
    stored = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    config = LlavaOnevisionConfig(**{k: v for k, v in stored.items() if k not in ("architectures", "model_type")})
    text, vision = config.text_config, config.vision_config
    expected = {"llava-ov-0.5b": (896, 24, 14, 2, 4864), "llava-ov-7b": (3584, 28, 28, 4, 18944)}[name]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == expected
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (384, 14, 1152)
    assert PRESETS[name].hf_id.startswith("llava-hf/llava-onevision-qwen2-")


@pytest.mark.slow
def test_random_weight_real_size_build():
    loaded = load("llava-ov-0.5b", random_weights=True)
    assert loaded.n_visual == 729 + 27 * 28  # base crop + one 27x27 crop with a newline per row
    batch = make_batch(loaded, demo_image(0), "What is in the image?")
    assert batch.n_visual == 1485
