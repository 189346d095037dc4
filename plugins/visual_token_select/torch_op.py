"""`torch.ops.iwp.visual_token_select`: the op as one node for tracers, with the PyTorch reference as its
eager body and a fake that gives its static output shape [B, keep].

The method's options travel as one JSON string, so the op has one signature for every method; the ONNX
translation (onnx_op.py) expands it into typed node attributes (contract.node_attributes).
"""
from __future__ import annotations

import json

import torch
from torch import Tensor

from .contract import method_from_attributes, method_options
from .view import LayerView


@torch.library.custom_op("iwp::visual_token_select", mutates_args=())
def visual_token_select(hidden: Tensor, q: Tensor, k: Tensor, q_rot: Tensor, k_rot: Tensor, v: Tensor,
                        key_mask: Tensor, visual_start: Tensor, query_idx: Tensor, query_mask: Tensor,
                        last_idx: Tensor, visual_xy: Tensor, ttv: Tensor, method: str, keep: int,
                        layer_index: int, stage: int, n_stages: int, options: str) -> Tensor:
    selector = method_from_attributes({"method": method, **json.loads(options)})
    view = LayerView(hidden, q, k, q_rot, k_rot, v, key_mask, visual_start, visual_xy.shape[1], query_idx,
                     query_mask, last_idx, visual_xy, ttv, layer_index, stage, n_stages)
    return selector.select(view, keep).contiguous()


@visual_token_select.register_fake
def _(hidden, q, k, q_rot, k_rot, v, key_mask, visual_start, query_idx, query_mask, last_idx, visual_xy, ttv,
      method, keep, layer_index, stage, n_stages, options):
    return hidden.new_empty((hidden.shape[0], keep), dtype=torch.int64)


def select(method, view: LayerView, keep: int) -> Tensor:
    """Run `method` on `view` through the op: [B, keep] sorted indices into the visual tokens."""
    ttv = view.ttv if view.ttv is not None else view.hidden.new_zeros(view.hidden.shape[0], view.n_visual)
    return torch.ops.iwp.visual_token_select(
        view.hidden, view.q, view.k, view.q_rot, view.k_rot, view.v, view.key_mask, view.visual_start,
        view.query_idx, view.query_mask, view.last_idx, view.visual_xy, ttv.float(), method.name, keep,
        view.layer, view.stage, view.n_stages, json.dumps(method_options(method.config), sort_keys=True))
