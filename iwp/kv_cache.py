"""Static, preallocated per-layer KV caches: the one definition of their layout.

Layer l holds prefill_len[l] + max_new slots of shape [B, Hkv, slots, d]. After pruning, later layers have
shorter prefills, so their caches are shorter. Decode step s writes slot prefill_len[l] + s of every layer;
`valid` masks padding and the slots not yet written, so shapes never change and decode can be captured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    prefill_len: list[int]
    keys: list[Tensor]      # per layer [B, Hkv, prefill_len + max_new, d]
    values: list[Tensor]
    valid: list[Tensor]     # per layer [B, prefill_len + max_new] bool
    max_new: int

    @classmethod
    def allocate(cls, prefill_len: list[int], max_new: int, batch: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device) -> "KVCache":
        shapes = [(batch, n_kv, n + max_new, head_dim) for n in prefill_len]
        return cls(list(prefill_len), [torch.zeros(s, dtype=dtype, device=device) for s in shapes],
                   [torch.zeros(s, dtype=dtype, device=device) for s in shapes],
                   [torch.zeros(batch, n + max_new, dtype=torch.bool, device=device) for n in prefill_len], max_new)

    def fill(self, layer: int, k: Tensor, v: Tensor, key_mask: Tensor) -> None:
        n = self.prefill_len[layer]
        assert k.shape[2] == n, f"layer {layer}: prefill wrote {k.shape[2]} tokens into a cache laid out for {n}"
        self.keys[layer][:, :, :n] = k
        self.values[layer][:, :, :n] = v
        self.valid[layer][:, :n] = key_mask

    def check_step(self, step: int) -> None:
        if not 0 <= step < self.max_new:
            raise ValueError(f"decode step {step} is past the cache's {self.max_new} new-token slots; "
                             f"raise max_new_tokens")


def write_slot(keys: Tensor, values: Tensor, valid: Tensor, slot: Tensor, k: Tensor, v: Tensor):
    """Out-of-place write of one token's k, v [B, Hkv, 1, d] at `slot` (a 0-d int64 tensor) of a layer's
    cache [B, Hkv, S, d] / valid [B, S]. A one-hot `where`, so shapes are static and it exports as is."""
    hit = torch.arange(keys.shape[2], device=keys.device) == slot                   # [S]
    return (torch.where(hit[None, None, :, None], k, keys), torch.where(hit[None, None, :, None], v, values),
            valid | hit[None])


def write_slots(keys: Tensor, values: Tensor, valid: Tensor, offset: Tensor, k: Tensor, v: Tensor):
    """Out-of-place write of T tokens' k, v [B, Hkv, T, d] at slots [offset, offset + T) (offset a 0-d int64
    tensor) of a layer's cache [B, Hkv, S, d] / valid [B, S]: a gather and a `where` over the fixed S slots,
    so the cache's shape never changes and T may be dynamic (a segment graph's prefill or one decode token)."""
    rel = torch.arange(keys.shape[2], device=keys.device) - offset                  # [S]
    hit = (rel >= 0) & (rel < k.shape[2])
    src = rel.clamp(0, k.shape[2] - 1)
    return (torch.where(hit[None, None, :, None], k.index_select(2, src), keys),
            torch.where(hit[None, None, :, None], v.index_select(2, src), values), valid | hit[None])
