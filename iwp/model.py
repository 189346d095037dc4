"""A pruned prefill and decode for HF LLaVA-OneVision, our own compact Qwen2 loop over HF's modules and weights.

Prefill runs the decoder layers in order. At a stage layer L the method reads that layer's q, k, v for every
alive token and picks K visual tokens; from L's attention on, the layer stack sees only the kept visual
tokens plus every text token. Kept tokens keep their original RoPE positions, and decoding continues from
the full length. Each layer's KV cache is as long as that layer's sequence, plus room for new tokens.

With no method (or K = N) this is HF's forward, and tests hold it to HF's logits. The pruned path has no
data-dependent Python control flow, so it traces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .inputs import Batch
from .kv_cache import KVCache, write_slot
from iwp.plugins.visual_token_select import LayerView, Plan
from iwp.plugins.visual_token_select.torch_op import select as through_op
from iwp.plugins.visual_token_select.transprune import transition_variation



def inline(method, view: LayerView, keep: int) -> Tensor:
    """The reference called directly, so a tracer records its own ops (the native twin) instead of the op."""
    return method.select(view, keep)


@dataclass
class Prefill:
    logits: Tensor                 # [B, T', V] for the alive tokens, T' = T - N + K_last
    cache: KVCache
    kept: list[Tensor]             # per stage, [B, K_s] indices into the original N visual tokens, sorted
    tokens_per_layer: tuple[int, ...]
    next_position: Tensor          # [B] RoPE position of the first generated token


def compact_index(visual_start: Tensor, n_visual: int, keep: Tensor, length: int) -> Tensor:
    """[B, T - N + K] source positions: the text before the image, the kept visual tokens, the text after."""
    k = keep.shape[1]
    c = torch.arange(length - n_visual + k, device=keep.device)[None]      # [1, T']
    rel = c - visual_start[:, None]
    inside = (rel >= 0) & (rel < k)
    kept = visual_start[:, None] + keep.gather(1, rel.clamp(0, k - 1))
    return torch.where(rel < 0, c, torch.where(inside, kept, c + n_visual - k))


def take(x: Tensor, src: Tensor) -> Tensor:
    """Gather the token axis (1 for [B, T, ...], 2 for [B, H, T, d]) at src [B, T']."""
    if x.dim() == 2:
        return x.gather(1, src)
    if x.dim() == 3:
        return x.gather(1, src[:, :, None].expand(-1, -1, x.shape[-1]))
    return x.gather(2, src[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


class PrunedLlavaOnevision(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        lm = hf.model.language_model
        self.embed_tokens, self.layers, self.norm, self.rotary = lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = hf.lm_head
        cfg = hf.config.text_config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def embed(self, batch: Batch) -> Tensor:
        """[B, T, D] token embeddings with the image features (anyres packed, newlines included) in place."""
        model, cfg = self.hf.model, self.hf.config
        embeds = self.embed_tokens(batch.input_ids)
        feats = model.get_image_features(
            batch.pixel_values, batch.image_sizes, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True).pooler_output
        feats = torch.cat(feats, dim=0).to(embeds.dtype)
        slots = (batch.input_ids == cfg.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(slots, feats)

    @torch.no_grad()
    def hidden_states(self, embeds: Tensor, batch: Batch) -> tuple[Tensor, ...]:
        """The unpruned LM's hidden states: the input of every decoder layer, then the final normed output
        (HF's own forward, for the fidelity and calibration tools)."""
        return self.hf.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                            position_ids=batch.positions, output_hidden_states=True).hidden_states

    def qkv(self, layer, h: Tensor, positions: Tensor):
        """(q, k, v, q_rot, k_rot) of `layer` on h [B, T, D]: [B, H, T, d] each, the last two with RoPE."""
        b, t, _ = h.shape
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(h, positions)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v, q_rot, k_rot

    def finish_layer(self, layer, h: Tensor, q_rot: Tensor, k: Tensor, v: Tensor, mask: Tensor):
        """Attention (with mask [B, 1, T, S]), residual, MLP, residual. Returns (h, attn_out, h_mid, mlp_out)."""
        b, t = q_rot.shape[0], q_rot.shape[2]
        out = F.scaled_dot_product_attention(q_rot, k, v, attn_mask=mask, enable_gqa=True)
        attn_out = layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h_mid = h + attn_out
        mlp_out = layer.mlp(layer.post_attention_layernorm(h_mid))
        return h_mid + mlp_out, attn_out, h_mid, mlp_out

    @torch.no_grad()
    def prefill(self, embeds: Tensor, batch: Batch, method=None, plan: Plan | None = None,
                max_new_tokens: int = 0, last_logits_only: bool = False, select=through_op) -> Prefill:
        """`select(method, view, keep)` picks each stage's tokens: `through_op` (default) traces to one
        iwp::VisualTokenSelect node, `inline` to the reference's own ops (the native twin), or any kernel."""
        b, t, _ = embeds.shape
        n = batch.n_visual
        stages = dict(plan.stages) if method is not None else {}
        stage_of = {layer: i for i, layer in enumerate(stages)}
        tokens_per_layer = plan.tokens_per_layer if method is not None else (n,) * self.n_layers
        ttv_start = getattr(method, "ttv_start", None)
        last_stage = max(stages) if stages else -1
        cache = KVCache.allocate([t - n + k for k in tokens_per_layer], max_new_tokens, b, self.n_kv,
                                 self.head_dim, embeds.dtype, embeds.device)

        h, positions, key_mask = embeds, batch.positions, batch.attention_mask.bool()
        visual_start, query_idx, last_idx = batch.visual_start, batch.query_idx, batch.last_idx
        xy = batch.visual_xy.to(embeds.device)[None].expand(b, -1, -1)
        original = torch.arange(n, device=embeds.device)[None].expand(b, -1)   # original index of alive visual
        ttv = torch.zeros(b, n, device=embeds.device) if ttv_start is not None else None
        kept: list[Tensor] = []
        for index, layer in enumerate(self.layers):
            q, k, v, q_rot, k_rot = self.qkv(layer, h, positions)
            if index in stages:
                n_alive = original.shape[1]
                view = LayerView(h, q, k, q_rot, k_rot, v, key_mask, visual_start, n_alive, query_idx,
                                 batch.query_mask, last_idx, xy, ttv, index, stage_of[index], len(stages))
                keep = select(method, view, stages[index])
                src = compact_index(visual_start, n_alive, keep, h.shape[1])
                h, q_rot, k_rot, v = take(h, src), take(q_rot, src), take(k_rot, src), take(v, src)
                positions, key_mask = take(positions, src), take(key_mask, src)
                shift = n_alive - keep.shape[1]
                query_idx, last_idx = query_idx - shift, last_idx - shift
                original, xy = original.gather(1, keep), take(xy, keep)
                ttv = ttv.gather(1, keep) if ttv is not None else None
                kept.append(original)
            length = h.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
            mask = (causal[None] & key_mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=h.device)
            h_in = h
            h, attn_out, h_mid, mlp_out = self.finish_layer(layer, h, q_rot, k_rot, v, mask[:, None])
            cache.fill(index, k_rot, v, key_mask)
            if ttv is not None and ttv_start <= index < last_stage:
                idx = visual_start[:, None] + torch.arange(original.shape[1], device=h.device)[None]
                ttv = ttv + transition_variation(take(h_in, idx), take(attn_out, idx))
                ttv = ttv + transition_variation(take(h_mid, idx), take(mlp_out, idx))
        # left padding puts every sample's last token at the end; an engine needs only its logits
        logits = self.lm_head(self.norm(h[:, -1:] if last_logits_only else h))
        next_position = batch.positions.gather(1, batch.last_idx[:, None]).squeeze(1) + 1
        return Prefill(logits, cache, kept, tuple(tokens_per_layer), next_position)

    def decode_step(self, embeds: Tensor, positions: Tensor, step: Tensor, prefill_len: list[int],
                    keys: list[Tensor], values: list[Tensor], valid: list[Tensor]):
        """Functional decode of one token: embeds [B, 1, D], positions [B], step 0-d int64 ->
        (logits [B, V], keys, values, valid) with slot prefill_len[l] + step of every layer written."""
        h = embeds
        keys, values, valid = list(keys), list(values), list(valid)
        for index, layer in enumerate(self.layers):
            _, _, v, q_rot, k_rot = self.qkv(layer, h, positions[:, None])
            keys[index], values[index], valid[index] = write_slot(
                keys[index], values[index], valid[index], step + prefill_len[index], k_rot, v)
            h, *_ = self.finish_layer(layer, h, q_rot, keys[index], values[index], valid[index][:, None, None, :])
        return self.lm_head(self.norm(h))[:, 0], keys, values, valid

    @torch.no_grad()
    def decode(self, tokens: Tensor, positions: Tensor, cache: KVCache, step: int) -> Tensor:
        """One token per sample: tokens [B], positions [B] -> logits [B, V]. Writes slot `step` of every layer."""
        cache.check_step(step)
        logits, cache.keys, cache.values, cache.valid = self.decode_step(
            self.embed_tokens(tokens)[:, None], positions, torch.tensor(step), cache.prefill_len,
            cache.keys, cache.values, cache.valid)
        return logits

    @torch.no_grad()
    def generate(self, batch: Batch, method=None, plan: Plan | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | None = None, embeds: Tensor | None = None) -> tuple[Tensor, Prefill]:
        """Greedy decoding. Returns (tokens [B, <= max_new_tokens], the prefill). `embeds` (from `embed`)
        lets several methods share one vision pass."""
        embeds = self.embed(batch) if embeds is None else embeds
        pre = self.prefill(embeds, batch, method, plan, max_new_tokens)
        token = pre.logits[:, -1].argmax(dim=-1)
        out, done, position = [token], token == eos_token_id, pre.next_position
        for step in range(max_new_tokens - 1):
            if eos_token_id is not None and bool(done.all()):
                break
            token = self.decode(token, position, pre.cache, step).argmax(dim=-1)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done = done | (token == eos_token_id)
            out.append(token)
            position = position + 1
        return torch.stack(out, dim=1), pre
