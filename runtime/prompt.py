"""One image and prompt -> the engine's batch, and the decoder graphs' first inputs by role.

The chat template, the image-token checks and the derived token positions are iwp/inputs.py's (one home);
this module only sizes the batch to the engine: its resolution, its N and its prompt capacity. The prompt
keeps its own length (the prefill runs over the real tokens); only the query slots are fixed.
"""
from __future__ import annotations

import numpy as np

from iwp.engine_format import REBUILD, EngineManifest


def prepare(manifest: EngineManifest, processor, image, prompt: str):
    """The processor's inputs for one image and prompt, unpadded, with the engine's fixed query slots."""
    from iwp.inputs import encode, fit_capacity
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    batch = encode(processor, image, prompt, tuple(manifest.model.resolution), manifest.model.n_visual,
                   expected=f"engine {manifest.directory} expects", fix=REBUILD)
    return fit_capacity(batch, manifest.shapes.max_prompt)


def prefill_arrays(batch, embeds: np.ndarray) -> dict[str, np.ndarray]:
    """The first segment's and selection's inputs of a batch, by role (iwp/engine_format.py ROLES)."""
    return {"hidden": embeds, "positions": batch.positions.numpy(), "offset": np.array(0, dtype=np.int64),
            "visual_start": batch.visual_start.numpy(), "query_idx": batch.query_idx.numpy(),
            "query_mask": batch.query_mask.numpy(), "last_idx": batch.last_idx.numpy()}
