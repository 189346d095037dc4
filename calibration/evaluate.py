"""`iwp eval`: how much visual-QA accuracy each pruning method keeps, per method × budget, through the PyTorch
pruned forward (and, for chosen engines, through ONNX Runtime, with the two compared answer by answer).

Questions come from an OVQA split (calibration/ovqa.py) or from a JSONL file, the bridge for real checkpoints
and the standard benchmarks. One JSON object per line:

    {"image": "images/0001.jpg", "question": "Is there a dog?", "answers": ["yes"], "type": "adversarial"}

`image` is relative to the file's folder (or absolute); `answer` (one string) may stand for `answers`; `type`
is optional and gives the per-type breakdown. Metrics: `exact` (the normalized prediction equals one of the
answers: GQA, POPE, MME) or `vqa` (min(1, matching answers / 3): TextVQA, VQAv2).

An answer is the greedy generation after the prompt, up to <|im_end|> or MAX_ANSWER_TOKENS. The image
features are computed once per batch and shared by every method and budget, so a sweep pays for the vision
tower once.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from iwp.flops import model_dims, prefill_flops
from iwp.inputs import load_image, make_batch
from iwp.model import PrunedLlavaOnevision
from iwp.zoo import Loaded
from iwp.plugins.visual_token_select import METHODS, make_method

MAX_ANSWER_TOKENS = 10   # the longest OVQA answer ("triangle", "diamond") is 8 bytes, then <|im_end|>
METRICS = ("exact", "vqa")
DEFAULT_METHODS = ("none", "iwp", "btp", "transprune", "fastv", "dart", "divprune", "random")
DEFAULT_FRACTIONS = (0.05, 0.1, 0.15, 0.25, 0.5)


@dataclass(frozen=True)
class Item:
    image: object                   # a path, or a zero-argument callable that renders the image
    question: str
    answers: tuple[str, ...]
    qtype: str = "all"

    def load(self):
        return self.image() if callable(self.image) else load_image(self.image)


def ovqa_items(split: str, count: int, start: int = 0) -> list[Item]:
    from iwp.calibration import ovqa
    return [Item(e.image, e.question, (e.answer,), e.qtype) for e in ovqa.examples(split, count, start)]


def jsonl_items(path, prompt_suffix: str = "") -> list[Item]:
    """Items of a JSONL VQA file; a bad line is a one-line error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQA file {path} does not exist; pass a JSONL file with one question per line")
    items = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{number} is not UTF-8 (byte {err.start}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers = row["answers"] if "answers" in row else [row["answer"]]
            image, question = row["image"], row["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number} is not a VQA line ({type(err).__name__}: {err}); each line needs "
                             f'"image", "question" and "answer" or "answers"') from None
        if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
            raise ValueError(f'{path}:{number}: "answers" must be a non-empty list of strings')
        for field, value in (("image", image), ("question", question)):
            if not isinstance(value, str) or not value:
                raise ValueError(f'{path}:{number}: "{field}" must be a non-empty string, got {json.dumps(value)}')
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        suffix = f"\n{prompt_suffix}" if prompt_suffix else ""
        items.append(Item(image_path, question + suffix, tuple(str(a) for a in answers), str(row.get("type", "all"))))
    if not items:
        raise ValueError(f"VQA file {path} holds no questions")
    return items


def normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


def score(prediction: str, answers: Sequence[str], metric: str = "exact") -> float:
    p = normalize(prediction)
    if metric == "exact":
        return float(p in {normalize(a) for a in answers})
    if metric == "vqa":
        return min(1.0, sum(p == normalize(a) for a in answers) / 3)
    raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")


def decode_answers(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Generated token rows [B, n] to text, each cut at its first <|im_end|>."""
    eos, out = tokenizer.eos_token_id, []
    for row in tokens.tolist():
        row = row[: row.index(eos)] if eos in row else row
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


class Answerer:
    """Greedy answers for a batch of (image, question) under several (method, plan) settings at once."""

    def __init__(self, loaded: Loaded, model: PrunedLlavaOnevision | None = None,
                 max_new_tokens: int = MAX_ANSWER_TOKENS):
        self.loaded, self.model = loaded, model or PrunedLlavaOnevision(loaded.model)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def answer(self, images: Sequence, questions: Sequence[str], settings: Sequence[tuple]) -> list[list[str]]:
        """One list of answers per (method or None, plan or None) in `settings`."""
        batch = make_batch(self.loaded, list(images), list(questions))
        embeds = self.model.embed(batch)
        tokenizer = self.loaded.processor.tokenizer
        return [decode_answers(tokenizer, self.model.generate(batch, method, plan, self.max_new_tokens,
                                                              tokenizer.eos_token_id, embeds=embeds)[0])
                for method, plan in settings]


def predict(loaded: Loaded, items: Sequence[Item], settings: Sequence[tuple], batch_size: int = 16,
            progress: Callable[[str], None] | None = None, model: PrunedLlavaOnevision | None = None) -> list[list[str]]:
    """Predictions [setting][item] for every item under every (method, plan) setting."""
    answerer = Answerer(loaded, model)
    out: list[list[str]] = [[] for _ in settings]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        for preds, new in zip(out, answerer.answer([it.load() for it in chunk], [it.question for it in chunk], settings)):
            preds.extend(new)
        if progress:
            progress(f"answered {min(i + batch_size, len(items))}/{len(items)} questions x {len(settings)} settings")
    return out


def dev_accuracy(loaded: Loaded, items: Sequence[Item], batch_size: int = 16) -> dict[str, float]:
    """Unpruned accuracy overall ("all") and per question type (training's progress check)."""
    (preds,) = predict(loaded, items, [(None, None)], batch_size)
    scores: dict[str, list[float]] = {"all": []}
    for p, it in zip(preds, items):
        for key in ("all", it.qtype):
            scores.setdefault(key, []).append(score(p, it.answers))
    return {key: sum(v) / len(v) for key, v in scores.items()}


@dataclass
class Setting:
    method: str
    budget: int
    instance: object = None         # the method, None for "none"
    plan: object = None
    note: str = ""                  # why it cannot run at this budget


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (it stays inside [0, 1] near 0 and 1)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> dict:
    """mean(a - b) over the same questions, with its 95% interval (normal approximation of the paired
    differences) and whether the interval excludes 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired difference needs two equal, non-empty score lists, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    low, high = mean - z * sd / n ** 0.5, mean + z * sd / n ** 0.5
    return {"difference": mean, "low": low, "high": high, "significant": low > 0 or high < 0}


def budgets_from_fractions(fractions: Sequence[float], n_visual: int) -> list[int]:
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"budget fraction {f} is outside (0, 1]; pass fractions of the visual tokens, e.g. 0.1")
    return sorted({max(1, round(f * n_visual)) for f in fractions})


def make_settings(n_layers: int, n_visual: int, methods: Sequence[str], budgets: Sequence[int],
                  options: dict) -> list[Setting]:
    settings = []
    for name in methods:
        if name == "none":
            settings.append(Setting("none", n_visual))
            continue
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from: none, {', '.join(METHODS)}")
        method = make_method(name, **options.get(name, {}))
        for budget in budgets:
            try:
                settings.append(Setting(name, budget, method, method.plan(n_layers, n_visual, budget)))
            except ValueError as err:  # a multi-stage budget below what its unpruned layers cost
                settings.append(Setting(name, budget, method, None, str(err)))
    return settings


def summarize(setting: Setting, predictions: list[str], items: Sequence[Item], metric: str, dims, n_layers: int,
              n_visual: int) -> dict:
    row = {"method": setting.method, "budget": setting.budget, "fraction": setting.budget / n_visual,
           "config": _config(setting.instance), "note": setting.note}
    if setting.note:
        return row
    scores = [score(p, it.answers, metric) for p, it in zip(predictions, items)]
    tokens = setting.plan.tokens_per_layer if setting.plan else (n_visual,) * n_layers
    by_type: dict[str, list[float]] = {}
    for s, it in zip(scores, items):
        by_type.setdefault(it.qtype, []).append(s)
    full = prefill_flops((n_visual,) * n_layers, *dims)
    row.update(accuracy=sum(scores) / len(scores), interval=wilson_interval(sum(scores), len(scores)),
               scores=scores, by_type={t: sum(v) / len(v) for t, v in sorted(by_type.items())},
               tokens_per_layer=list(tokens), flops_ratio=prefill_flops(tokens, *dims) / full,
               predictions=predictions)
    return row


def _config(method) -> dict:
    import dataclasses
    return dataclasses.asdict(method.config) if method is not None else {}


def sweep(loaded: Loaded, items: Sequence[Item], methods: Sequence[str], budgets: Sequence[int],
          options: dict | None = None, metric: str = "exact", batch_size: int = 16,
          progress: Callable[[str], None] | None = None) -> dict:
    """Accuracy, retention against unpruned and the per-type breakdown of every method at every budget."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    model = PrunedLlavaOnevision(loaded.model)
    n = loaded.n_visual
    methods = ["none", *[m for m in methods if m != "none"]]   # retention needs the unpruned accuracy
    for budget in budgets:
        if not 1 <= budget <= n:
            raise ValueError(f"budget {budget} is outside 1..{n}, the visual tokens of {loaded.spec.name} at grid "
                             f"{loaded.spec.grid_name}; choose budgets in that range")
    settings = make_settings(model.n_layers, n, methods, budgets, options or {})
    runnable = [s for s in settings if not s.note]
    preds = dict(zip(map(id, runnable), predict(loaded, items, [(s.instance, s.plan) for s in runnable],
                                                 batch_size, progress, model)))
    dims = model_dims(loaded.model)
    rows = [summarize(s, preds.get(id(s), []), items, metric, dims, model.n_layers, n) for s in settings]
    unpruned = rows[0]["accuracy"]
    iwp = {r["budget"]: r for r in rows if r["method"] == "iwp" and not r["note"]}
    for row in rows:
        if not row["note"]:
            row["retention"] = row["accuracy"] / unpruned if unpruned else float("nan")
            # each method against unpruned and against IWP at the same budget, on the same questions
            row["vs_none"] = paired_difference(row["scores"], rows[0]["scores"])
            if row["method"] not in ("none", "iwp") and row["budget"] in iwp:
                row["vs_iwp"] = paired_difference(row["scores"], iwp[row["budget"]]["scores"])
    types: dict[str, int] = {}
    for it in items:
        types[it.qtype] = types.get(it.qtype, 0) + 1
    return {"model": loaded.spec.name, "source": loaded.source, "grid": loaded.spec.grid_name, "n_visual": n,
            "n_layers": model.n_layers, "metric": metric, "count": len(items), "types": types,
            "budgets": list(budgets), "rows": rows}
