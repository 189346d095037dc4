"""The OVQA benchmark generator: determinism, disjoint splits, balanced and correct answers, and glyphs that can
be read back from the pixels."""
import collections
import random

import numpy as np
import pytest

from iwp.calibration import ovqa


def oracle(scene: ovqa.Scene, question: str) -> str:
    """The answer, re-derived from the scene by parsing the question (independent of the generator's code)."""
    shapes = scene.shapes
    words = question.rstrip("?").split()
    if question == "What does the sign say?":
        return scene.text
    if question.startswith("How many"):
        word = words[2]
        if word in ovqa.COLOURS:
            return str(sum(s.colour == word for s in shapes))
        return str(sum(s.kind + "s" == word for s in shapes))
    if question.startswith("Is there"):
        colour, kind = words[-2], words[-1]
        return "yes" if any(s.colour == colour and s.kind == kind for s in shapes) else "no"
    if question.startswith("What colour is the"):
        (match,) = [s for s in shapes if s.kind == words[-1]]
        return match.colour
    if question.startswith("What shape is the"):
        (match,) = [s for s in shapes if s.colour == words[4]]
        return match.kind
    if question.startswith("What size is the"):
        (match,) = [s for s in shapes if s.colour == words[-2] and s.kind == words[-1]]
        return match.size
    assert question.startswith("Is the"), question
    text = question[len("Is the "):-1]
    relation = next(r for r in ovqa.RELATIONS if f" {r} the " in text)
    first, second = text.split(f" {relation} the ")
    (a,) = [s for s in shapes if s.name == first]
    (b,) = [s for s in shapes if s.name == second]
    along = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]
    assert abs(along) > 24, "spatial questions are asked only with a clear margin"
    return "yes" if along > 0 else "no"


def read_sign(image, scene: ovqa.Scene) -> str:
    """Read the glyphs back from the rendered pixels by matching the 5x7 font."""
    pixels = np.asarray(image.convert("L")) < 100
    x0, y0 = scene.sign_xy
    text = ""
    for i in range(ovqa.SIGN_LENGTH):
        gx, s = x0 + 6 + i * 6 * ovqa.GLYPH_SCALE, ovqa.GLYPH_SCALE
        cells = pixels[y0 + 6:y0 + 6 + 7 * s:s, gx:gx + 5 * s:s]
        matches = [c for c, rows in ovqa.GLYPHS.items() if (np.array([[b == "1" for b in r] for r in rows]) == cells).all()]
        assert len(matches) == 1
        text += matches[0]
    return text


@pytest.mark.parametrize("split", list(ovqa.SPLITS))
def test_answers_match_the_scene(split):
    for e in ovqa.examples(split, 60):
        assert oracle(e.scene, e.question) == e.answer, e.question


def test_examples_are_deterministic_and_render_identically():
    a, b = ovqa.example("test", 7), ovqa.example("test", 7)
    assert a == b
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert ovqa.example("test", 8) != a


def test_splits_never_share_a_scene():
    scenes = {split: {e.scene.key() for e in ovqa.examples(split, 150)} for split in ovqa.SPLITS}
    assert not scenes["train"] & scenes["test"]
    assert not scenes["train"] & scenes["calibration"]
    assert not scenes["calibration"] & scenes["test"]
    for split, keys in scenes.items():  # membership is by content hash, so it holds at any size
        assert all(e.scene.bucket() in ovqa.SPLITS[split] for e in ovqa.examples(split, 20))


def test_types_cycle_and_answers_are_balanced():
    test = ovqa.examples("test", 250)
    assert collections.Counter(e.qtype for e in test) == {t: 50 for t in ovqa.TYPES}
    yes_no = collections.Counter(e.answer for e in test if e.qtype in ("spatial", "existence"))
    assert set(yes_no) == {"yes", "no"} and min(yes_no.values()) >= 35
    counts = collections.Counter(e.answer for e in test if e.qtype == "counting")
    assert set(counts) == {"0", "1", "2", "3", "4"}


def test_the_sign_reads_back_from_the_pixels():
    for e in ovqa.examples("calibration", 10):
        assert read_sign(e.image(), e.scene) == e.scene.text


def test_ask_gives_valid_questions_about_any_scene():
    rng = random.Random(0)
    types = set()
    for e in ovqa.examples("train", 30):
        for _ in range(5):
            question, answer, qtype = ovqa.ask(e.scene, rng)
            assert oracle(e.scene, question) == answer, question
            types.add(qtype)
    assert types == set(ovqa.TYPES)


def test_scenes_are_mostly_background():
    image = np.asarray(ovqa.example("test", 0).image()).astype(int)
    patches = image.reshape(24, 16, 24, 16, 3).std(axis=(1, 3)).max(axis=-1)   # 16-px patches
    assert (patches < 12).mean() > 0.6   # most patches are plain or faint texture: redundant for the model


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ovqa.example("dev", 0)
    with pytest.raises(ValueError, match=">= 0"):
        ovqa.example("test", -1)


def test_export_jsonl_round_trips_through_the_bridge(tmp_path):
    from iwp.calibration.evaluate import jsonl_items
    path = ovqa.export_jsonl("test", 6, tmp_path / "ovqa")
    items = jsonl_items(path)
    originals = ovqa.examples("test", 6)
    assert [(it.question, it.answers, it.qtype) for it in items] == [(e.question, (e.answer,), e.qtype) for e in originals]
    assert np.array_equal(np.asarray(items[0].load()), np.asarray(originals[0].image()))
