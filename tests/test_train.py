"""`iwp train`: the labels, the curriculum, the patch targets, and a short run that saves a loadable model."""
import json

import numpy as np
import pytest
import torch

from iwp.calibration import ovqa
from iwp.tools.train import (IMAGE_SIZE, PATCH, TOKENIZER_VOCAB, TrainConfig, answer_labels, curriculum, hide_background,
                       patch_labels, text_batch, token_labels, tokenizer_corpus, train, training_batch)


@pytest.fixture(scope="module")
def processor():
    from iwp.processor import byte_level_tokenizer, local_processor
    from iwp.zoo import all_pinpoints
    return local_processor(IMAGE_SIZE, PATCH, all_pinpoints(IMAGE_SIZE),
                           byte_level_tokenizer(tokenizer_corpus(), TOKENIZER_VOCAB))


def test_tokenizer_is_deterministic_and_keeps_glyphs_apart(processor):
    from iwp.processor import byte_level_tokenizer
    again = byte_level_tokenizer(tokenizer_corpus(), TOKENIZER_VOCAB)
    assert again.get_vocab() == processor.tokenizer.get_vocab()
    assert processor.tokenizer.tokenize("What colour is the triangle?") == ["What", "Ġcolour", "Ġis", "Ġthe",
                                                                            "Ġtriangle", "?"]
    assert processor.tokenizer.tokenize("PAL") == ["P", "A", "L"]       # reading stays one glyph per token


def test_only_answers_are_labelled(processor):
    config = TrainConfig(batch=2)
    batch = training_batch(processor, 0, config)
    tokenizer = processor.tokenizer
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = tokenizer.decode(labels[labels != -100])
        assert kept.count("<|im_end|>") == config.questions and "user" not in kept and "<image>" not in kept
        assert bool((labels[labels != -100] == ids[labels != -100]).all())


def test_patch_labels_follow_the_processors_crops_and_the_lms_token_order(processor):
    e = ovqa.example("train", 0)
    for grid, n in ((1, 528), (2, 1312)):
        crops = patch_labels(e.scene, grid)
        assert crops.shape == (1 + grid * grid, 256)
        order = token_labels(crops, grid)
        assert order.shape == (n,) and (order == -1).sum() == 16 * grid      # one newline per high-res row
    # the shapes' classes are where their colours are in the processor's pixels
    image = e.image().resize((IMAGE_SIZE, IMAGE_SIZE))
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"][0, 0].numpy()  # the base crop
    cells = pixels.reshape(3, 16, PATCH, 16, PATCH).mean(axis=(2, 4)).reshape(3, 256)
    labels = patch_labels(e.scene, 1)[0]
    for (colour, kind), cls in ovqa.SHAPE_LABELS.items():
        if (labels == cls).any():
            red, green, blue = cells[:, labels == cls].mean(axis=1)
            if colour == "red":
                assert red > green and red > blue
            if colour == "blue":
                assert blue > red and blue > green


def test_the_guided_heads_look_from_each_questions_end_and_answers_to_its_words_and_objects(processor):
    config = TrainConfig(batch=1, questions=4, curriculum_until=0.0)
    batch = training_batch(processor, 3, config)
    ids, labels, (targets,) = batch["input_ids"][0], batch["labels"][0], batch["attention_targets"]
    tokenizer = processor.tokenizer
    slots = (ids == processor.image_token_id).nonzero().squeeze(1)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert 1 <= len(targets["image"]) <= config.questions
    assert len(targets["words"]) == config.questions - config.describe           # "Describe the scene." names nothing
    for queries, keys in targets["image"] + targets["words"]:
        assert int(ids[queries[0] + 1]) == end                                     # the question's last token
        assert tokenizer.decode(ids[queries[0]]).strip() in ("?", ".")
        answer = queries[1:] + 1                                                   # then every answer position
        assert len(answer) > 0 and bool((labels[answer] != -100).all()) and bool((ids[answer] != end).all())
        assert int(queries.min()) > int(slots.max())
    for queries, keys in targets["image"]:
        assert bool(torch.isin(keys, slots).all()) and len(keys) > 0               # image tokens only
    for queries, keys in targets["words"]:                                         # in the question, naming things
        assert int(keys.max()) < int(queries[0]) and int(keys.min()) > int(slots.max())
        named = tokenizer.decode(ids[keys]).split()
        assert named and all(w in ovqa.COLOURS or w.rstrip("s") in ovqa.SHAPES or w == "sign" for w in named), named


def test_curriculum_eases_to_the_benchmark():
    config = TrainConfig(steps=100, curriculum_until=0.5)
    assert curriculum(0, config) == (config.background_start, config.zoom_start)
    assert curriculum(50, config) == (1.0, 1.0) == curriculum(99, config)
    share, zoom = curriculum(25, config)
    assert config.background_start < share < 1 and 1 < zoom < config.zoom_start


def test_hidden_background_keeps_objects_and_positions():
    ids = torch.tensor([[5, 9, 9, 9, 9, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = [np.array([0, 3, 0, -1])]           # background, a shape, background, a newline
    hide_background(batch, labels, 9, 0.0, np.random.default_rng(0))
    assert batch["attention_mask"].tolist() == [[1, 0, 1, 0, 1, 1]]
    batch["attention_mask"] = torch.ones_like(ids)
    hide_background(batch, labels, 9, 1.0, np.random.default_rng(0))
    assert batch["attention_mask"].tolist() == [[1] * 6]


def test_language_phase_writes_the_scene_and_skips_spatial_questions(processor):
    batch = text_batch(processor, 0, TrainConfig(text_batch=4))
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.count("Scene: sign ") == 1 and "<image>" not in text
    assert not any(r in text for r in (" left of ", " right of ", " above ", " below "))
    assert (batch["labels"] != -100).sum() > 0


def test_a_short_run_saves_a_loadable_model(tmp_path):
    from iwp.calibration.evaluate import ovqa_items, predict
    from iwp.zoo import Loaded, ModelSpec
    from transformers import LlavaOnevisionForConditionalGeneration

    from iwp.processor import processor_from_checkpoint
    config = TrainConfig(steps=2, text_steps=2, batch=2, text_batch=2, dev_examples=2, eval_every=1, anyres_every=2)
    summary = train(tmp_path / "model", config, progress=lambda _: None)
    assert [h["phase"] for h in summary["history"]] == ["text", "text", "image", "image"]
    saved = json.loads((tmp_path / "model" / "training.json").read_text())
    assert saved["config"]["steps"] == 2 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "model")
    loaded = Loaded(ModelSpec("ovqa-small", None, (1, 1), 64), model.eval(),
                    processor_from_checkpoint(tmp_path / "model"), "test")
    assert loaded.n_visual == 528
    (answers,) = predict(loaded, ovqa_items("test", 2), [(None, None)])
    assert len(answers) == 2
