"""Accuracy through an exported engine against the PyTorch pruned forward, on the same questions."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from iwp.calibration.evaluate import MAX_ANSWER_TOKENS, Item, predict, score
from iwp.model import PrunedLlavaOnevision
from iwp.zoo import Loaded


def engine_agreement(directory, loaded: Loaded, items: Sequence[Item], metric: str = "exact",
                     progress: Callable[[str], None] | None = None) -> dict:
    """The same questions through an ONNX Runtime engine and through the PyTorch pruned forward with the
    engine's own method, budget and grid: both accuracies and the share of identical answers."""
    from iwp.plugins.visual_token_select.contract import method_from_attributes
    from iwp.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_engine(directory)
    m = pipeline.manifest
    if (m.model.name, m.model.grid) != (loaded.spec.name, loaded.spec.grid_name):
        raise ValueError(f"engine {directory} is {m.model.name} at grid {m.model.grid}, but the evaluation "
                         f"is {loaded.spec.name} at {loaded.spec.grid_name}; pass --model/--grid to match the engine")
    name, nodes = m.method.name, m.method.nodes
    method = method_from_attributes(nodes[0]) if name != "none" else None
    model = PrunedLlavaOnevision(loaded.model)
    plan = method.plan(model.n_layers, loaded.n_visual, m.method.budget) if method else None
    steps = min(MAX_ANSWER_TOKENS, pipeline.max_new_tokens)
    ort = []
    for i, it in enumerate(items):
        ort.append(pipeline.generate(it.load(), it.question, max_new_tokens=steps))
        if progress and (i + 1) % 50 == 0:
            progress(f"{Path(directory).name}: {i + 1}/{len(items)} questions through ONNX Runtime")
    (torch_preds,) = predict(loaded, items, [(method, plan)], model=model)
    mean = lambda preds: sum(score(p, it.answers, metric) for p, it in zip(preds, items)) / len(items)  # noqa: E731
    return {"engine": str(directory), "method": name, "budget": m.method.budget,
            "onnxruntime_accuracy": mean(ort), "pytorch_accuracy": mean(torch_preds),
            "agreement": sum(a == b for a, b in zip(ort, torch_preds)) / len(items),
            "disagreements": [{"question": it.question, "onnxruntime": a, "pytorch": b}
                              for a, b, it in zip(ort, torch_preds, items) if a != b][:20]}
