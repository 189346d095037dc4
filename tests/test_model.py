"""The pruned forward against HF LLaVA-OneVision: parity when nothing is pruned, exactness when tokens are."""
import pytest
import torch

from iwp.demo import demo_image
from iwp.inputs import make_batch
from iwp.plugins.visual_token_select import METHODS, make_method


def hf_logits(loaded, batch):
    with torch.no_grad():
        return loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            pixel_values=batch.pixel_values, image_sizes=batch.image_sizes).logits


@pytest.mark.parametrize("system", [None, "You are a careful robot assistant. Answer in one word."])
def test_unpruned_matches_hf_logits(tiny, tiny_model, system):
    batch = make_batch(tiny, demo_image(1), "What colour is the circle?", system=system)
    pre = tiny_model.prefill(tiny_model.embed(batch), batch)
    assert pre.logits.shape == hf_logits(tiny, batch).shape
    torch.testing.assert_close(pre.logits, hf_logits(tiny, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["iwp", "fastv", "btp"])
def test_budget_equal_to_n_matches_hf(tiny, tiny_model, name):
    batch = make_batch(tiny, demo_image(2), "How many shapes?")
    method = make_method(name, **({"layers": (2,)} if name == "btp" else {}))
    plan = method.plan(tiny_model.n_layers, batch.n_visual, batch.n_visual)
    pre = tiny_model.prefill(tiny_model.embed(batch), batch, method, plan)
    assert torch.equal(pre.kept[0], torch.arange(batch.n_visual)[None])
    torch.testing.assert_close(pre.logits, hf_logits(tiny, batch), atol=1e-5, rtol=0)


def test_greedy_decode_matches_hf_generate(tiny, tiny_model):
    batch = make_batch(tiny, demo_image(3), "Describe the scene.")
    tokens, _ = tiny_model.generate(batch, max_new_tokens=10)
    with torch.no_grad():
        ref = tiny.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                                  max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert tokens.tolist() == ref[:, batch.input_ids.shape[1]:].tolist()


def test_pruning_at_layer_zero_equals_hf_on_the_kept_sequence(tiny, tiny_model):
    """Dropping tokens before layer 0 must equal HF run on the shortened sequence at the original positions."""
    batch = make_batch(tiny, demo_image(4), "Where is the square?")
    method = make_method("divprune")
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 40)
    embeds = tiny_model.embed(batch)
    pre = tiny_model.prefill(embeds, batch, method, plan)
    keep = pre.kept[0][0]
    start = int(batch.visual_start[0])
    t = batch.input_ids.shape[1]
    index = torch.cat([torch.arange(start), start + keep, torch.arange(start + batch.n_visual, t)])
    with torch.no_grad():
        out = tiny.model.model.language_model(inputs_embeds=embeds[:, index], position_ids=batch.positions[:, index])
        ref = tiny.model.lm_head(out.last_hidden_state)
    torch.testing.assert_close(pre.logits, ref, atol=1e-5, rtol=0)


def test_pruned_decode_continues_from_full_length(tiny, tiny_model):
    batch = make_batch(tiny, demo_image(5), "Is there a red shape?")
    method = make_method("iwp")
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 32)
    tokens, pre = tiny_model.generate(batch, method, plan, max_new_tokens=6)
    t, n = batch.input_ids.shape[1], batch.n_visual
    assert int(pre.next_position[0]) == t
    assert pre.cache.prefill_len == [t - n + k for k in plan.tokens_per_layer]
    assert pre.logits.shape[1] == t - n + 32
    assert tokens.shape == (1, 6)
    assert pre.kept[0].shape == (1, 32) and torch.equal(pre.kept[0], pre.kept[0].sort().values)


def test_batched_left_padding_matches_single(tiny, tiny_model):
    systems = [None, "You are a warehouse robot that answers tersely and precisely."]
    prompt = "Count the shapes."
    method = make_method("iwp")
    singles = [make_batch(tiny, demo_image(6), prompt, system=s) for s in systems]
    assert int(singles[0].visual_start[0]) != int(singles[1].visual_start[0])  # derived, not a fixed offset
    plan = method.plan(tiny_model.n_layers, singles[0].n_visual, 48)
    outs = [tiny_model.prefill(tiny_model.embed(b), b, method, plan) for b in singles]
    batch = make_batch(tiny, [demo_image(6)] * 2, [prompt] * 2, system=systems)
    assert not batch.attention_mask[0].all()  # the shorter prompt is left-padded
    pre = tiny_model.prefill(tiny_model.embed(batch), batch, method, plan)
    for i, single in enumerate(outs):
        assert torch.equal(pre.kept[0][i], single.kept[0][0])
        torch.testing.assert_close(pre.logits[i, -1], single.logits[0, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pruned_prefill_exports_with_static_shapes(tiny_1x1, name):
    """No data-dependent Python control flow: torch.export traces the pruned prefill and reproduces it."""
    from iwp.model import PrunedLlavaOnevision
    loaded = tiny_1x1
    model = PrunedLlavaOnevision(loaded.model)
    batch = make_batch(loaded, demo_image(0), "What colour?")
    method = make_method(name)
    plan = method.plan(model.n_layers, batch.n_visual, 32)

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, embeds, mask, positions, visual_start, query_idx, query_mask, last_idx):
            b = type(batch)(batch.input_ids, mask, positions, batch.pixel_values, batch.image_sizes, visual_start,
                            batch.n_visual, query_idx, query_mask, last_idx, batch.visual_xy)
            pre = self.model.prefill(embeds, b, method, plan)
            return pre.logits, pre.kept[-1]

    args = (model.embed(batch), batch.attention_mask, batch.positions, batch.visual_start, batch.query_idx,
            batch.query_mask, batch.last_idx)
    exported = torch.export.export(Prefill(), args, strict=False)
    logits, kept = exported.module()(*args)
    ref_logits, ref_kept = Prefill()(*args)
    assert torch.equal(kept, ref_kept)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)


def test_nan_activations_do_not_crash_generation(tiny, tiny_model):
    batch = make_batch(tiny, demo_image(7), "What is here?")
    embeds = tiny_model.embed(batch)
    embeds[0, int(batch.visual_start[0]) + 5] = float("nan")
    method = make_method("iwp")
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 16)
    pre = tiny_model.prefill(embeds, batch, method, plan)
    kept = pre.kept[0][0]
    assert kept.shape == (16,) and kept.unique().numel() == 16 and torch.equal(kept, kept.sort().values)


def test_pruned_decode_equals_prefill_of_extended_prompt(tiny, tiny_model):
    """Per-layer caches of different lengths: decode logits must equal a pruned prefill of prompt + tokens.
    The random method's choice does not depend on the queries, so both runs keep the same tokens."""
    batch = make_batch(tiny, demo_image(8), "Which shape is largest?")
    method = make_method("random", layer=3)
    plan = method.plan(tiny_model.n_layers, batch.n_visual, 24)
    tokens, pre = tiny_model.generate(batch, method, plan, max_new_tokens=4)
    position = pre.next_position
    step_logits = None
    cache_run = tiny_model.prefill(tiny_model.embed(batch), batch, method, plan, max_new_tokens=4)
    for step in range(3):
        step_logits = tiny_model.decode(tokens[:, step], position + step, cache_run.cache, step)
    extended = _extend(batch, tokens[:, :3])
    full = tiny_model.prefill(tiny_model.embed(extended), extended, method, plan)
    assert torch.equal(full.kept[0], pre.kept[0])
    torch.testing.assert_close(step_logits, full.logits[:, -1], atol=1e-5, rtol=0)


def _extend(batch, new_tokens):
    from dataclasses import replace
    b, extra = new_tokens.shape
    ones = torch.ones(b, extra, dtype=batch.attention_mask.dtype)
    positions = batch.positions[:, -1:] + torch.arange(1, extra + 1)[None]
    return replace(batch, input_ids=torch.cat([batch.input_ids, new_tokens], 1),
                   attention_mask=torch.cat([batch.attention_mask, ones], 1),
                   positions=torch.cat([batch.positions, positions], 1),
                   last_idx=batch.last_idx + extra)
