"""`iwp train` (`make train`): train ovqa-small, a small LLaVA-OneVision of the real HF classes (SigLIP tower,
projector, Qwen2 LM), on the OVQA train split, from a seed, on the CPU.

The recipe, and why:
- A byte-level BPE tokenizer with merges learned on OVQA's train-split text (sign strings left out, so a
  glyph stays one token): question words and answers become single tokens, the text part of a sequence
  shrinks about 4x, and the model matches "triangle" to the image instead of first spelling it.
- Several questions per image, as one multi-turn ChatML conversation with the image in the first turn. The
  visual tokens are most of the sequence, so each forward pass buys `questions` answers for one image's cost.
  The first question is the split's own (types cycle, answers balanced), the second asks for a description
  of the whole scene (every shape, left to right, and the sign), the rest are drawn about the scene.
- The loss is on the answer tokens and their <|im_end|> only, plus a dense auxiliary loss: a linear head on
  the vision tower's output classifies every patch of every crop (background, which coloured shape, the
  sign, which glyph) from the scene's label map. A from-scratch VLM otherwise spends most of a short budget
  learning to look at the image at all; the head is dropped when the model is saved.
- A curriculum on the haystack. A model trained from scratch learns to look at a shape only when the shape
  is a large share of what it attends over: the same model learns "what colour is the shape?" in 25 steps
  when the shape fills the image and not in 300 when it covers 3% of it. So early steps draw the scenes
  larger (`zoom_start`) and hide most *background* visual tokens from attention (the attention mask;
  positions are unchanged, as in the pruned forward); both ease linearly to the benchmark's scenes and whole
  images at `curriculum_until` of the run, and the rest of training sees exactly what inference sees.
- A guided head (AttentionGuide): one head of LM layer 2 is told where the question's objects are.
- RoPE base 1e6, as Qwen2's checkpoints use: with 32-dim heads more rotary pairs turn slowly enough for an
  answer to find an image token by content a thousand positions back.
- Both grids: most steps use 1x1 (528 visual tokens, cheap); every `anyres_every`-th step uses 2x2 (1312
  tokens, the high-res crops), so the model works at both and the glyphs have detail to be read from.
- AdamW with linear warm-up and cosine decay; bf16 autocast on the CPU (AVX-512 BF16 makes matmuls ~4x
  faster than fp32); the weights stay fp32 and are saved in fp32.
- Deterministic: the data are a function of (step, index), the weights of the seed, and the thread count is
  fixed, so a rerun on the same machine reproduces the weights.

Progress is checked on held-out train-split scenes (indices past any the run reads), never on the
calibration or test split. The output directory is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iwp.calibration import ovqa

IMAGE_SIZE, PATCH = 192, 12          # 16x16 = 256 patches per crop
DEV_OFFSET = 10_000_000              # train-split indices from here on are never trained on
TEXT_OFFSET = 5_000_000              # the language phase's scenes (text only) start here


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
    batch: int = 8                   # images per step
    questions: int = 8               # turns per image: the split's question, the description, then others
    describe: bool = True            # the second turn describes the whole scene
    aux_weight: float = 1.0          # the per-patch auxiliary losses: classes, and words
    align_weight: float = 1.0
    guide_weight: float = 1.0        # the guided head: see AttentionGuide
    guide_layer: int = 2             # looks from the question's end and answer to the image
    words_layer: int = 1             # looks from there to the question's naming words (0 < words_layer < guide_layer)
    background_start: float = 0.05   # share of background visual tokens visible at step 0 ...
    zoom_start: float = 2.0          # ... and how much larger shapes and sign are drawn at step 0 ...
    curriculum_until: float = 0.5    # ... both easing linearly to the benchmark's scenes at this fraction of the run
    qk_init_std: float = 0.08        # the LM's query/key projections start this large (HF's default is 0.02)
    lm_layers: int = 6
    zero_residual: bool = True       # attention and MLP outputs start at zero: each layer starts as identity
    text_steps: int = 0              # language pretraining: the LM alone, on scenes written as text
    text_batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    anyres_every: int = 4            # every n-th step runs at the 2x2 grid
    seed: int = 0
    threads: int = 2
    dev_examples: int = 100
    eval_every: int = 300
    bf16: bool = True

    def __post_init__(self):
        for name in ("steps", "batch", "questions", "anyres_every", "threads", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train {name} must be >= 1, got {getattr(self, name)}")


def ovqa_small_config(tokenizer, lm_layers: int = 6):
    """The architecture: SigLIP 2 x 128 over 12-px patches of 192-px crops, Qwen2 6 x 128 with GQA 4/2."""
    from transformers import LlavaOnevisionConfig

    from iwp.zoo import all_pinpoints
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                         num_hidden_layers=lm_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=all_pinpoints(IMAGE_SIZE), vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True)


TOKENIZER_VOCAB = 420


def tokenizer_corpus(count: int = 1500) -> list[str]:
    """OVQA train-split text for the tokenizer's merges: questions, answers, descriptions, the chat roles."""
    rng, texts = random.Random("tokenizer"), ["Describe the scene.", "user\n", "assistant\n", "system\n", "sign"]
    for e in ovqa.examples("train", count):
        question, answer, qtype = ovqa.ask(e.scene, rng)
        texts += [e.question, question, ovqa.describe(e.scene).split("; ", 1)[1]]
        texts += [a for a, t in ((e.answer, e.qtype), (answer, qtype)) if t != "reading"]
    return texts


def conversation(example: ovqa.Example, questions: int, rng: random.Random,
                 describe: bool = True) -> tuple[list[dict], list[str]]:
    """The chat messages of one image's turns, and each turn's question: the split's question, then (with
    `describe`) a description of the scene, then questions drawn about the scene."""
    turns = [(example.question, example.answer)]
    if describe:
        turns.append(("Describe the scene.", ovqa.describe(example.scene)))
    turns += [ovqa.ask(example.scene, rng)[:2] for _ in range(questions - len(turns))]
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"}, {"type": "text", "text": question}] if i == 0 else question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages, [question for question, _ in turns]


def _per_patch(canvas: np.ndarray, grid: int, assign, side: int = IMAGE_SIZE // PATCH) -> np.ndarray:
    """[1 + grid², side²]: `assign(counts, area)` over each patch's pixel values, for the base crop and then
    the tiles row by row, as the processor orders its crops."""
    def crop(region: np.ndarray) -> np.ndarray:
        q = region.shape[0] // side
        cells = region.reshape(side, q, side, q).transpose(0, 2, 1, 3).reshape(side * side, q * q).astype(np.int64)
        counts = np.bincount((np.arange(side * side)[:, None] * 256 + cells).ravel(),
                             minlength=side * side * 256).reshape(side * side, 256)
        return assign(counts, q * q)
    tile = ovqa.CANVAS // grid
    return np.stack([crop(canvas)] + [crop(canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
                                      for r in range(grid) for c in range(grid)])


def patch_labels(scene: ovqa.Scene, grid: int) -> np.ndarray:
    """[1 + grid², 256] class of each patch of each crop: a glyph where glyph strokes cover >= 5% of the
    patch, else the shape or sign covering the most of it if >= 15%, else background."""
    def assign(counts, area):
        things, glyphs = counts[:, 1:ovqa.SIGN_LABEL + 1], counts[:, ovqa.SIGN_LABEL + 1:ovqa.N_LABELS]
        label = np.where(things.max(1) >= 0.15 * area, 1 + things.argmax(1), 0)
        return np.where(glyphs.max(1) >= 0.05 * area, ovqa.SIGN_LABEL + 1 + glyphs.argmax(1), label)
    return _per_patch(ovqa.render_labels(scene), grid, assign)


def patch_instances(scene: ovqa.Scene, grid: int) -> np.ndarray:
    """[1 + grid², 256]: which shape (1 + its index) or the sign (255) covers >= 15% of each patch, else 0."""
    def assign(counts, area):
        covered = counts[:, 1:]
        return np.where(covered.max(1) >= 0.15 * area, 1 + covered.argmax(1), 0)
    return _per_patch(ovqa.render_instances(scene), grid, assign)


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels that keep only each assistant turn's answer and its <|im_end|> (-100 elsewhere)."""
    header = tokenizer.convert_tokens_to_ids(["<|im_start|>"]) + tokenizer.encode("assistant\n")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids, -100)
    for b, row in enumerate(input_ids.tolist()):
        i = 0
        while i < len(row):
            if row[i:i + len(header)] == header:
                j = i + len(header)
                while j < len(row) and row[j] != end:
                    j += 1
                labels[b, i + len(header):j + 1] = input_ids[b, i + len(header):j + 1]
                i = j
            i += 1
    return labels


def token_labels(crops: np.ndarray, grid: int, side: int = IMAGE_SIZE // PATCH) -> np.ndarray:
    """Patch labels in the order the LM sees the visual tokens: the base crop row by row, then the high-res
    tiles stitched into one grid, row by row, each row ending in a newline token (label -1)."""
    tiles = crops[1:].reshape(grid, grid, side, side).transpose(0, 2, 1, 3).reshape(grid * side, grid * side)
    rows = np.concatenate([tiles, np.full((grid * side, 1), -1)], axis=1)
    return np.concatenate([crops[0], rows.reshape(-1)])


def curriculum(step: int, config: TrainConfig) -> tuple[float, float]:
    """(share of background tokens visible, zoom) at a step: easing linearly to (1, 1)."""
    ramp = config.curriculum_until * config.steps
    done = 1.0 if ramp <= 0 else min(1.0, step / ramp)
    return (config.background_start + (1.0 - config.background_start) * done,
            round(config.zoom_start + (1.0 - config.zoom_start) * done, 2))


def hide_background(batch: dict, labels: list[np.ndarray], image_token: int, share: float,
                    rng: np.random.Generator) -> None:
    """Mask out (from every query's view) all but `share` of each image's background visual tokens; the
    shapes, the sign and the newline tokens stay visible, and every token keeps its position."""
    if share >= 1.0:
        return
    mask = batch["attention_mask"]
    for b, token_label in enumerate(labels):
        slots = (batch["input_ids"][b] == image_token).nonzero().squeeze(1)
        hidden = (token_label == 0) & (rng.random(len(token_label)) >= share)
        mask[b, slots[torch.from_numpy(hidden)]] = 0


def naming_ids(tokenizer) -> set[int]:
    """Token ids of the words that name what a question is about: colours, kinds (and plurals), "sign"."""
    words = [*ovqa.COLOURS, *ovqa.SHAPES, *(ovqa.plural(k) for k in ovqa.SHAPES), "sign"]
    return {i for w in words for i in tokenizer.encode(f" {w}")}


def attention_targets(input_ids: torch.Tensor, labels: torch.Tensor, tokenizer, image_token: int,
                      instances: np.ndarray, scene: ovqa.Scene, questions: list[str]) -> dict[str, list]:
    """The guided heads' targets in one sequence, as (query positions, key positions) per turn. The queries
    are the question's last token and the positions that predict its answer's tokens (they have read the
    whole question). "words": the question's words that name shapes, colours or the sign; "image": the
    visual tokens of the shapes (and sign) the question is about, where there are any."""
    ids = input_ids.tolist()
    slots = (input_ids == image_token).nonzero().squeeze(1)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.convert_tokens_to_ids(["<|im_start|>"]) + tokenizer.encode("user\n")
    starts = [i + len(header) for i in range(len(ids)) if ids[i:i + len(header)] == header]
    answered = ((labels != -100) & (input_ids != end)).nonzero().squeeze(1)
    naming = torch.tensor(sorted(naming_ids(tokenizer)))
    out = {"words": [], "image": []}
    for turn, (start, question) in enumerate(zip(starts, questions)):
        start = max(start, int(slots[-1]) + 2) if start <= int(slots[-1]) else start   # turn 0: after "<image>\n"
        stop = ids.index(end, start)
        following = starts[turn + 1] if turn + 1 < len(starts) else len(ids)
        queries = torch.cat([torch.tensor([stop - 1]), answered[(answered > stop) & (answered < following)] - 1])
        words = torch.arange(start, stop)[torch.isin(input_ids[start:stop], naming)]
        if len(words):
            out["words"].append((queries, words))
        wanted = [255 if i == ovqa.SIGN else 1 + i for i in ovqa.referents(scene, question)]
        keys = slots[torch.from_numpy(np.isin(instances, wanted))]
        if len(keys):   # nothing to look at (a count of zero, an absent shape): no target
            out["image"].append((queries, keys))
    return out


def training_batch(processor, step: int, config: TrainConfig) -> dict:
    grid = 2 if step % config.anyres_every == config.anyres_every - 1 else 1
    side = grid * IMAGE_SIZE
    rng = random.Random(f"train:{config.seed}:{step}")
    share, zoom = curriculum(step, config)
    examples = ovqa.examples("train", config.batch, start=step * config.batch, zoom=zoom)
    chats = [conversation(e, config.questions, rng, config.describe) for e in examples]
    texts = [processor.apply_chat_template(messages) for messages, _ in chats]
    images = [e.image().resize((side, side), Image.Resampling.BICUBIC) for e in examples]
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="right")
    enc["labels"] = answer_labels(enc["input_ids"], processor.tokenizer)
    batch = dict(enc)
    crops = [patch_labels(e.scene, grid) for e in examples]
    hide_background(batch, [token_labels(c, grid) for c in crops], processor.image_token_id, share,
                    np.random.default_rng([config.seed, step]))
    batch["patch_labels"] = torch.from_numpy(np.stack(crops)).long()
    batch["attention_targets"] = [
        attention_targets(batch["input_ids"][b], batch["labels"][b], processor.tokenizer, processor.image_token_id,
                          token_labels(patch_instances(e.scene, grid), grid), e.scene, questions)
        for b, (e, (_, questions)) in enumerate(zip(examples, chats))]
    return batch


def text_batch(processor, step: int, config: TrainConfig) -> dict:
    """Language pretraining: each scene written out as text before the questions, no image. The LM learns
    the chat format, the question words and to find the object a question names in its context, so the
    multimodal phase only has to make the image tokens readable, as LLaVA starts from a pretrained LLM.
    Spatial questions are left out: the text gives no coordinates."""
    rng = random.Random(f"text:{config.seed}:{step}")
    texts = []
    for e in ovqa.examples("train", config.text_batch, start=TEXT_OFFSET + step * config.text_batch):
        turns = [(e.question, e.answer)] if e.qtype != "spatial" else []
        while len(turns) < config.questions:
            question, answer, qtype = ovqa.ask(e.scene, rng)
            if qtype != "spatial":
                turns.append((question, answer))
        messages = []
        for i, (question, answer) in enumerate(turns):
            content = f"Scene: {ovqa.describe(e.scene)}.\n{question}" if i == 0 else question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        texts.append(processor.apply_chat_template(messages))
    tokenizer = processor.tokenizer
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": answer_labels(enc["input_ids"], tokenizer)}


class DenseLosses:
    """The two per-patch auxiliary losses, read off the forward pass through hooks (nothing is added to the
    model that is saved):
    - classes: a linear head on the vision tower's last layer (what the projector reads) names each patch's
      class, so the tower learns to see shapes, colours and glyphs early;
    - words: the projector's output for a patch of a red circle is pulled (cosine) towards the mean of the
      LM's own embeddings of "red" and "circle", with and without the leading space (a glyph towards its
      letter, the sign towards " sign").
      Image tokens then look like the words that name them in questions and in answers: with tied
      embeddings, an answer is a copy of what the guided head reads. Background patches get no target."""

    def __init__(self, model, tokenizer):
        self.embeddings = model.get_input_embeddings()
        self.head = torch.nn.Linear(model.config.vision_config.hidden_size, ovqa.N_LABELS)
        # both spellings: " green" as questions write it, "green" as answers do (BPE gives them separate
        # tokens), so the lookup matches the question's word and the answer reads straight off the image
        words = {cls: [f" {colour}", colour, f" {kind}", kind] for (colour, kind), cls in ovqa.SHAPE_LABELS.items()}
        words[ovqa.SIGN_LABEL] = [" sign"]
        words.update({cls: [char] for char, cls in ovqa.GLYPH_LABELS.items()})
        self.word_ids = {cls: [i for w in ws for i in tokenizer.encode(w)] for cls, ws in words.items()}
        self.captured = {}
        self.hooks = [
            model.model.vision_tower.encoder.layers[-1].register_forward_hook(
                lambda module, args, out: self.captured.update(vision=out[0] if isinstance(out, tuple) else out)),
            model.model.multi_modal_projector.register_forward_hook(
                lambda module, args, out: self.captured.update(projected=out))]

    def __call__(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.flatten()                                                   # [B * crops * patches]
        classes = torch.nn.functional.cross_entropy(self.head(self.captured["vision"]).flatten(0, 1).float(), labels)
        table = self.embeddings.weight.detach().float()
        targets = torch.zeros(ovqa.N_LABELS, table.shape[1])
        for cls, ids in self.word_ids.items():
            targets[cls] = table[ids].mean(0)
        projected = self.captured["projected"].flatten(0, 1).float()
        named = labels > 0
        cosine = torch.nn.functional.cosine_similarity(projected[named], targets[labels[named]], dim=-1)
        return classes, (1 - cosine).mean() if bool(named.any()) else projected.sum() * 0.0

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class AttentionGuide:
    """Supervision for one head (head 0 of LM layer `layer`): from each query position, put the attention
    on the target keys (the loss is -log of the attention mass on them, however it is spread among them).

    Two guided heads make the lookup a question needs: at layer `words_layer` the question's end and its
    answer positions look at the question's naming words ("triangle"), so at layer `guide_layer` they carry
    what to look for, and look at the visual tokens of those objects. Without them a 6-layer LM from scratch
    stays at the answer prior for the steps a 30-minute CPU budget allows, on scenes written as text as on
    images. The image lookup sits at the layer the pruning methods act from (FastV's K=2), so pruning
    removes what the lookup would read. Every other head in every layer learns its attention freely."""

    def __init__(self, model, layer: int):
        attention = model.model.language_model.layers[layer].self_attn
        self.q_proj, self.k_proj, self.head_dim = attention.q_proj, attention.k_proj, attention.head_dim
        self.captured = {}
        self.hook = attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self.captured.update(hidden=kwargs["hidden_states"], rope=kwargs["position_embeddings"])

    def __call__(self, targets: list[list[tuple[torch.Tensor, torch.Tensor]]], attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2.modeling_qwen2 import rotate_half
        hidden, (cos, sin) = self.captured["hidden"], self.captured["rope"]
        d, losses = self.head_dim, []
        for b, turns in enumerate(targets):
            if not turns:
                continue
            queries = torch.cat([q for q, _ in turns])
            row_cos, row_sin = (cos[b], sin[b]) if cos.shape[0] > 1 else (cos[0], sin[0])  # [T, d]
            q = self.q_proj(hidden[b, queries])[:, :d].float()              # head 0 reads KV head 0 (GQA)
            k = self.k_proj(hidden[b])[:, :d].float()
            q = q * row_cos[queries].float() + rotate_half(q) * row_sin[queries].float()
            k = k * row_cos.float() + rotate_half(k) * row_sin.float()
            logits = q @ k.T / math.sqrt(d)                                 # [queries, T]
            visible = (torch.arange(k.shape[0])[None] <= queries[:, None]) & attention_mask[b].bool()[None]
            log_p = torch.log_softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            row = 0
            for positions, keys in turns:
                keys = keys[visible[row, keys]]    # a referent's patch the curriculum hides is no target
                if len(keys):
                    # the attention mass on the referents, however it is spread among them: 0 when all of it is
                    losses.append(-torch.logsumexp(log_p[row:row + len(positions)][:, keys], dim=-1).mean())
                row += len(positions)
        return torch.stack(losses).mean() if losses else hidden.sum() * 0.0

    def remove(self) -> None:
        self.hook.remove()


def learning_rate(step: int, steps: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero over `steps` (each phase has its own schedule)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(out: Path, config: TrainConfig = TrainConfig(), progress=print) -> dict:
    from transformers import LlavaOnevisionForConditionalGeneration

    from iwp.calibration.evaluate import dev_accuracy, ovqa_items
    from iwp.processor import local_processor
    from iwp.zoo import Loaded, ModelSpec, all_pinpoints

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    from iwp.processor import byte_level_tokenizer
    tokenizer = byte_level_tokenizer(tokenizer_corpus(), TOKENIZER_VOCAB)
    processor = local_processor(IMAGE_SIZE, PATCH, all_pinpoints(IMAGE_SIZE), tokenizer)
    model_config = ovqa_small_config(processor.tokenizer, config.lm_layers)
    model_config.text_config._attn_implementation = "sdpa"
    model_config.vision_config._attn_implementation = "sdpa"
    model = LlavaOnevisionForConditionalGeneration(model_config)
    for layer in model.model.language_model.layers:   # attention that is not uniform at step 0 learns to look
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            torch.nn.init.normal_(projection.weight, std=config.qk_init_std)
        if config.zero_residual:
            torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
            torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    dev = ovqa_items("train", config.dev_examples, start=DEV_OFFSET)
    spec = ModelSpec("ovqa-small", None, grid=(1, 1), budget=64)
    dense = DenseLosses(model, processor.tokenizer)
    guides = {"words": AttentionGuide(model, config.words_layer), "image": AttentionGuide(model, config.guide_layer)}
    optimizer.add_param_group({"params": list(dense.head.parameters()), "weight_decay": 0.0})
    history, start, losses = [], time.perf_counter(), []
    model.train()
    for step in range(config.text_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.text_steps, config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(**text_batch(processor, step, config)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.text_steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            history.append({"phase": "text", "step": step + 1, "loss": recent, "seconds": time.perf_counter() - start})
            progress(f"text step {step + 1}/{config.text_steps}  loss {recent:.4f}  "
                     f"{(time.perf_counter() - start) / 60:.1f} min")
    losses = []
    for step in range(config.steps):
        model.train()
        batch = training_batch(processor, step, config)
        targets, attention = batch.pop("patch_labels"), batch.pop("attention_targets")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.steps, config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            lm_loss = model(**batch).loss
            patch_loss, align_loss = dense(targets)
            guide_loss = sum(guide([t[name] for t in attention], batch["attention_mask"])
                             for name, guide in guides.items()) / len(guides)
        loss = (lm_loss + config.aux_weight * patch_loss + config.align_weight * align_loss
                + config.guide_weight * guide_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((lm_loss.item(), patch_loss.item(), align_loss.item(), guide_loss.item()))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            model.eval()
            accuracy = dev_accuracy(Loaded(spec, model, processor, "training"), dev)
            elapsed = time.perf_counter() - start
            recent = losses[-50:]
            lm, patch, align, guided = (sum(x[i] for x in recent) / len(recent) for i in range(4))
            history.append({"phase": "image", "step": step + 1, "loss": lm, "patch_loss": patch, "align_loss": align,
                            "guide_loss": guided, "dev_accuracy": accuracy["all"], "dev_by_type": accuracy,
                            "seconds": elapsed})
            by_type = " ".join(f"{k[:4]} {v:.0%}" for k, v in accuracy.items() if k != "all")
            progress(f"step {step + 1}/{config.steps}  loss {lm:.4f}  patch {patch:.3f}  align {align:.3f}  "
                     f"guide {guided:.3f}  dev accuracy {accuracy['all']:.1%} ({by_type})  {elapsed / 60:.1f} min")
    dense.remove()
    for guide in guides.values():
        guide.remove()
    model.eval()
    summary = {"config": dataclasses.asdict(config), "history": history, "seconds": time.perf_counter() - start,
               "torch": torch.__version__}
    save_model(model, processor, summary, out)
    return summary


def save_model(model, processor, summary: dict, out: Path) -> None:
    """Weights (safetensors), config, processor files and training.json, all-or-nothing."""
    from iwp.atomic import staged_directory
    from iwp.processor import save_processor
    with staged_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        save_processor(processor, staging)
        (staging / "training.json").write_text(json.dumps(summary, indent=1))


def command(args) -> None:
    """`iwp train`: the recipe's defaults, with --steps/--batch/--seed overriding them when given."""
    from iwp.zoo import bundled_dir
    config = TrainConfig(**{k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("seed", args.seed))
                            if v is not None})
    out = Path(args.out) if args.out else bundled_dir("ovqa-small")
    summary = train(out, config, progress=lambda line: print(line, flush=True))
    print(f"trained   {out} in {summary['seconds'] / 60:.1f} min; dev accuracy "
          f"{summary['history'][-1]['dev_accuracy']:.1%}")
