"""Analytic prefill FLOPs from per-layer token counts.

Per decoder layer over n tokens, hidden size d and FFN size m: 4nd² + 2n²d + 3ndm, the model FastV and
TransPrune report (attention projections, attention itself, a gated FFN). With n = visual tokens it
reproduces the published LLaVA-1.5-7B figures: 3.82 TFLOPs at 576 tokens, 2.01 for FastV (K=2, R=50%) and
1.56 for TransPrune-High (504, 360 and 72 tokens from layers 7, 9 and 12).
"""
from __future__ import annotations

from collections.abc import Sequence


def layer_flops(n: int, d: int, m: int) -> float:
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int, text_tokens: int = 0) -> float:
    """Total FLOPs of the decoder over the visual tokens (plus `text_tokens` at every layer, if given)."""
    return float(sum(layer_flops(n + text_tokens, d, m) for n in tokens_per_layer))


def model_dims(hf_model) -> tuple[int, int]:
    cfg = hf_model.config.text_config
    return cfg.hidden_size, cfg.intermediate_size


def describe_counts(tokens_per_layer: Sequence[int]) -> str:
    """Run-length form of per-layer counts, e.g. '336x2 64x6'."""
    runs: list[list[int]] = []
    for n in tokens_per_layer:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return " ".join(f"{n}x{count}" for n, count in runs)
