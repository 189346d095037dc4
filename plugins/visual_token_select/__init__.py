"""VisualTokenSelect: choose K of the N visual tokens at a pruning layer, inside the model.

Every method has one interface:
    method.plan(n_layers, n_visual, budget) -> Plan         # static stages and per-layer token counts
    method.select(view: LayerView, keep) -> LongTensor[B, keep]  # sorted indices into the visual tokens
The PyTorch code in this folder is the reference: every other implementation is tested against it.
"""
from __future__ import annotations

import dataclasses

from .baselines import DART, DivPrune, FastV, Random
from .btp import BTP
from .iwp import IWP
from .stages import Plan
from .transprune import TransPrune
from .view import LayerView

METHODS = {m.name: m for m in (IWP, BTP, TransPrune, FastV, DART, DivPrune, Random)}


def make_method(name: str, **options):
    """Build a method by exact name; options override its config's defaults (unknown ones are an error)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)} (or 'none')")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return cls(cls.Config(**options))


__all__ = ["METHODS", "make_method", "LayerView", "Plan"]
