"""`iwp train --stage base|polish|lookup` (`make train` runs all three): train ovqa-small, a small LLaVA-OneVision
of the real HF classes (SigLIP tower, projector, Qwen2 LM), on the OVQA train split, from a seed, on the CPU.

The recipe, and why:
- A byte-level BPE tokenizer with merges learned on OVQA's train-split text (sign strings left out, so a
  glyph stays one token): question words and answers become single tokens.
- Phase 1, the eye: the vision tower and projector alone learn to describe every visual token, through
  linear heads on the projector's output (what the LM reads): the patch's class (background, which coloured
  shape, the sign, which glyph), the shape's size, whether the patch holds a shape's centre (one token per
  object and crop, so a count is a count of tokens), which of the sign's glyphs it shows, and where it is in
  its crop. No LM runs, so a step costs a tenth of a full one.
- Phase 2, the question: several questions per image as one multi-turn ChatML conversation with the image in
  the first turn (the visual tokens are most of the sequence, so one pass buys `questions` answers). The loss
  is on the answer tokens and their <|im_end|>, plus the phase-1 heads at `aux_weight`.
- A curriculum on the haystack that also saves compute: early steps drop most *background* visual tokens
  from the sequence (the kept ones keep their RoPE positions, as in the pruned forward). A from-scratch LM
  learns to find a shape by name when the shapes are a large share of what it attends over; the share of
  background kept eases linearly to all of it at `curriculum_until` of the run, and the rest of training sees
  exactly what inference sees.
- Guided heads (GuidedHeads): an in-context lookup ("find the triangle, read its colour") is what a small LM
  from scratch learns late and abruptly, so its two steps are supervised. At LM layer `words_layer` two
  heads look from each answer position to the question's naming words; at `image_layer` the same heads look
  at the visual tokens of the objects named (a spatial question's two shapes, one per head; a reading
  answer's k-th token at the sign's k-th glyph; a count at one centre token per object and a sink; "Is
  there...?" at the object or the sink). An early exit reads the answer off `image_layer`'s output through
  the LM head, so the heads' values learn to carry it. Every other head learns freely. The lookup sits at
  the layers the pruning methods act from, so pruning removes what it would read.
- Phase 3, the polish (a second run, `--stage polish`): the questions again on scenes phase 2 never read,
  every visual token, no per-token heads, a fresh optimizer and schedule at half the peak. The lookup is
  learned late (the base run's curve is still rising when its learning rate reaches zero), and two runs of
  about 70 minutes each fit a sitting where one of 140 would not. The polish starts from the base stage's
  saved model alone, so that directory is the checkpoint between the runs.
- Phase 4, the lookup's contents (a third run, `--stage lookup`, tools/train_lookup.py): the polish again on
  new scenes, with linear heads on the lookup layer's output that ask for a spatial question's two places and
  relation, and a count: the polished model's answer positions held no trace of the places or the relation.
- Both grids: most steps use 1x1 (528 visual tokens); every `anyres_every`-th step uses 2x2 (1312).
- AdamW with linear warm-up and cosine decay; bf16 autocast on the CPU; the weights stay and are saved fp32.
- Deterministic: the data are a function of (phase, step, index), the weights of the seed, and the thread
  count is fixed, so a rerun on the same machine reproduces the weights.

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
import torch.nn.functional as F
from PIL import Image

from iwp.calibration import ovqa

from .train_targets import (CENTRE, CLASS, IMAGE_SIZE, INSTANCE, ORDINAL, PATCH, SIZE, patch_targets,
                            question_objects, token_order, token_xy)

DEV_OFFSET = 10_000_000              # train-split indices from here on are never trained on
VISION_OFFSET = 5_000_000            # phase 1's scenes start here
TOKENIZER_VOCAB = 420
ORDINALS = ovqa.SIGN_LENGTH
BASE_DIR = Path("build/ovqa-small-base")   # the base stage's output: the polish stage's checkpoint
POLISH_DIR = Path("build/ovqa-small-polish")   # the polish stage's output: the lookup stage's checkpoint
STAGES = {"base": None, "polish": "base", "lookup": "polish"}   # each stage and the stage it starts from


@dataclass(frozen=True)
class TrainConfig:
    vision_steps: int = 1200         # phase 1: the tower and projector on the per-token heads alone
    steps: int = 3000                # phase 2: everything, on the questions
    batch: int = 8                   # images per step
    questions: int = 8               # turns per image: the split's question, the description, then others
    describe: bool = True            # the second turn describes the whole scene
    aux_weight: float = 0.5          # the per-token heads in phase 2
    background_start: float = 0.05   # share of background visual tokens kept in the sequence at step 0 ...
    curriculum_until: float = 0.5    # ... easing linearly to all of them at this fraction of phase 2
    lm_layers: int = 4
    vision_layers: int = 2
    glyph_weight: float = 5.0        # glyph classes' weight in the class loss: few tokens, fine detail
    guide_weight: float = 1.0        # the guided heads: see GuidedHeads
    exit_weight: float = 0.5         # the answer read off image_layer's output: see GuidedHeads.early_exit
    words_layer: int = 0             # head 0 looks from each answer to its question's naming words ...
    image_layer: int = 1             # ... and head 0 here from there to the visual tokens of the objects named
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    anyres_every: int = 4            # every n-th step runs at the 2x2 grid
    seed: int = 0
    threads: int = 2
    dev_examples: int = 100
    eval_every: int = 500
    polish_steps: int = 2500         # phase 3 (stage "polish"): the questions again, every token, ...
    polish_lr: float = 1e-3          # ... from phase 2's weights with a fresh schedule at this peak
    lookup_steps: int = 1800         # phase 4 (stage "lookup"): the polish with the lookup's heads, ...
    lookup_lr: float = 7e-4          # ... from phase 3's weights with a fresh schedule at this peak
    lookup_weight: float = 1.0       # the lookup's heads: see train_lookup.LookupHeads
    bf16: bool = True

    def __post_init__(self):
        for name in ("steps", "polish_steps", "lookup_steps", "batch", "questions", "anyres_every", "threads",
                     "eval_every", "lm_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"train {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.background_start <= 1:
            raise ValueError(f"train background_start must be in [0, 1], got {self.background_start}")


def ovqa_small_config(tokenizer, lm_layers: int = 4, vision_layers: int = 2):
    """The architecture: SigLIP vision_layers x 128 over 12-px patches of 192-px crops, Qwen2 lm_layers x 128,
    GQA 4/2."""
    from transformers import LlavaOnevisionConfig

    from iwp.zoo import all_pinpoints
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256,
                           num_hidden_layers=vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                           patch_size=PATCH),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                         num_hidden_layers=lm_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=all_pinpoints(IMAGE_SIZE), vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True)


def tokenizer_corpus(count: int = 1500) -> list[str]:
    """OVQA train-split text for the tokenizer's merges: questions, answers, descriptions, the chat roles."""
    rng, texts = random.Random("tokenizer"), ["Describe the scene.", "user\n", "assistant\n", "system\n", "sign"]
    for e in ovqa.examples("train", count):
        question, answer, qtype = ovqa.ask(e.scene, rng)
        texts += [e.question, question, ovqa.describe(e.scene).split("; ", 1)[1]]
        texts += [a for a, t in ((e.answer, e.qtype), (answer, qtype)) if t != "reading"]
    return texts


# --- the conversation ---------------------------------------------------------------------------------------

def conversation(example: ovqa.Example, questions: int, rng: random.Random,
                 describe: bool = True) -> list[tuple[str, str, str]]:
    """(question, answer, type) of one image's turns: the split's question, then (with `describe`) a
    description of the scene, then questions drawn about the scene."""
    turns = [(example.question, example.answer, example.qtype)]
    if describe:
        turns.append(("Describe the scene.", ovqa.describe(example.scene), "describe"))
    turns += [ovqa.ask(example.scene, rng) for _ in range(questions - len(turns))]
    return turns


def chat(turns: list[tuple[str, str, str]]) -> list[dict]:
    messages = []
    for i, (question, answer, _) in enumerate(turns):
        content = [{"type": "image"}, {"type": "text", "text": question}] if i == 0 else question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def answer_spans(input_ids: torch.Tensor, tokenizer) -> list[list[tuple[int, int]]]:
    """Per row, the [start, stop) token span of each assistant turn's answer and its <|im_end|>."""
    header = tokenizer.convert_tokens_to_ids(["<|im_start|>"]) + tokenizer.encode("assistant\n")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spans = []
    for row in input_ids.tolist():
        found, i = [], 0
        while i < len(row):
            if row[i:i + len(header)] == header:
                j = i + len(header)
                while j < len(row) and row[j] != end:
                    j += 1
                found.append((i + len(header), j + 1))
                i = j
            i += 1
        spans.append(found)
    return spans


def answer_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels that keep only each assistant turn's answer and its <|im_end|> (-100 elsewhere)."""
    labels = torch.full_like(input_ids, -100)
    for b, spans in enumerate(answer_spans(input_ids, tokenizer)):
        for start, stop in spans:
            labels[b, start:stop] = input_ids[b, start:stop]
    return labels


class TokenHeads(torch.nn.Module):
    """Linear heads on the projector's output (what the LM reads at each visual token): class, size, centre,
    glyph ordinal, and (x, y). Training only: they are not part of the saved model."""

    SIZES = (ovqa.N_LABELS, 2, 2, ORDINALS, 2)

    def __init__(self, hidden: int, glyph_weight: float = 1.0):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, sum(self.SIZES))
        self.class_weight = torch.ones(ovqa.N_LABELS)
        self.class_weight[ovqa.SIGN_LABEL + 1:] = glyph_weight

    def forward(self, features: list[torch.Tensor], targets: list[torch.Tensor], xy: list[torch.Tensor]) -> torch.Tensor:
        t = torch.cat(targets)                                                # [sum N, 5]: patch_targets' columns
        token = t[:, CLASS] >= 0                                              # newlines have no targets
        t, where = t[token], torch.cat(xy)[token]
        cls, size, centre, ordinal, position = self.linear(torch.cat(features)[token].float()).split(self.SIZES, -1)

        def optional(logits, target):   # size and ordinal apply to some tokens only
            return F.cross_entropy(logits, target, ignore_index=-100) if bool((target >= 0).any()) else logits.sum() * 0
        terms = {"class": F.cross_entropy(cls, t[:, CLASS], weight=self.class_weight),
                 "size": optional(size, t[:, SIZE]), "ordinal": optional(ordinal, t[:, ORDINAL]),
                 "centre": F.cross_entropy(centre, t[:, CENTRE], weight=torch.tensor([1.0, 10.0])),
                 "xy": 10 * F.mse_loss(torch.sigmoid(position), where)}
        glyphs = t[:, CLASS] > ovqa.SIGN_LABEL
        right = (cls[glyphs].argmax(-1) == t[glyphs, CLASS]).float().mean() if bool(glyphs.any()) else torch.tensor(0.0)
        self.last = {**{k: float(v.detach()) for k, v in terms.items()}, "glyph_accuracy": float(right)}  # progress
        return sum(terms.values())


# --- batches ------------------------------------------------------------------------------------------------

def grid_for(step: int, config: TrainConfig) -> int:
    return 2 if step % config.anyres_every == config.anyres_every - 1 else 1


def resized(examples: list[ovqa.Example], grid: int) -> list[Image.Image]:
    side = grid * IMAGE_SIZE
    return [e.image().resize((side, side), Image.Resampling.BICUBIC) for e in examples]


def image_batch(processor, examples: list[ovqa.Example], grid: int, pixels: dict | None = None) -> dict:
    """Pixels, image sizes and per-token targets (the LM's visual-token order) of a list of examples."""
    pixels = pixels or processor.image_processor(resized(examples, grid), return_tensors="pt")
    xy = torch.from_numpy(token_xy(grid))
    return {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"],
            "targets": [torch.from_numpy(token_order(patch_targets(e.scene, grid), grid)) for e in examples],
            "xy": [xy] * len(examples)}


def question_batch(processor, examples: list[ovqa.Example], grid: int, config: TrainConfig,
                   rng: random.Random) -> dict:
    """A phase-2 batch: the image batch plus each image's conversation, tokenized, with labels and turn types."""
    convs = [conversation(e, config.questions, rng, config.describe) for e in examples]
    texts = [processor.apply_chat_template(chat(turns)) for turns in convs]
    enc = processor(images=resized(examples, grid), text=texts, return_tensors="pt", padding=True,
                    padding_side="right")
    batch = image_batch(processor, examples, grid, enc)
    batch.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 labels=answer_labels(enc["input_ids"], processor.tokenizer),
                 types=[[t for _, _, t in turns] for turns in convs],
                 questions=[[q for q, _, _ in turns] for turns in convs])
    return batch


def keep_masks(targets: list[torch.Tensor], share: float, rng: np.random.Generator) -> list[torch.Tensor]:
    """Which visual tokens stay in the sequence: every shape, sign and newline token, and `share` of the
    background ones."""
    return [(t[:, CLASS] != 0) | torch.from_numpy(rng.random(len(t)) < share) for t in targets]


def image_features(model, batch: dict) -> list[torch.Tensor]:
    cfg = model.config
    return list(model.model.get_image_features(
        batch["pixel_values"], batch["image_sizes"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True).pooler_output)


def lm_inputs(model, batch: dict, features: list[torch.Tensor], keep: list[torch.Tensor] | None, kept: list):
    """(embeds, positions, attention mask, labels) of the batch's sequences with each image's features in
    place and only `keep` of its visual tokens (all with None); kept tokens keep their positions, and each
    row's kept positions are appended to `kept`."""
    image_token = model.config.image_token_id
    embeds = model.get_input_embeddings()(batch["input_ids"])
    rows = []
    for b, feats in enumerate(features):
        length = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b, :length]
        start = int((ids == image_token).nonzero()[0, 0])
        n = feats.shape[0]
        sequence = torch.cat([embeds[b, :start], feats.to(embeds.dtype), embeds[b, start + n:length]])
        visual = torch.arange(n) if keep is None else keep[b].nonzero()[:, 0]
        index = torch.cat([torch.arange(start), start + visual, torch.arange(start + n, length)])
        rows.append((sequence[index], index, batch["labels"][b, index]))
        kept.append(index)
    width = max(len(index) for _, index, _ in rows)
    d = embeds.shape[-1]
    out_embeds = embeds.new_zeros(len(rows), width, d)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (seq, index, lab) in enumerate(rows):
        out_embeds[b, :len(index)], positions[b, :len(index)], mask[b, :len(index)] = seq, index, 1
        labels[b, :len(index)] = lab
    return out_embeds, positions, mask, labels


def lm_logits(model, embeds, positions, mask) -> torch.Tensor:
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    return model.lm_head(hidden)


def naming_ids(tokenizer) -> set[int]:
    """Token ids of the words that name what a question is about: colours, kinds (and plurals), "sign"."""
    words = [*ovqa.COLOURS, *ovqa.SHAPES, *(ovqa.plural(k) for k in ovqa.SHAPES), "sign"]
    return {i for w in words for i in tokenizer.encode(f" {w}")}


GUIDED_HEADS = (0, 2)                # two heads on different KV heads: the question's first object, its second


def guide_targets(batch: dict, examples: list[ovqa.Example], tokenizer, image_token: int) -> list[list]:
    """Per row, the guided heads' targets as (layer kind, head, query positions, key positions) in the full
    sequence. The queries are the positions that predict an answer's tokens (they have read the whole
    question). "words": the question's naming words (colour, kind, "sign"), split in halves between the two
    heads for a spatial question; "image": the visual tokens of each looked-up object. A reading answer's
    k-th position looks at the sign's k-th glyph. Counting and existence may find nothing, so their head
    may also rest on the sequence's first token (a sink): a count looks at one token per object (its centre)
    and the sink, so the share left on the sink says how many; "Is there...?" looks at the object, or only
    at the sink when there is none."""
    naming = torch.tensor(sorted(naming_ids(tokenizer)))
    out = []
    for b, (spans, e) in enumerate(zip(answer_spans(batch["input_ids"], tokenizer), examples)):
        ids = batch["input_ids"][b]
        slots = (ids == image_token).nonzero()[:, 0]
        targets = batch["targets"][b]                                     # newline rows are -1 throughout
        ordinals, centre, sink = targets[:, ORDINAL], targets[:, CENTRE] == 1, torch.tensor([0])

        def tokens_of(wanted: list[int]) -> torch.Tensor:   # the visual tokens of these instances
            return torch.isin(targets[:, INSTANCE], torch.tensor(wanted, dtype=targets.dtype))
        rows, previous = [], int(slots[-1]) + 1
        for (start, stop), question in zip(spans, batch["questions"][b]):
            queries = torch.arange(start - 1, max(start, stop - 2))
            words = previous + (torch.isin(ids[previous:start], naming)).nonzero()[:, 0]
            lookups = question_objects(e.scene, question)
            if question == "What does the sign say?":
                rows += [("image", GUIDED_HEADS[0], queries[k:k + 1], slots[ordinals == k]) for k in range(len(queries))]
                rows.append(("words", GUIDED_HEADS[0], queries, words))
            elif len(lookups) == 2:
                half = len(words) // 2
                for head, named, wanted in zip(GUIDED_HEADS, (words[:half], words[half:]), lookups):
                    rows.append(("words", head, queries, named))
                    rows.append(("image", head, queries, slots[tokens_of(wanted)]))
            else:
                if len(words):
                    rows.append(("words", GUIDED_HEADS[0], queries, words))
                for wanted in lookups:
                    looked = tokens_of(wanted)
                    if question.startswith("How many"):
                        rows.append(("image", GUIDED_HEADS[0], queries, torch.cat([sink, slots[looked & centre]])))
                    elif question.startswith("Is there"):
                        rows.append(("image", GUIDED_HEADS[0], queries, torch.cat([sink, slots[looked]])))
                    else:
                        rows.append(("image", GUIDED_HEADS[0], queries, slots[looked]))
            previous = stop
        out.append([row for row in rows if len(row[3]) and len(row[2])])
    return out


class GuidedHeads:
    """Supervision for two heads of two LM layers, read through hooks (nothing is added to the saved model):
    at `words_layer` each answer position looks at its question's naming words ("triangle"), so at
    `image_layer` it carries what to look for and looks at the visual tokens of those objects. The loss is
    -log of the head's attention mass on the targets, however it is spread among them. Only the query rows
    are scored, so the model itself runs SDPA. The hooks also keep `image_layer`'s output for the early exit."""

    def __init__(self, model, config: TrainConfig):
        layers = model.model.language_model.layers
        self.layers = {"words": layers[config.words_layer].self_attn, "image": layers[config.image_layer].self_attn}
        self.captured: dict[str, dict] = {}
        self.hooks = [attention.register_forward_pre_hook(
            lambda module, args, kwargs, kind=kind: self.captured.__setitem__(
                kind, {"hidden": kwargs["hidden_states"], "rope": kwargs["position_embeddings"]}), with_kwargs=True)
            for kind, attention in self.layers.items()]
        self.hooks.append(layers[config.image_layer].register_forward_hook(
            lambda module, args, out: self.captured.__setitem__("exit", out[0] if isinstance(out, tuple) else out)))

    def __call__(self, targets: list[list], index: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2.modeling_qwen2 import rotate_half
        losses = []
        for b, rows in enumerate(targets):
            compact = torch.full((int(index[b].max()) + 1,), -1, dtype=torch.long)
            compact[index[b]] = torch.arange(len(index[b]))
            for kind, head, queries, keys in rows:
                keys = compact[keys]
                keys, queries = keys[keys >= 0], compact[queries]
                if not len(keys):
                    continue
                attention = self.layers[kind]
                hidden, (cos, sin) = self.captured[kind]["hidden"], self.captured[kind]["rope"]
                d, group = attention.head_dim, attention.num_key_value_groups
                q = attention.q_proj(hidden[b, queries])[:, head * d:(head + 1) * d].float()
                k = attention.k_proj(hidden[b])[:, (head // group) * d:(head // group + 1) * d].float()
                q = q * cos[b, queries].float() + rotate_half(q) * sin[b, queries].float()
                k = k * cos[b].float() + rotate_half(k) * sin[b].float()
                visible = (torch.arange(k.shape[0])[None] <= queries[:, None]) & mask[b].bool()[None]
                log_p = torch.log_softmax((q @ k.T / math.sqrt(d)).masked_fill(~visible, float("-inf")), dim=-1)
                losses.append(-torch.logsumexp(log_p[:, keys], dim=-1).mean())
        return torch.stack(losses).mean() if losses else mask.sum() * 0.0

    def early_exit(self, model, labels: torch.Tensor) -> torch.Tensor:
        """The answer read off `image_layer`'s output through the final norm and the LM head: a direct path
        from the lookup to the answer, so the heads' values learn to carry it."""
        positions = (labels[:, 1:] != -100).nonzero()
        hidden = self.captured["exit"][positions[:, 0], positions[:, 1]]
        logits = model.lm_head(model.model.language_model.norm(hidden)).float()
        return F.cross_entropy(logits, labels[positions[:, 0], positions[:, 1] + 1])

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def turn_correct(logits: torch.Tensor, labels: torch.Tensor) -> list[list[bool]]:
    """Per row, whether every token of each answer turn is the argmax (teacher forcing)."""
    predicted, target, out = logits[:, :-1].argmax(-1), labels[:, 1:], []
    for b in range(labels.shape[0]):
        answer = (target[b] != -100).nonzero()[:, 0]
        turns = torch.tensor_split(answer, (torch.diff(answer) > 1).nonzero()[:, 0] + 1) if len(answer) else []
        out.append([bool((predicted[b, t] == target[b, t]).all()) for t in turns])
    return out


# --- training -----------------------------------------------------------------------------------------------

def learning_rate(step: int, steps: int, peak: float, config: TrainConfig) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero over `steps` (each phase has its own schedule)."""
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, steps - config.warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def background_share(step: int, config: TrainConfig) -> float:
    ramp = config.curriculum_until * config.steps
    done = 1.0 if ramp <= 0 else min(1.0, step / ramp)
    return config.background_start + (1.0 - config.background_start) * done


def new_model(processor, config: TrainConfig):
    from transformers import LlavaOnevisionForConditionalGeneration
    torch.manual_seed(config.seed)
    model_config = ovqa_small_config(processor.tokenizer, config.lm_layers, config.vision_layers)
    model_config.text_config._attn_implementation = "sdpa"
    model_config.vision_config._attn_implementation = "sdpa"
    return LlavaOnevisionForConditionalGeneration(model_config)


def make_processor():
    from iwp.processor import byte_level_tokenizer, local_processor
    from iwp.zoo import all_pinpoints
    tokenizer = byte_level_tokenizer(tokenizer_corpus(), TOKENIZER_VOCAB)
    return local_processor(IMAGE_SIZE, PATCH, all_pinpoints(IMAGE_SIZE), tokenizer)


def optimizer_for(params, config: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, 0.98))


def step_optimizer(optimizer, loss: torch.Tensor, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(out: Path, config: TrainConfig = TrainConfig(), progress=print, stage: str = "base",
          start_from: Path | None = None) -> dict:
    """Stage "base": phases 1 and 2 from the seed. Stage "polish": phase 3 from a base model's directory
    (`start_from`), so each run stays under about 70 minutes and the base's output is the polish's
    checkpoint. Stage "lookup": phase 4 from a polished model's directory."""
    torch.set_num_threads(config.threads)
    clock = Clock()
    if stage == "base":
        processor = make_processor()
        model = new_model(processor, config)
        heads, history = TokenHeads(model.config.text_config.hidden_size, config.glyph_weight), []
        eye_phase(model, processor, heads, config, clock, history, progress)
        question_phase(model, processor, heads, config, clock, history, progress, phase="questions")
    elif stage in STAGES:
        model, processor, history = load_stage(start_from, config, stage)
        question_phase(model, processor, None, config, clock, history, progress, phase=stage)
    else:
        raise ValueError(f"train stage must be one of {', '.join(STAGES)}, got {stage!r}")
    model.eval()
    summary = {"config": dataclasses.asdict(config), "stage": stage, "history": history,
               "seconds": clock.seconds(), "torch": torch.__version__}
    save_model(model, processor, summary, out)
    return summary


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self) -> str:
        return f"{self.seconds() / 60:.1f} min"


def load_stage(path: Path | None, config: TrainConfig, stage: str = "polish"):
    """The model, processor and history of the stage that `stage` starts from; it must continue the same
    recipe (every setting but the later stages' own)."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from iwp.processor import processor_from_checkpoint
    previous = STAGES[stage]
    if path is None or not (Path(path) / "training.json").is_file():
        raise FileNotFoundError(f"no {previous} stage in {path}; run `iwp train --stage {previous} --out {path}` first")
    record = json.loads((Path(path) / "training.json").read_text())
    if record.get("stage", "base") != previous:
        raise ValueError(f"{path} holds the {record.get('stage', 'base')} stage, and the {stage} stage starts from "
                         f"the {previous} stage; pass --start with its directory")
    before = TrainConfig(**record["config"])
    later = [name for name in STAGES if list(STAGES).index(name) > list(STAGES).index(previous)]
    differs = [f.name for f in dataclasses.fields(TrainConfig) if not any(f.name.startswith(s) for s in later)
               and getattr(before, f.name) != getattr(config, f.name)]
    if differs:
        raise ValueError(f"the {previous} stage in {path} was trained with other settings ({', '.join(differs)}); "
                         f"retrain it with `iwp train --stage {previous}`")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    return model, processor_from_checkpoint(Path(path)), [h for h in record["history"] if h["phase"] != stage]


def eye_phase(model, processor, heads, config: TrainConfig, clock: Clock, history: list, progress) -> None:
    """Phase 1: the vision tower and projector alone, on the per-token heads."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              model.model.image_newline, *heads.parameters()]
    optimizer, losses = optimizer_for(vision, config), []
    for step in range(config.vision_steps):
        batch = image_batch(processor, ovqa.examples("train", config.batch, start=VISION_OFFSET + step * config.batch),
                            grid_for(step, config))
        with autocast:
            loss = heads(image_features(model, batch), batch["targets"], batch["xy"])
        step_optimizer(optimizer, loss, learning_rate(step, config.vision_steps, config.lr, config))
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.vision_steps:
            history.append({"phase": "vision", "step": step + 1, "loss": float(np.mean(losses[-50:])),
                            "seconds": clock.seconds()})
            progress(f"vision step {step + 1}/{config.vision_steps}  loss {np.mean(losses[-50:]):.4f}  "
                     f"{' '.join(f'{k} {v:.3f}' for k, v in heads.last.items())}  {clock}")


def question_phase(model, processor, heads, config: TrainConfig, clock: Clock, history: list, progress,
                   phase: str) -> None:
    """Phase 2 ("questions": the curriculum, the per-token heads at aux_weight), phase 3 ("polish": every
    token, no per-token heads, a fresh optimizer and schedule at polish_lr, on scenes phase 2 never read) or
    phase 4 ("lookup": the polish with the lookup's heads, on scenes neither read, at lookup_lr)."""
    from iwp.calibration.evaluate import dev_accuracy, ovqa_items
    from iwp.zoo import Loaded, ModelSpec

    from .train_lookup import LookupHeads, lookup_targets
    polish = phase in ("polish", "lookup")
    steps, peak, offset = {"questions": (config.steps, config.lr, 0),
                           "polish": (config.polish_steps, config.polish_lr, config.steps),
                           "lookup": (config.lookup_steps, config.lookup_lr, config.steps + config.polish_steps)}[phase]
    lookup = LookupHeads(model.config.text_config.hidden_size) if phase == "lookup" else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)
    dev = ovqa_items("train", config.dev_examples, start=DEV_OFFSET)
    spec = ModelSpec("ovqa-small", None, grid=(1, 1), budget=64)
    trained = [*model.parameters(), *(heads.parameters() if heads is not None else ()),
               *(lookup.parameters() if lookup is not None else ())]
    optimizer, losses, correct = optimizer_for(trained, config), [], {}
    guides = GuidedHeads(model, config)
    for local in range(steps):
        step = offset + local           # the data and the 2x2 steps follow the global step
        model.train()
        rng = random.Random(f"train:{config.seed}:{step}")
        examples, grid = ovqa.examples("train", config.batch, start=step * config.batch), grid_for(step, config)
        batch = question_batch(processor, examples, grid, config, rng)
        share = 1.0 if polish else background_share(step, config)
        keep = keep_masks(batch["targets"], share, np.random.default_rng([config.seed, step]))
        guided = config.guide_weight > 0
        targets = guide_targets(batch, examples, processor.tokenizer, model.config.image_token_id) if guided else []
        with autocast:
            features, kept = image_features(model, batch), []
            embeds, positions, mask, labels = lm_inputs(model, batch, features, keep, kept)
            logits = lm_logits(model, embeds, positions, mask)
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            aux_loss = heads(features, batch["targets"], batch["xy"]) if heads is not None else lm_loss * 0
            attn_loss = guides(targets, kept, mask) if guided else lm_loss * 0
            exit_loss = guides.early_exit(model, labels)
            lookup_loss = lm_loss * 0
            if lookup is not None:
                spans = answer_spans(batch["input_ids"], processor.tokenizer)
                wanted = lookup_targets(spans, batch["questions"], batch["types"], examples)
                lookup_loss = lookup(guides.captured["exit"], wanted, kept)
        step_optimizer(optimizer, lm_loss + config.aux_weight * aux_loss + config.guide_weight * attn_loss
                       + config.exit_weight * exit_loss + config.lookup_weight * lookup_loss,
                       learning_rate(local, steps, peak, config))
        losses.append((lm_loss.item(), aux_loss.item(), attn_loss.item(), exit_loss.item(), lookup_loss.item()))
        for types, oks in zip(batch["types"], turn_correct(logits.detach(), labels)):
            for t, ok in zip(types, oks):
                correct.setdefault(t, []).append(ok)
        if (local + 1) % config.eval_every == 0 or local + 1 == steps:
            model.eval()
            accuracy = dev_accuracy(Loaded(spec, model, processor, "training"), dev)
            lm, aux, attn, early, looked = (float(np.mean([x[i] for x in losses[-50:]])) for i in range(5))
            seen = {t: float(np.mean(v[-400:])) for t, v in sorted(correct.items())}
            history.append({"phase": phase, "step": local + 1, "loss": lm, "aux_loss": aux, "guide_loss": attn,
                            "exit_loss": early, "lookup_loss": looked, "train_turns": seen, "dev_accuracy": accuracy["all"],
                            "dev_by_type": accuracy, "seconds": clock.seconds()})
            by_type = " ".join(f"{k[:4]} {v:.0%}" for k, v in accuracy.items() if k != "all")
            progress(f"{phase} step {local + 1}/{steps}  loss {lm:.4f}  aux {aux:.3f}  guide {attn:.3f}  "
                     f"exit {early:.3f}  lookup {looked:.3f} {shown(lookup)}  dev accuracy {accuracy['all']:.1%} ({by_type})  teacher-forced "
                     f"{' '.join(f'{k[:4]} {v:.0%}' for k, v in seen.items())}  {clock}")
    guides.remove()


def shown(lookup) -> str:
    """The lookup heads' last step (phase 4), for the progress line."""
    return "" if lookup is None else "(" + " ".join(f"{k} {v:.3f}" for k, v in lookup.last.items()) + ")"


def save_model(model, processor, summary: dict, out: Path) -> None:
    """Weights (safetensors), config, processor files and training.json, all-or-nothing."""
    from iwp.atomic import staged_directory
    from iwp.processor import save_processor
    with staged_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        save_processor(processor, staging)
        (staging / "training.json").write_text(json.dumps(summary, indent=1))


def command(args) -> None:
    """`iwp train --stage base|polish|lookup`: the recipe's defaults, with --steps/--batch/--seed overriding them
    when given (--steps is the stage's own phase: phase 2 for base, 3 for polish, 4 for lookup)."""
    from iwp.zoo import bundled_dir
    steps = {"base": "steps", "polish": "polish_steps", "lookup": "lookup_steps"}[args.stage]
    config = TrainConfig(**{k: v for k, v in ((steps, args.steps), ("batch", args.batch), ("seed", args.seed))
                            if v is not None})
    directories = {"base": BASE_DIR, "polish": POLISH_DIR, "lookup": bundled_dir("ovqa-small")}
    out = Path(args.out) if args.out else directories[args.stage]
    previous = STAGES[args.stage]
    start_from = (Path(args.start) if args.start else directories[previous]) if previous else None
    summary = train(out, config, progress=lambda line: print(line, flush=True), stage=args.stage,
                    start_from=start_from)
    print(f"trained   {out} ({args.stage}) in {summary['seconds'] / 60:.1f} min; dev accuracy "
          f"{summary['history'][-1]['dev_accuracy']:.1%}")
