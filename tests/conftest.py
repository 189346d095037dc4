"""Shared test helpers: a synthetic LayerView built from random tensors, no model needed."""
from __future__ import annotations

import math

import torch

from iwp.plugins.visual_token_select.view import LayerView


def synthetic_view(B: int = 2, N: int = 16, Q: int = 3, Hq: int = 4, Hkv: int = 2, d: int = 16, D: int = 32,
                   starts: list[int] | None = None, seed: int = 0, scale: float = 1.0, v_scale: float = 1.0,
                   ttv: bool = True, layer: int = 2, stage: int = 0, n_stages: int = 1) -> LayerView:
    """A LayerView over random fp32 tensors.

    Sample b has its visual block at starts[b] (default 1 + 2b, so it differs per sample), then its
    instruction tokens, then padding. Odd samples have one instruction token fewer (when Q > 1), so
    query_mask and key_mask both carry padding.
    """
    assert Hq % Hkv == 0
    g = torch.Generator().manual_seed(seed)
    starts = list(starts) if starts is not None else [1 + 2 * b for b in range(B)]
    assert len(starts) == B
    n_queries = [Q if b % 2 == 0 or Q == 1 else Q - 1 for b in range(B)]
    T = max(starts) + N + Q + 1                                        # at least one padding slot

    def randn(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    key_mask = torch.zeros(B, T, dtype=torch.bool)
    query_idx = torch.zeros(B, Q, dtype=torch.long)
    query_mask = torch.zeros(B, Q, dtype=torch.bool)
    last_idx = torch.zeros(B, dtype=torch.long)
    for b, (s, nq) in enumerate(zip(starts, n_queries)):
        first_q = s + N
        last = first_q + nq - 1
        key_mask[b, : last + 1] = True
        query_idx[b, :nq] = torch.arange(first_q, last + 1)
        query_idx[b, nq:] = last                                       # a valid position, masked off
        query_mask[b, :nq] = True
        last_idx[b] = last

    side = math.ceil(math.sqrt(N))
    i = torch.arange(N)
    xy = torch.stack([i % side, i // side], dim=-1).float() / max(side - 1, 1)
    return LayerView(
        hidden=randn(B, T, D),
        q=randn(B, Hq, T, d, s=scale),
        k=randn(B, Hkv, T, d, s=scale),
        q_rot=randn(B, Hq, T, d, s=scale),
        k_rot=randn(B, Hkv, T, d, s=scale),
        v=randn(B, Hkv, T, d, s=v_scale),
        key_mask=key_mask,
        visual_start=torch.tensor(starts, dtype=torch.long),
        n_visual=N,
        query_idx=query_idx,
        query_mask=query_mask,
        last_idx=last_idx,
        visual_xy=xy.expand(B, N, 2).clone(),
        ttv=torch.rand(B, N, generator=g) + 0.01 if ttv else None,
        layer=layer,
        stage=stage,
        n_stages=n_stages,
    )


# --- tiny-llava-ov fixtures: built once per session, from a seed, no download ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from iwp.zoo import load
    return load("tiny-llava-ov")


@pytest.fixture(scope="session")
def tiny_model(tiny):
    from iwp.model import PrunedLlavaOnevision
    return PrunedLlavaOnevision(tiny.model)


@pytest.fixture(scope="session")
def tiny_1x1():
    from iwp.zoo import load
    return load("tiny-llava-ov", grid="1x1")
