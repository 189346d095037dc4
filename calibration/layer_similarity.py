"""BTP's layer choice: how much the visual hidden states change across adjacent layers, on a calibration set.

change[l] = 1 − mean cosine(h_l, h_{l+1}) over the visual tokens, where h_l is the input of decoder layer l.
Stage layers are placed at equal quantiles of the cumulative change, so each stage covers the same amount
of representation change: where the image tokens are still being rewritten, stages sit close together.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def adjacent_layer_change(model, embeds: Tensor, batch) -> Tensor:
    """[L] mean (1 − cosine) of the visual hidden states between the input and output of each layer."""
    hidden = model.hidden_states(embeds, batch)
    idx = batch.visual_start[:, None] + torch.arange(batch.n_visual)[None]
    visual = [h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1])).float() for h in hidden]
    # hidden_states[-1] has the final norm applied; the pre-norm output of the last layer is not exposed,
    # so the last layer's change is measured against the normed state (its scale is irrelevant to a cosine).
    return torch.stack([1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
                        for a, b in zip(visual[:-1], visual[1:])])


def choose_stage_layers(change: Tensor, n_stages: int, first: int = 1) -> tuple[int, ...]:
    """Stage layers at equal quantiles of the cumulative change over layers first..L−1 (strictly increasing)."""
    n_layers = change.shape[0]
    if not 1 <= n_stages <= n_layers - first:
        raise ValueError(f"n_stages must be in 1..{n_layers - first} for a {n_layers}-layer model, got {n_stages}")
    cumulative = torch.cumsum(change[first:].clamp(min=0).double(), dim=0)
    total = float(cumulative[-1]) or 1.0
    layers: list[int] = []
    for s in range(n_stages):
        target = total * (s + 1) / (n_stages + 1)
        layer = first + int(torch.searchsorted(cumulative, torch.tensor(target, dtype=torch.float64)))
        layer = max(layer, layers[-1] + 1 if layers else first)
        layers.append(min(layer, n_layers - n_stages + s))
    return tuple(layers)
