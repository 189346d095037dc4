"""The reference sampler: the runtime core's (runtime/core/sampler.cpp) in Python, step for step, so both draw
the same token for the same seed. Greedy at temperature 0; otherwise temperature, then top-p (nucleus)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MASK64 = (1 << 64) - 1


class SplitMix64:
    """The runtime core's random stream (runtime/core/sampler.cpp), in Python."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def uniform(self) -> float:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((z ^ (z >> 31)) >> 11) * 2.0 ** -53


@dataclass
class Sampler:
    """Greedy at temperature 0; otherwise temperature then top-p (nucleus), from a seeded SplitMix64 stream.
    Sums run in index or rank order, in double, as the C++ loop adds."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer (any size: it is taken modulo 2**64), got {type(self.seed).__name__}")
        # inf would pass `>= 0` and sample uniformly: a finite temperature is what anyone means
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be finite and >= 0 and top_p in (0, 1], got {self.temperature}, "
                             f"{self.top_p}")
        self.rng = SplitMix64(int(self.seed))

    def core(self):
        """The same sampler in the runtime core."""
        from ._core import Sampler as CoreSampler
        return CoreSampler(self.temperature, self.top_p, self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= np.cumsum(p)[-1]                      # a sequential sum, as the C++ loop adds
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        before = np.concatenate([[0.0], cumulative[:-1]])
        kept = int(np.count_nonzero(before < self.top_p))   # the smallest prefix reaching top_p
        u = self.rng.uniform() * cumulative[kept - 1]
        pick = min(int(np.searchsorted(cumulative[:kept], u, side="right")), kept - 1)
        return int(order[pick])
