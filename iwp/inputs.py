"""Turn images and prompts into a model batch, deriving where the image tokens sit.

Positions come from the tokenizer, the chat template and the image-token id, never from a fixed offset.
Batches are left-padded; each prompt holds exactly one image, whose N visual tokens are contiguous.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .zoo import Loaded


@dataclass
class Batch:
    input_ids: Tensor        # [B, T]
    attention_mask: Tensor   # [B, T] 1 on real tokens (left padding)
    positions: Tensor        # [B, T] RoPE positions
    pixel_values: Tensor     # [B, crops, 3, H, W]
    image_sizes: Tensor      # [B, 2]
    visual_start: Tensor     # [B] first image token
    n_visual: int            # N image tokens per sample
    query_idx: Tensor        # [B, Q] instruction tokens: every real token after the image
    query_mask: Tensor       # [B, Q]
    last_idx: Tensor         # [B]
    visual_xy: Tensor        # [N, 2] (y, x) in [0, 1] of each visual token on its crop grid


def load_image(image) -> Image.Image:
    """An RGB image from a path or a PIL image. Grayscale, RGBA, palette and 16-bit inputs are converted."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise ValueError(f"image {path} is a directory; pass a path to a PNG or JPEG file")
        if not path.is_file():
            raise ValueError(f"image {path} does not exist; pass a path to a PNG or JPEG file")
        if path.stat().st_size == 0:
            raise ValueError(f"image {path} is empty (0 bytes); pass a valid PNG or JPEG file")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except Image.DecompressionBombError:
            raise ValueError(f"image {path} has more pixels than PIL's safety limit ({Image.MAX_IMAGE_PIXELS}); "
                             f"downscale it first (every image is resized to the engine's grid anyway)") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image {path} cannot be read ({err}); pass a valid PNG or JPEG file") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected an image path or a PIL image, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparent areas become white
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def check_prompt(prompt) -> str:
    """A prompt is text: a str that encodes as UTF-8 (bytes that do not decode arrive as lone surrogates)."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"prompt {prompt!r} is not valid UTF-8 text; pass the prompt in UTF-8") from None
    return prompt


def chat_text(processor, prompt: str, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def visual_grid_xy(loaded: Loaded) -> Tensor:
    """(y, x) of each visual token in its crop's frame: the base grid, then the high-res rows with newlines."""
    def grid(rows: int, cols: int) -> Tensor:
        y, x = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
        return torch.stack([y, x], dim=-1)
    side = loaded.patch_side
    rows, cols = loaded.high_res_shape
    newline = torch.stack([(torch.arange(rows) + 0.5) / rows, torch.ones(rows)], dim=-1)[:, None]
    high = torch.cat([grid(rows, cols), newline], dim=1)            # [rows, cols + 1, 2]
    return torch.cat([grid(side, side).reshape(-1, 2), high.reshape(-1, 2)])


def make_batch(loaded: Loaded, images, prompts, system: str | list[str | None] | None = None) -> Batch:
    """One image per prompt; `system` is one system prompt for all, or one per prompt."""
    batch = encode(loaded.processor, images, prompts, loaded.resolution, loaded.n_visual, system,
                   expected=f"the {loaded.spec.grid_name} grid gives",
                   fix="the processor and the model disagree, rebuild with a matching grid")
    return dataclasses.replace(batch, visual_xy=visual_grid_xy(loaded))


def encode(processor, images, prompts, resolution: tuple[int, int], n_visual: int,
           system: str | list[str | None] | None = None, expected: str = "the model expects",
           fix: str = "the processor and the model disagree") -> Batch:
    """The processor's batch for images and prompts, with the image tokens' positions derived and checked
    (one image per prompt, N contiguous image tokens, text after the image); `visual_xy` is left None.
    `expected` and `fix` word the error when the processor's image-token count is not `n_visual`.
    make_batch (a loaded model) and the runtime (an engine directory) both build batches here."""
    images = images if isinstance(images, (list, tuple)) else [images]
    if not isinstance(prompts, (str, list, tuple)):
        raise TypeError(f"a prompt must be a string (or a list of strings, one per image), got {type(prompts).__name__}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass one image per prompt")
    for prompt in prompts:
        check_prompt(prompt)
    systems = system if isinstance(system, (list, tuple)) else [system] * len(prompts)
    if len(systems) != len(prompts):
        raise ValueError(f"got {len(systems)} system prompts for {len(prompts)} prompts; pass one or one per prompt")
    texts = [chat_text(processor, p, s) for p, s in zip(prompts, systems)]
    image_token = processor.image_token
    for text in texts:
        if text.count(image_token) != 1:
            raise ValueError(f"a prompt holds {text.count(image_token)} {image_token} tokens; iwp takes exactly one "
                             f"image per prompt, so remove {image_token} from the prompt text")
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} image(s) for {len(texts)} prompt(s); pass one image per prompt")
    height, width = resolution
    pil = [load_image(im).resize((width, height), Image.Resampling.BICUBIC) for im in images]
    enc = processor(images=pil, text=texts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    is_image = ids == processor.image_token_id
    n = n_visual
    counts = is_image.sum(dim=1)
    if (counts != n).any():
        raise ValueError(f"prompt has {counts.tolist()} image tokens but {expected} {n}; {fix}")
    start = is_image.int().argmax(dim=1)
    span = torch.arange(n)[None] + start[:, None]
    if not is_image.gather(1, span).all():
        raise ValueError("the image tokens are not contiguous; iwp takes exactly one image per prompt")
    t = ids.shape[1]
    after = start + n                              # first instruction token
    q = int((t - after).max())
    if q < 1:
        raise ValueError("no text follows the image; the chat template must put the prompt after the image")
    query_idx = (after[:, None] + torch.arange(q)[None]).clamp(max=t - 1)
    query_mask = (after[:, None] + torch.arange(q)[None]) < t
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return Batch(ids, mask, positions, enc["pixel_values"], enc["image_sizes"], start, n,
                 query_idx, query_mask, torch.full((ids.shape[0],), t - 1), None)


def fit_capacity(batch: Batch, length: int) -> Batch:
    """An unpadded batch sized to an engine that holds up to `length` tokens: the prompt keeps its own length
    (the prefill runs over the real tokens), and Q becomes length - N, the engine's fixed query slots."""
    t = batch.input_ids.shape[1]
    if t > length:
        raise ValueError(f"prompt is {t} tokens (with {batch.n_visual} image tokens) but the engine's capacity is "
                         f"{length}; shorten the prompt or rebuild the engine with a larger MAX_TEXT_TOKENS")
    if not bool(batch.attention_mask.bool().all()):
        raise ValueError("an engine's prefill takes one unpadded prompt; pass one image and one prompt")
    query = (batch.visual_start + batch.n_visual)[:, None] + torch.arange(length - batch.n_visual)[None]
    return dataclasses.replace(batch, query_idx=query.clamp(max=t - 1), query_mask=query < t)


def pad_to_length(batch: Batch, length: int, pad_token_id: int) -> Batch:
    """Left-pad a batch to `length` tokens (an engine's fixed prompt length); Q becomes length - N."""
    t = batch.input_ids.shape[1]
    if t > length:
        raise ValueError(f"prompt is {t} tokens (with {batch.n_visual} image tokens) but the engine's capacity is "
                         f"{length}; shorten the prompt or rebuild the engine with a larger max prompt")
    pad = length - t
    b = batch.input_ids.shape[0]
    ids = torch.cat([torch.full((b, pad), pad_token_id, dtype=batch.input_ids.dtype), batch.input_ids], 1)
    mask = torch.cat([torch.zeros(b, pad, dtype=batch.attention_mask.dtype), batch.attention_mask], 1)
    q = length - batch.n_visual
    after = batch.visual_start + pad + batch.n_visual
    query = after[:, None] + torch.arange(q)[None]
    return Batch(ids, mask, (mask.long().cumsum(1) - 1).clamp(min=0), batch.pixel_values, batch.image_sizes,
                 batch.visual_start + pad, batch.n_visual, query.clamp(max=length - 1), query < length,
                 torch.full((b,), length - 1), batch.visual_xy)
