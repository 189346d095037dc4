"""Per-token training targets of an OVQA scene, in the order ovqa-small's LM sees the visual tokens: each
patch's class (background, a coloured shape, the sign, a glyph), the shape's size, the shapes' centres, the
sign's glyph ordinals, the instance under each patch, and each token's place in its crop. `iwp train` uses
them for its per-token heads, its token dropping and its guided heads."""
from __future__ import annotations

import numpy as np

from iwp.calibration import ovqa

IMAGE_SIZE, PATCH = 192, 12          # 16x16 = 256 patches per crop
SIDE = IMAGE_SIZE // PATCH


def _per_patch(canvas: np.ndarray, grid: int, assign) -> np.ndarray:
    """[1 + grid², SIDE²]: `assign(counts, area)` over each patch's pixel values, for the base crop and then
    the tiles row by row, as the processor orders its crops."""
    def crop(region: np.ndarray) -> np.ndarray:
        q = region.shape[0] // SIDE
        cells = region.reshape(SIDE, q, SIDE, q).transpose(0, 2, 1, 3).reshape(SIDE * SIDE, q * q).astype(np.int64)
        counts = np.bincount((np.arange(SIDE * SIDE)[:, None] * 256 + cells).ravel(),
                             minlength=SIDE * SIDE * 256).reshape(SIDE * SIDE, 256)
        return assign(counts, q * q)
    tile = ovqa.CANVAS // grid
    return np.stack([crop(canvas)] + [crop(canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
                                      for r in range(grid) for c in range(grid)])


def patch_labels(scene: ovqa.Scene, grid: int) -> np.ndarray:
    """[1 + grid², 256] class of each patch of each crop: a glyph where glyph strokes cover >= 5% of the
    patch, else the shape or sign covering the most of it if >= 15%, else background."""
    def assign(counts, area):
        things, glyphs = counts[:, 1:ovqa.SIGN_LABEL + 1], counts[:, ovqa.SIGN_LABEL + 1:ovqa.N_LABELS]
        label = np.where(things.max(1) >= 0.15 * area, 1 + things.argmax(1), 0)
        return np.where(glyphs.max(1) >= 0.05 * area, ovqa.SIGN_LABEL + 1 + glyphs.argmax(1), label)
    return _per_patch(ovqa.render_labels(scene), grid, assign)


def patch_instances(scene: ovqa.Scene, grid: int) -> np.ndarray:
    """[1 + grid², 256]: which shape (1 + its index) or the sign (255) covers >= 15% of each patch, else 0."""
    def assign(counts, area):
        covered = counts[:, 1:]
        return np.where(covered.max(1) >= 0.15 * area, 1 + covered.argmax(1), 0)
    return _per_patch(ovqa.render_instances(scene), grid, assign)


def glyph_ordinals(scene: ovqa.Scene, grid: int) -> np.ndarray:
    """[1 + grid², 256]: which of the sign's glyphs (0, 1, 2) a patch shows, -100 where none does."""
    canvas = np.zeros((ovqa.CANVAS, ovqa.CANVAS), np.uint8)
    g, (x0, y0) = scene.glyph_scale, scene.sign_xy
    for i in range(ovqa.SIGN_LENGTH):
        gx = x0 + 6 + i * 6 * g
        canvas[y0 + 6:y0 + 6 + 7 * g, gx:gx + 5 * g] = 1 + i

    def assign(counts, area):
        covered = counts[:, 1:1 + ovqa.SIGN_LENGTH]
        return np.where(covered.max(1) >= 0.15 * area, covered.argmax(1), -100)
    return _per_patch(canvas, grid, assign)


def centres(scene: ovqa.Scene, grid: int) -> np.ndarray:
    """[1 + grid², 256]: 1 on the patch that holds a shape's centre, in every crop that shows it, else 0."""
    out = np.zeros((1 + grid * grid, SIDE * SIDE), np.int64)
    tile = ovqa.CANVAS // grid
    for s in scene.shapes:
        out[0, (s.y * SIDE // ovqa.CANVAS) * SIDE + s.x * SIDE // ovqa.CANVAS] = 1
        r, c = s.y // tile, s.x // tile
        out[1 + r * grid + c, ((s.y - r * tile) * SIDE // tile) * SIDE + (s.x - c * tile) * SIDE // tile] = 1
    return out


CLASS, SIZE, CENTRE, ORDINAL, INSTANCE = range(5)   # the columns of patch_targets


def patch_targets(scene: ovqa.Scene, grid: int) -> np.ndarray:
    """[1 + grid², 256, 5]: (class, size, centre, glyph ordinal, instance) of every patch; size and ordinal
    are -100 where they do not apply. The per-token heads learn the first four; the guided heads find
    objects by the instance."""
    labels, instances = patch_labels(scene, grid), patch_instances(scene, grid)
    sizes = np.array([-100] + [int(s.size == "large") for s in scene.shapes] + [-100] * (256 - 1 - len(scene.shapes)))
    size = np.where((instances > 0) & (instances < 255), sizes[np.minimum(instances, 255)], -100)
    return np.stack([labels, size, centres(scene, grid), glyph_ordinals(scene, grid), instances], axis=-1)


def token_order(crops: np.ndarray, grid: int, fill=-1) -> np.ndarray:
    """Per-patch values [1 + grid², 256, ...] in the order the LM sees the visual tokens: the base crop row
    by row, then the high-res tiles stitched into one grid, row by row, each row ending in a newline token
    (`fill`)."""
    rest = crops.shape[2:]
    tiles = crops[1:].reshape(grid, grid, SIDE, SIDE, *rest).swapaxes(1, 2).reshape(grid * SIDE, grid * SIDE, *rest)
    rows = np.concatenate([tiles, np.full((grid * SIDE, 1, *rest), fill, crops.dtype)], axis=1)
    return np.concatenate([crops[0], rows.reshape(-1, *rest)])


def token_labels(crops: np.ndarray, grid: int) -> np.ndarray:
    """Patch labels [1 + grid², 256] in the LM's visual-token order, newlines -1."""
    return token_order(crops, grid)


def token_xy(grid: int) -> np.ndarray:
    """[N, 2] each visual token's (x, y) in [0, 1] within its crop view (newlines NaN)."""
    centre = (np.arange(SIDE) + 0.5) / SIDE
    base = np.stack(np.meshgrid(centre, centre), axis=-1).reshape(-1, 2)
    wide = (np.arange(SIDE * grid) + 0.5) / (SIDE * grid)
    tiles = np.stack(np.meshgrid(wide, wide), axis=-1)                                   # [rows, cols, 2]
    rows = np.concatenate([tiles, np.full((SIDE * grid, 1, 2), np.nan)], axis=1)
    return np.concatenate([base, rows.reshape(-1, 2)]).astype(np.float32)


def spatial_relation(question: str) -> str:
    """The relation a spatial question asks (one of ovqa.RELATIONS)."""
    return next(r for r in ovqa.RELATIONS if f" {r} the " in question)


def question_objects(scene: ovqa.Scene, question: str) -> list[list[int]]:
    """The visual regions a question's answer is read from, as instance ids (1 + a shape's index, 255 the
    sign), one list per lookup: one lookup for most questions (the shapes it names, or the sign), two for a
    spatial one (its first shape, then its second), none for the description."""
    if question.startswith("Is the "):
        text = question[len("Is the "):-1]
        relation = spatial_relation(question)
        return [[1 + i for i, s in enumerate(scene.shapes) if s.name == name] for name in text.split(f" {relation} the ")]
    if question == "Describe the scene.":
        return []
    return [[255 if i == ovqa.SIGN else 1 + i for i in ovqa.referents(scene, question)]]
