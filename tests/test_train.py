"""`iwp train`: the labels, the per-token targets, the token dropping, the guided heads, and a short run that
saves a loadable model."""
import dataclasses
import json
import math
import random

import numpy as np
import pytest
import safetensors.torch
import torch

from iwp.calibration import ovqa
from iwp.tools.train import (GUIDED_HEADS, TrainConfig, GuidedHeads, answer_spans, background_share, guide_targets,
                             image_features, keep_masks, lm_inputs, lm_logits, make_processor, new_model,
                             question_batch, question_objects, train)
from iwp.tools.train_targets import (IMAGE_SIZE, PATCH, SIDE, centres, glyph_ordinals, patch_instances, patch_labels,
                                     patch_targets, token_labels, token_order, token_xy)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def test_tokenizer_is_deterministic_and_keeps_glyphs_apart(processor):
    again = make_processor()
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor.tokenizer.tokenize("What colour is the triangle?") == ["What", "Ġcolour", "Ġis", "Ġthe",
                                                                            "Ġtriangle", "?"]
    assert processor.tokenizer.tokenize("PAL") == ["P", "A", "L"]       # reading stays one glyph per token


def test_only_answers_are_labelled(processor):
    config = TrainConfig(batch=2)
    batch = question_batch(processor, ovqa.examples("train", 2), 1, config, random.Random(0))
    tokenizer = processor.tokenizer
    for ids, labels, types in zip(batch["input_ids"], batch["labels"], batch["types"]):
        kept = tokenizer.decode(labels[labels != -100])
        assert kept.count("<|im_end|>") == config.questions == len(types)
        assert "user" not in kept and "<image>" not in kept
        assert bool((labels[labels != -100] == ids[labels != -100]).all())


def test_patch_labels_follow_the_processors_crops_and_the_lms_token_order(processor):
    e = ovqa.example("train", 0)
    for grid, n in ((1, 528), (2, 1312)):
        crops = patch_labels(e.scene, grid)
        assert crops.shape == (1 + grid * grid, 256)
        order = token_labels(crops, grid)
        assert order.shape == (n,) and (order == -1).sum() == 16 * grid      # one newline per high-res row
        targets = patch_targets(e.scene, grid)
        assert targets.shape == (1 + grid * grid, 256, 5)
        assert (targets[..., 0] == crops).all() and (targets[..., 4] == patch_instances(e.scene, grid)).all()
        assert token_xy(grid).shape == (n, 2)
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


def test_token_order_stitches_the_tiles_row_by_row():
    crops = np.arange(5 * 256).reshape(5, 256)                    # base, then tiles (0,0) (0,1) (1,0) (1,1)
    order = token_order(crops, 2)
    row0 = order[256:256 + 33]
    assert list(row0[:16]) == list(range(256, 272)) and list(row0[16:32]) == list(range(512, 528)) and row0[32] == -1
    assert order[256 + 33 * 16] == 3 * 256                          # row 16 starts in tile (1, 0)


def test_one_centre_token_per_shape_and_crop_and_three_glyph_ordinals():
    for index in range(10):
        scene = ovqa.example("train", index).scene
        for grid in (1, 2):
            c = centres(scene, grid)
            assert c[0].sum() == len(scene.shapes) and c[1:].sum() == len(scene.shapes)
            labels = patch_labels(scene, grid)
            ys, xs = divmod(np.flatnonzero(c[0]), SIDE)
            assert all(labels[0, y * SIDE + x] > 0 for y, x in zip(ys, xs))   # the centre is on its shape
        ordinals = glyph_ordinals(scene, 2)
        assert set(np.unique(ordinals)) == {-100, 0, 1, 2}
        first, last = (np.flatnonzero(ordinals[0] == i) % SIDE for i in (0, 2))
        assert first.mean() < last.mean()                                      # glyph 0 is left of glyph 2


def test_dropped_background_keeps_every_object_and_their_positions(processor):
    config = TrainConfig(batch=2)
    model = new_model(processor, config)
    examples = ovqa.examples("train", 2)
    batch = question_batch(processor, examples, 1, config, random.Random(0))
    keep = keep_masks(batch["targets"], 0.0, np.random.default_rng(0))
    for mask, targets in zip(keep, batch["targets"]):
        assert bool(mask[targets[:, 0] != 0].all()) and not bool(mask[targets[:, 0] == 0].any())
    with torch.no_grad():
        features = image_features(model, batch)
        kept_full, kept = [], []
        full = lm_inputs(model, batch, features, None, kept_full)
        pruned = lm_inputs(model, batch, features, keep, kept)
    n = 528
    for b in range(2):
        length = int(batch["attention_mask"][b].sum())
        assert len(kept_full[b]) == length and len(kept[b]) == length - n + int(keep[b].sum())
        assert bool((pruned[1][b, :len(kept[b])] == kept[b]).all())                   # original RoPE positions
        assert bool((pruned[3][b, :len(kept[b])] == batch["labels"][b, kept[b]]).all())
        assert bool(torch.equal(pruned[0][b, :len(kept[b])], full[0][b, kept[b]]))
    with torch.no_grad():   # with every token kept, the sequence is HF's own forward on the same batch
        ours = lm_logits(model, full[0], full[1], full[2])
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).logits
    for b in range(2):
        length = int(batch["attention_mask"][b].sum())
        torch.testing.assert_close(ours[b, :length], hf[b, :length], atol=1e-4, rtol=1e-4)


def test_guided_heads_look_from_each_answer_to_its_words_and_objects(processor):
    config = TrainConfig(batch=3, questions=8)
    examples = ovqa.examples("train", 3, start=2)
    batch = question_batch(processor, examples, 1, config, random.Random(0))
    tokenizer = processor.tokenizer
    targets = guide_targets(batch, examples, tokenizer, processor.image_token_id)
    seen = set()
    for b, rows in enumerate(targets):
        ids = batch["input_ids"][b]
        slots = (ids == processor.image_token_id).nonzero()[:, 0]
        instances = token_order(patch_instances(examples[b].scene, 1), 1, fill=0)
        for kind, head, queries, keys in rows:
            assert head in GUIDED_HEADS and len(queries) and len(keys)
            assert bool((batch["labels"][b, queries + 1] != -100).all())            # each predicts an answer token
            if kind == "words":
                named = tokenizer.decode(ids[keys]).split()
                assert all(w in ovqa.COLOURS or w.rstrip("s") in ovqa.SHAPES or w == "sign" for w in named), named
                assert int(keys.max()) < int(queries.min())
            else:   # visual tokens, and for counting and existence the sink (position 0)
                visual = keys[keys != 0]
                assert bool(torch.isin(visual, slots).all()) and (len(visual) < len(keys)) == (int(keys[0]) == 0)
                assert set(instances[(visual - slots[0]).numpy()].tolist()) <= set(range(1, 7)) | {255}
            seen.add((kind, head))
    assert seen == {(k, h) for k in ("words", "image") for h in GUIDED_HEADS}       # a spatial question uses both
    # a spatial question's two heads look at its two shapes, in the question's order
    spatial = next((b, q) for b in range(3) for q in batch["questions"][b] if q.startswith("Is the "))
    first, second = question_objects(examples[spatial[0]].scene, spatial[1])
    shapes = examples[spatial[0]].scene.shapes
    assert spatial[1].startswith(f"Is the {shapes[first[0] - 1].name} ") and spatial[1].endswith(f"the {shapes[second[0] - 1].name}?")
    # a reading answer's k-th position looks at the sign's k-th glyph
    b = next(b for b in range(3) if "What does the sign say?" in batch["questions"][b])
    turn = batch["questions"][b].index("What does the sign say?")
    start, stop = answer_spans(batch["input_ids"][b:b + 1], tokenizer)[0][turn]
    reads = [(q, k) for kind, head, q, k in targets[b] if kind == "image" and start - 1 <= int(q[0]) < stop]
    assert len(reads) == 3
    ordinals = token_order(glyph_ordinals(examples[b].scene, 1), 1, fill=-100)
    slots = (batch["input_ids"][b] == processor.image_token_id).nonzero()[:, 0]
    for k, (q, keys) in enumerate(reads[:3]):
        assert set(ordinals[(keys - slots[0]).numpy()].tolist()) == {k}
    # the hooked loss equals -log of the head's attention mass computed by HF's eager attention
    model = new_model(processor, config)
    guides = GuidedHeads(model, config)
    with torch.no_grad():
        features, kept = image_features(model, batch), []
        embeds, positions, mask, labels = lm_inputs(model, batch, features, None, kept)
        lm_logits(model, embeds, positions, mask)
        ours = guides(targets, kept, mask)
        exit_loss = guides.early_exit(model, labels)
        model.model.language_model.config._attn_implementation = "eager"
        attentions = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                                output_attentions=True).attentions
    guides.remove()
    layer = {"words": config.words_layer, "image": config.image_layer}
    expected = [-torch.log(attentions[layer[kind]][b, head, q][:, k].sum(-1)).mean()
                for b, rows in enumerate(targets) for kind, head, q, k in rows]
    torch.testing.assert_close(ours, torch.stack(expected).mean(), atol=1e-4, rtol=1e-4)
    assert 0 < float(exit_loss) < 2 * math.log(len(tokenizer))      # a cross-entropy over the vocabulary


def test_lookup_targets_are_the_spatial_shapes_places_and_the_counts():
    from iwp.tools.train_lookup import lookup_targets
    spatial, counting = ovqa.example("train", 2), ovqa.example("train", 1)
    assert (spatial.qtype, counting.qtype) == ("spatial", "counting")
    spans = [[(40, 42), (60, 62)], [(30, 32)]]
    wanted = lookup_targets(spans, [[spatial.question, "Describe the scene."], [counting.question]],
                            [["spatial", "describe"], ["counting"]], [spatial, counting])
    (kind, query, places), (relation_kind, relation_query, relation) = wanted[0]
    asked = next(r for r in ovqa.RELATIONS if f" {r} the " in spatial.question)
    assert (relation_kind, relation_query, ovqa.RELATIONS[int(relation)]) == ("relation", 39, asked)
    a, b = spatial.question[len("Is the "):-1].split(" the ")[0], spatial.question.rsplit(" the ", 1)[1][:-1]
    shape_a = next(s for s in spatial.scene.shapes if a.startswith(s.name))
    shape_b = next(s for s in spatial.scene.shapes if s.name == b)
    assert (kind, query) == ("places", 39)
    assert places.tolist() == pytest.approx([shape_a.x / 384, shape_a.y / 384, shape_b.x / 384, shape_b.y / 384])
    (kind, query, count), = wanted[1]
    assert (kind, query, int(count)) == ("counting", 29, int(counting.answer))


def test_background_share_eases_to_the_whole_image():
    config = TrainConfig(steps=100, curriculum_until=0.5)
    assert background_share(0, config) == config.background_start
    assert background_share(50, config) == 1.0 == background_share(99, config)
    assert config.background_start < background_share(25, config) < 1


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="background_start"):
        TrainConfig(background_start=1.5)


def test_a_short_run_saves_a_loadable_model(tmp_path):
    from iwp.calibration.evaluate import ovqa_items, predict
    from iwp.zoo import Loaded, ModelSpec
    from transformers import LlavaOnevisionForConditionalGeneration

    from iwp.processor import processor_from_checkpoint
    config = TrainConfig(vision_steps=2, steps=2, polish_steps=1, batch=2, dev_examples=2, eval_every=1,
                         anyres_every=2)
    base = train(tmp_path / "base", config, progress=lambda _: None)
    assert [h["phase"] for h in base["history"]] == ["vision", "questions", "questions"]
    summary = train(tmp_path / "model", config, progress=lambda _: None, stage="polish", start_from=tmp_path / "base")
    assert [h["phase"] for h in summary["history"]] == ["vision", "questions", "questions", "polish"]
    saved = json.loads((tmp_path / "model" / "training.json").read_text())
    assert saved["config"]["steps"] == 2 and saved["stage"] == "polish"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    polished = safetensors.torch.load_file(tmp_path / "model" / "model.safetensors")
    started = safetensors.torch.load_file(tmp_path / "base" / "model.safetensors")
    assert polished.keys() == started.keys() and any(not torch.equal(polished[k], started[k]) for k in polished)
    with pytest.raises(ValueError, match="other settings .*batch"):   # the polish continues the same recipe
        train(tmp_path / "other", dataclasses.replace(config, batch=3), stage="polish", start_from=tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="stage base"):
        train(tmp_path / "other", config, stage="polish", start_from=tmp_path / "missing")
    with pytest.raises(ValueError, match="holds the base stage.*starts from the polish stage"):
        train(tmp_path / "other", config, stage="lookup", start_from=tmp_path / "base")
    looked = train(tmp_path / "lookup", dataclasses.replace(config, lookup_steps=1), progress=lambda _: None,
                   stage="lookup", start_from=tmp_path / "model")
    assert [h["phase"] for h in looked["history"]] == ["vision", "questions", "questions", "polish", "lookup"]
    assert looked["history"][-1]["lookup_loss"] > 0      # the lookup's heads were trained on
    after = safetensors.torch.load_file(tmp_path / "lookup" / "model.safetensors")
    assert after.keys() == polished.keys() and any(not torch.equal(after[k], polished[k]) for k in after)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert model.config.text_config.num_hidden_layers == config.lm_layers
    loaded = Loaded(ModelSpec("ovqa-small", None, (1, 1), 64), model.eval(),
                    processor_from_checkpoint(tmp_path / "model"), "test")
    assert loaded.n_visual == 528
    (answers,) = predict(loaded, ovqa_items("test", 2), [(None, None)])
    assert len(answers) == 2
