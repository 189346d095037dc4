"""Fidelity of each method against the unpruned model: IWP's own objective plus the output it protects.

For each method, on the same batch:
- recon: relative error ‖O_kept − O_all‖/‖O_all‖ of layer L's attention output (after o_proj) for the
  instruction queries, where O_kept attends to every text token and only the visual tokens the method keeps
  to the end of the stack, and O_all to every token. Layer L's activations are the unpruned model's, so
  every method is scored on the same linear map W, which is what IWP approximates.
- kl: KL(p_unpruned ‖ p_pruned) of the next-token distribution after the prompt.
- the visual tokens per layer and the prefill FLOPs (iwp/flops.py) against unpruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from iwp.flops import describe_counts, model_dims, prefill_flops
from iwp.inputs import Batch
from iwp.model import PrunedLlavaOnevision
from iwp.plugins.visual_token_select import make_method


@dataclass
class Row:
    method: str
    recon: float
    kl: float
    tokens_per_layer: tuple[int, ...]
    flops: float
    flops_ratio: float
    note: str = ""           # why a method could not run at this budget


@torch.no_grad()
def layer_attention_error(model: PrunedLlavaOnevision, hidden, batch: Batch, layer: int, kept) -> float:
    """Relative error of layer `layer`'s attention output for the instruction queries, kept set vs all tokens.
    `hidden` is model.hidden_states(...) of the unpruned run, computed once per batch by the caller."""
    block = model.layers[layer]
    _, _, v, q_rot, k_rot = model.qkv(block, hidden[layer], batch.positions)
    b, t = batch.input_ids.shape
    rows = batch.query_idx                                                     # [B, Q]
    q = q_rot.gather(2, rows[:, None, :, None].expand(-1, q_rot.shape[1], -1, q_rot.shape[-1]))
    visible = (torch.arange(t, device=rows.device)[None, None, :] <= rows[:, :, None]) & batch.attention_mask.bool()[:, None, :]
    keep_key = torch.ones(b, t, dtype=torch.bool, device=rows.device)
    visual = batch.visual_start[:, None] + torch.arange(batch.n_visual, device=rows.device)[None]
    keep_key.scatter_(1, visual, False)
    keep_key.scatter_(1, batch.visual_start[:, None] + kept, True)

    def attend(mask):
        out = F.scaled_dot_product_attention(q, k_rot, v, attn_mask=mask[:, None], enable_gqa=True)
        return block.self_attn.o_proj(out.transpose(1, 2).reshape(b, rows.shape[1], -1))
    full, pruned = attend(visible), attend(visible & keep_key[:, None, :])
    err = (pruned - full).norm(dim=-1) / full.norm(dim=-1).clamp(min=1e-12)    # [B, Q]
    return float(err[batch.query_mask].mean())


@torch.no_grad()
def compare_methods(model: PrunedLlavaOnevision, batch: Batch, budget: int, methods: list[str], layer: int,
            method_options: dict | None = None) -> list[Row]:
    method_options = method_options or {}
    embeds = model.embed(batch)
    d, m = model_dims(model.hf)
    n = batch.n_visual
    full_flops = prefill_flops((n,) * model.n_layers, d, m)
    base = model.prefill(embeds, batch)
    hidden = model.hidden_states(embeds, batch)
    log_p_full = torch.log_softmax(base.logits[:, -1].float(), dim=-1)
    rows = []
    for name in methods:
        if name == "none":
            rows.append(Row("none", 0.0, 0.0, base.tokens_per_layer, full_flops, 1.0))
            continue
        method = make_method(name, **method_options.get(name, {}))
        try:
            plan = method.plan(model.n_layers, n, budget)
        except ValueError as err:  # e.g. a multi-stage budget below what its unpruned layers cost
            rows.append(Row(name, float("nan"), float("nan"), (), float("nan"), float("nan"), str(err)))
            continue
        pre = model.prefill(embeds, batch, method, plan)
        log_p = torch.log_softmax(pre.logits[:, -1].float(), dim=-1)
        kl = float(F.kl_div(log_p, log_p_full, log_target=True, reduction="batchmean"))
        recon = layer_attention_error(model, hidden, batch, layer, pre.kept[-1])
        flops = prefill_flops(plan.tokens_per_layer, d, m)
        rows.append(Row(name, recon, kl, plan.tokens_per_layer, flops, flops / full_flops))
    return rows


def markdown(rows: list[Row], layer: int) -> str:
    lines = [f"| method | recon error @ layer {layer} | KL next-token | visual tokens per layer | "
             f"prefill GFLOPs (visual) | vs unpruned |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.note:
            lines.append(f"| {r.method} | — | — | not run: {r.note} | — | — |")
            continue
        lines.append(f"| {r.method} | {r.recon:.4f} | {r.kl:.3e} | {describe_counts(r.tokens_per_layer)} | "
                     f"{r.flops / 1e9:.3f} | {r.flops_ratio:.1%} |")
    return "\n".join(lines)


def command(args) -> None:
    """`iwp compare`: the table above for several methods on seeded demo scenes."""
    from iwp.plugins.visual_token_select import METHODS

    from .options import demo_batch, load_model, method_options

    loaded, model = load_model(args)
    budget = args.budget or loaded.spec.budget
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        if name != "none" and name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from: none, {', '.join(METHODS)}")
    batch = demo_batch(loaded, args)
    options = {name: method_options(loaded.spec, name, {}) for name in methods}
    layer = options.get("iwp", {}).get("layer", METHODS["iwp"].Config().layer)
    rows = compare_methods(model, batch, budget, methods, layer, options)
    print(f"{loaded.spec.name}, grid {loaded.spec.grid_name}, N={batch.n_visual}, budget {budget}, "
          f"{args.images} demo images")
    print(markdown(rows, layer))
