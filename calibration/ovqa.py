"""OVQA: a procedurally generated visual-QA benchmark in which most image patches are redundant.

A scene is a few shapes (kind, colour, size, position) on a plain or textured background, plus a small sign
with a three-glyph string. Each example asks one question with a one-word or number answer:

    attribute  "What colour is the triangle?"  "What shape is the blue object?"  "What size is the red circle?"
    counting   "How many red shapes are there?"  "How many circles are there?"
    spatial    "Is the red circle left of the blue square?"   (left of / right of / above / below; yes or no)
    existence  "Is there a green triangle?"                   (yes or no)
    reading    "What does the sign say?"                      (three glyphs of a 5x7 bitmap font: fine detail)

Determinism: example i of a split is a function of (split, i) alone, rendered with our own bitmap font and
numpy textures, so it does not change with the Pillow version. The question types cycle, so every split is
balanced across types, and yes/no and count answers are drawn uniformly before the scene is built.

Splits never overlap: a scene belongs to the split its content hash selects (80% train, 10% calibration,
10% test). A generator for one split redraws until the hash lands in that split, so no scene can appear
in two splits, whatever their sizes.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 384                                   # scenes are drawn at 384x384; the model's grid resizes them
COLOURS = {"red": (215, 45, 40), "green": (45, 165, 70), "blue": (45, 85, 215), "yellow": (225, 195, 35),
           "purple": (140, 65, 175)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 20, "large": 34}             # radius in canvas pixels
TYPES = ("attribute", "counting", "spatial", "existence", "reading")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = {"train": range(0, 8), "calibration": range(8, 9), "test": range(9, 10)}   # content-hash buckets of 10

# A 5x7 bitmap font for the sign: eight glyphs that differ in several pixels each.
GLYPHS = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
}
GLYPH_SCALE = 4                                # canvas pixels per font pixel: glyphs are 20x28
SIGN_LENGTH = 3


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    x: int = 0
    y: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    text: str
    sign_xy: tuple[int, int]                   # top-left corner of the sign
    background: str                            # plain, noise, stripes or checker
    tone: tuple[int, int, int]
    texture_seed: int
    zoom: float = 1.0                          # > 1 draws everything larger (training's curriculum only)

    def radius(self, shape: "Shape") -> int:
        return round(SIZES[shape.size] * self.zoom)

    @property
    def glyph_scale(self) -> int:
        return max(1, round(GLYPH_SCALE * self.zoom))

    def key(self) -> str:
        return repr(self)

    def bucket(self) -> int:
        return int(hashlib.sha256(self.key().encode()).hexdigest(), 16) % 10


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: str
    answer: str
    qtype: str
    split: str
    index: int

    def image(self) -> Image.Image:
        return render(self.scene)


# --- rendering ---------------------------------------------------------------------------------------------

def sign_size(glyph_scale: int = GLYPH_SCALE) -> tuple[int, int]:
    pad, gap = 6, glyph_scale
    return SIGN_LENGTH * 5 * glyph_scale + (SIGN_LENGTH - 1) * gap + 2 * pad, 7 * glyph_scale + 2 * pad


def _background(scene: Scene) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    base = np.broadcast_to(np.array(scene.tone, dtype=np.float32), (CANVAS, CANVAS, 3)).copy()
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]
    if scene.background == "noise":
        base += rng.normal(0, 7, (CANVAS, CANVAS, 1)).astype(np.float32)
    elif scene.background == "stripes":
        period = int(rng.integers(16, 40))
        along = xx if rng.random() < 0.5 else yy
        base += np.where((along // (period // 2)) % 2 == 0, 9.0, -9.0)[..., None]
    elif scene.background == "checker":
        cell = int(rng.integers(20, 48))
        base += np.where(((xx // cell) + (yy // cell)) % 2 == 0, 8.0, -8.0)[..., None]
    return np.clip(base, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, scene: Scene, shape_fill, sign_fill, sign_outline, glyph_fill) -> None:
    for s in scene.shapes:
        r, fill = scene.radius(s), shape_fill(s)
        if s.kind == "circle":
            draw.ellipse((s.x - r, s.y - r, s.x + r, s.y + r), fill=fill)
        elif s.kind == "square":
            q = int(r * 0.85)  # the same area as the circle, roughly
            draw.rectangle((s.x - q, s.y - q, s.x + q, s.y + q), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(s.x, s.y - r), (s.x - r, s.y + int(r * 0.8)), (s.x + r, s.y + int(r * 0.8))], fill=fill)
        else:
            draw.polygon([(s.x, s.y - r), (s.x + r, s.y), (s.x, s.y + r), (s.x - r, s.y)], fill=fill)
    g = scene.glyph_scale
    width, height = sign_size(g)
    x0, y0 = scene.sign_xy
    draw.rectangle((x0, y0, x0 + width - 1, y0 + height - 1), fill=sign_fill, outline=sign_outline)
    for i, char in enumerate(scene.text):
        gx = x0 + 6 + i * (5 + 1) * g
        for row, bits in enumerate(GLYPHS[char]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    px, py = gx + col * g, y0 + 6 + row * g
                    draw.rectangle((px, py, px + g - 1, py + g - 1), fill=glyph_fill(char))


def render(scene: Scene) -> Image.Image:
    image = Image.fromarray(_background(scene))
    _draw(ImageDraw.Draw(image), scene, lambda s: COLOURS[s.colour], (250, 250, 250), (30, 30, 30),
          lambda char: (20, 20, 20))
    return image


# Per-pixel classes of a scene, for training's dense auxiliary loss: 0 background, then one class per
# (colour, shape), the sign, and one class per glyph.
SHAPE_LABELS = {(c, k): 1 + i for i, (c, k) in enumerate((c, k) for c in sorted(COLOURS) for k in SHAPES)}
SIGN_LABEL = 1 + len(SHAPE_LABELS)
GLYPH_LABELS = {char: SIGN_LABEL + 1 + i for i, char in enumerate(sorted(GLYPHS))}
N_LABELS = SIGN_LABEL + 1 + len(GLYPHS)


def render_labels(scene: Scene) -> np.ndarray:
    """[CANVAS, CANVAS] uint8 class of every pixel, drawn with the same geometry as `render`."""
    image = Image.new("L", (CANVAS, CANVAS), 0)
    _draw(ImageDraw.Draw(image), scene, lambda s: SHAPE_LABELS[(s.colour, s.kind)], SIGN_LABEL, SIGN_LABEL,
          lambda char: GLYPH_LABELS[char])
    return np.asarray(image)


SIGN = -1   # the sign, among a question's referents


def render_instances(scene: Scene) -> np.ndarray:
    """[CANVAS, CANVAS] uint8: 1 + the index of the shape at each pixel, 255 on the sign, 0 elsewhere."""
    image = Image.new("L", (CANVAS, CANVAS), 0)
    index = {id(s): 1 + i for i, s in enumerate(scene.shapes)}
    _draw(ImageDraw.Draw(image), scene, lambda s: index[id(s)], 255, 255, lambda char: 255)
    return np.asarray(image)


def referents(scene: Scene, question: str) -> tuple[int, ...]:
    """Which shapes (indices into scene.shapes) and whether the sign (SIGN) a question is about: the image
    regions its answer comes from. Parses the templates this module writes."""
    shapes = list(enumerate(scene.shapes))
    words = question.rstrip("?.").split()
    if question == "What does the sign say?":
        return (SIGN,)
    if question == "Describe the scene.":
        return tuple(i for i, _ in shapes) + (SIGN,)
    if question.startswith("How many"):
        word = words[2]
        return tuple(i for i, s in shapes if s.colour == word or s.kind + "s" == word)
    if question.startswith("Is there"):
        return tuple(i for i, s in shapes if (s.colour, s.kind) == (words[-2], words[-1]))
    if question.startswith("What colour is the"):
        return tuple(i for i, s in shapes if s.kind == words[-1])
    if question.startswith("What shape is the"):
        return tuple(i for i, s in shapes if s.colour == words[4])
    if question.startswith("What size is the"):
        return tuple(i for i, s in shapes if (s.colour, s.kind) == (words[-2], words[-1]))
    if question.startswith("Is the"):
        text = question[len("Is the "):-1]
        relation = next(r for r in RELATIONS if f" {r} the " in text)
        names = text.split(f" {relation} the ")
        return tuple(i for i, s in shapes if s.name in names)
    raise ValueError(f"not an OVQA question: {question!r}")


def describe(scene: Scene) -> str:
    """A description of the whole scene, top to bottom as the image's tokens run: a dense training target (not
    a benchmark question)."""
    shapes = ", ".join(f"{s.size} {s.name}" for s in sorted(scene.shapes, key=lambda s: (s.y, s.x)))
    return f"sign {scene.text}; {shapes}"


# --- scene construction ------------------------------------------------------------------------------------

def _random_shape(rng: random.Random, avoid=lambda s: False) -> Shape:
    for _ in range(1000):
        s = Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES)))
        if not avoid(s):
            return s
    raise RuntimeError("no shape satisfies the constraint")  # unreachable with the constraints used here


def _place(rng: random.Random, shapes: list[Shape], constraint=None,
           zoom: float = 1.0) -> tuple[tuple[Shape, ...], tuple[int, int]] | None:
    """Positions for the shapes and the sign, with no overlaps; `constraint(placed)` may reject a layout."""
    width, height = sign_size(max(1, round(GLYPH_SCALE * zoom)))
    margin = 4
    for _ in range(50):
        sign = (rng.randint(margin, CANVAS - width - margin), rng.randint(margin, CANVAS - height - margin))
        placed: list[Shape] = []
        for s in shapes:
            r = round(SIZES[s.size] * zoom)
            for _ in range(200):
                x, y = rng.randint(r + margin, CANVAS - r - margin), rng.randint(r + margin, CANVAS - r - margin)
                clear_of_sign = (x + r + 6 < sign[0] or x - r - 6 > sign[0] + width or
                                 y + r + 6 < sign[1] or y - r - 6 > sign[1] + height)
                clear = all((x - p.x) ** 2 + (y - p.y) ** 2 > (r + round(SIZES[p.size] * zoom) + 8) ** 2
                            for p in placed)
                if clear and clear_of_sign:
                    placed.append(Shape(s.kind, s.colour, s.size, x, y))
                    break
            else:
                break
        if len(placed) == len(shapes) and (constraint is None or constraint(placed)):
            return tuple(placed), sign
    return None


def _scene(rng: random.Random, shapes: list[Shape], constraint=None, zoom: float = 1.0) -> Scene | None:
    rng.shuffle(shapes)
    layout = _place(rng, shapes, constraint, zoom)
    if layout is None:
        return None
    placed, sign = layout
    text = "".join(rng.choice(sorted(GLYPHS)) for _ in range(SIGN_LENGTH))
    background = rng.choice(("plain", "noise", "stripes", "checker"))
    grey = rng.randint(200, 240)
    tone = (grey + rng.randint(-8, 8), grey + rng.randint(-8, 8), grey + rng.randint(-8, 8))
    return Scene(placed, text, sign, background, tone, rng.randrange(2**31), zoom)


def plural(kind: str) -> str:
    return kind + "s"


def _unique(shapes, s: Shape) -> bool:
    return sum(p.kind == s.kind and p.colour == s.colour for p in shapes) == 1


def _attribute(rng: random.Random):
    variant = rng.choice(("colour", "shape", "size"))
    extra = rng.randint(2, 4)
    target = _random_shape(rng)
    if variant == "colour":    # the only shape of its kind
        others = [_random_shape(rng, lambda s: s.kind == target.kind) for _ in range(extra)]
        question, answer = f"What colour is the {target.kind}?", target.colour
    elif variant == "shape":   # the only object of its colour
        others = [_random_shape(rng, lambda s: s.colour == target.colour) for _ in range(extra)]
        question, answer = f"What shape is the {target.colour} object?", target.kind
    else:                      # the only object of its colour and kind
        others = [_random_shape(rng, lambda s: s.colour == target.colour and s.kind == target.kind)
                  for _ in range(extra)]
        question, answer = f"What size is the {target.name}?", target.size
    return [target, *others], None, question, answer


def _counting(rng: random.Random):
    count = rng.randint(0, 4)
    extra = rng.randint(max(0, 3 - count), 6 - count) if count < 6 else 0
    if rng.random() < 0.5:
        colour = rng.choice(sorted(COLOURS))
        hits = [_random_shape(rng, lambda s: s.colour != colour) for _ in range(count)]
        hits = [Shape(s.kind, colour, s.size) for s in hits]
        others = [_random_shape(rng, lambda s: s.colour == colour) for _ in range(extra)]
        question = f"How many {colour} shapes are there?"
    else:
        kind = rng.choice(SHAPES)
        hits = [Shape(kind, rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES))) for _ in range(count)]
        others = [_random_shape(rng, lambda s: s.kind == kind) for _ in range(extra)]
        question = f"How many {plural(kind)} are there?"
    return [*hits, *others], None, question, str(count)


def _spatial(rng: random.Random):
    a = _random_shape(rng)
    b = _random_shape(rng, lambda s: s.kind == a.kind and s.colour == a.colour)
    named = lambda s: (s.kind, s.colour) in {(a.kind, a.colour), (b.kind, b.colour)}  # noqa: E731
    others = [_random_shape(rng, named) for _ in range(rng.randint(1, 3))]
    relation, answer = rng.choice(RELATIONS), rng.choice(("yes", "no"))
    margin = 24

    def holds(placed) -> bool:
        pa = next(p for p in placed if (p.kind, p.colour) == (a.kind, a.colour))
        pb = next(p for p in placed if (p.kind, p.colour) == (b.kind, b.colour))
        dx, dy = pa.x - pb.x, pa.y - pb.y
        along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
        return along > margin if answer == "yes" else along < -margin
    return [a, b, *others], holds, f"Is the {a.name} {relation} the {b.name}?", answer


def _existence(rng: random.Random):
    target = _random_shape(rng)
    answer = rng.choice(("yes", "no"))
    same = lambda s: s.kind == target.kind and s.colour == target.colour  # noqa: E731
    shapes = [_random_shape(rng, same) for _ in range(rng.randint(3, 6))]
    if answer == "yes":
        shapes[0] = target
    elif rng.random() < 0.7:   # a hard negative: the colour and the kind are there, not together
        shapes[0] = Shape(target.kind, rng.choice([c for c in sorted(COLOURS) if c != target.colour]), "small")
        shapes[1] = Shape(rng.choice([k for k in SHAPES if k != target.kind]), target.colour, "large")
    article = "an" if target.colour[0] in "aeiou" else "a"
    return shapes, None, f"Is there {article} {target.name}?", answer


def _reading(rng: random.Random):
    others = [_random_shape(rng) for _ in range(rng.randint(2, 5))]
    return others, None, "What does the sign say?", None   # the answer is the scene's text


BUILDERS = {"attribute": _attribute, "counting": _counting, "spatial": _spatial, "existence": _existence,
            "reading": _reading}


def _rng(*parts) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))   # string seeds hash with SHA-512: stable everywhere


def example(split: str, index: int, zoom: float = 1.0) -> Example:
    """Example `index` of `split` (train, calibration or test); question types cycle through TYPES. `zoom`
    draws larger shapes and sign (training's curriculum); the benchmark is zoom 1."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")
    qtype = TYPES[index % len(TYPES)]
    for attempt in range(10_000):
        rng = _rng("ovqa", split, index, attempt) if zoom == 1.0 else _rng("ovqa", split, index, attempt, zoom)
        shapes, constraint, question, answer = BUILDERS[qtype](rng)
        scene = _scene(rng, shapes, constraint, zoom)
        if scene is not None and scene.bucket() in SPLITS[split]:
            return Example(scene, question, answer if answer is not None else scene.text, qtype, split, index)
    raise RuntimeError(f"could not draw example {index} of {split}")  # unreachable: each split is 10% or more


def examples(split: str, count: int, start: int = 0, zoom: float = 1.0) -> list[Example]:
    return [example(split, i, zoom) for i in range(start, start + count)]


# --- more questions about one scene (training asks several per image) --------------------------------------

def ask(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """A random valid (question, answer, type) about an existing scene."""
    shapes = scene.shapes
    while True:
        qtype = rng.choice(TYPES)
        if qtype == "reading":
            return "What does the sign say?", scene.text, qtype
        if qtype == "counting":
            if rng.random() < 0.5:
                colour = rng.choice(sorted(COLOURS))
                return (f"How many {colour} shapes are there?", str(sum(s.colour == colour for s in shapes)), qtype)
            kind = rng.choice(SHAPES)
            return f"How many {plural(kind)} are there?", str(sum(s.kind == kind for s in shapes)), qtype
        if qtype == "existence":
            kind, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
            present = any(s.kind == kind and s.colour == colour for s in shapes)
            article = "an" if colour[0] in "aeiou" else "a"
            return f"Is there {article} {colour} {kind}?", "yes" if present else "no", qtype
        unique = [s for s in shapes if _unique(shapes, s)]
        if qtype == "attribute" and unique:
            s = rng.choice(unique)
            variant = rng.choice(("colour", "shape", "size"))
            if variant == "colour" and sum(p.kind == s.kind for p in shapes) == 1:
                return f"What colour is the {s.kind}?", s.colour, qtype
            if variant == "shape" and sum(p.colour == s.colour for p in shapes) == 1:
                return f"What shape is the {s.colour} object?", s.kind, qtype
            if variant == "size":
                return f"What size is the {s.name}?", s.size, qtype
        if qtype == "spatial" and len(unique) >= 2:
            a, b = rng.sample(unique, 2)
            relation = rng.choice(RELATIONS)
            dx, dy = a.x - b.x, a.y - b.y
            along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
            if abs(along) > 24:
                return f"Is the {a.name} {relation} the {b.name}?", "yes" if along > 0 else "no", qtype


def export_jsonl(split: str, count: int, out):
    """`count` questions of `split` as out/questions.jsonl plus out/images/*.png: the JSONL VQA format that
    `iwp eval --data` reads, so the bridge for real benchmarks can be checked on OVQA. Written all-or-nothing."""
    import json
    from pathlib import Path

    from iwp.atomic import staged_directory
    out = Path(out)
    with staged_directory(out) as staging:
        (staging / "images").mkdir()
        lines = []
        for e in examples(split, count):
            name = f"images/{split}-{e.index:06d}.png"
            e.image().save(staging / name)
            lines.append(json.dumps({"image": name, "question": e.question, "answers": [e.answer], "type": e.qtype}))
        (staging / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return out / "questions.jsonl"
