"""A seeded synthetic scene for demos and smoke runs when no image is given: a few shapes on a plain
background, so most patches are redundant, as in a robot camera frame."""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def demo_image(seed: int = 0, size: tuple[int, int] = (384, 384)) -> Image.Image:
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, (235, 235, 230))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 4)):
        colour = COLOURS[rng.choice(sorted(COLOURS))]
        r = rng.randint(min(size) // 12, min(size) // 6)
        x, y = rng.randint(r, width - r), rng.randint(r, height - r)
        shape = rng.choice(("circle", "square", "triangle"))
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return image
