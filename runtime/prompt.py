"""One image and prompt -> the engine's fixed-length batch, and the prefill graph's inputs by role.

The chat template, the image-token checks and the derived token positions are iwp/inputs.py's (one home);
this module only sizes the batch to the engine: its resolution, its N and its prompt capacity.
"""
from __future__ import annotations

import numpy as np

from iwp.engine_format import REBUILD, EngineManifest


def prepare(manifest: EngineManifest, processor, image, prompt: str):
    """The processor's inputs for one image and prompt, left-padded to the engine's fixed prompt length."""
    from iwp.inputs import encode, pad_to_length
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    batch = encode(processor, image, prompt, tuple(manifest.model.resolution), manifest.model.n_visual,
                   expected=f"engine {manifest.directory} expects", fix=REBUILD)
    return pad_to_length(batch, manifest.shapes.max_prompt, manifest.tokens.pad)


def prefill_arrays(batch, embeds: np.ndarray) -> dict[str, np.ndarray]:
    """The prefill graph's inputs of a padded batch, by role (iwp/engine_format.py ROLES["prefill"])."""
    return {"embeddings": embeds, "attention_mask": batch.attention_mask.numpy(), "positions": batch.positions.numpy(),
            "visual_start": batch.visual_start.numpy(), "query_idx": batch.query_idx.numpy(),
            "query_mask": batch.query_mask.numpy(), "last_idx": batch.last_idx.numpy()}
