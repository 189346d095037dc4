"""VisualTokenSelect: choose K of the N visual tokens at a pruning layer, inside the model.

Every method has one interface:
    method.plan(n_layers, n_visual, budget) -> Plan         # static stages and per-layer token counts
    method.select(view: LayerView, keep) -> LongTensor[B, keep]  # sorted indices into the visual tokens
The PyTorch code in this folder is the reference: every other implementation is tested against it.
"""
from __future__ import annotations

from .baselines import DART, DivPrune, FastV, Random
from .btp import BTP
from .iwp_method import IWP
from .options import checked_options
from .stages import Plan
from .transprune import TransPrune
from .view import LayerView

METHODS = {m.name: m for m in (IWP, BTP, TransPrune, FastV, DART, DivPrune, Random)}


def make_method(name: str, **options):
    """Build a method by exact name; options override its config's defaults. An unknown option, a value of the
    wrong kind (`layer=1.5`, `layer=true`, `lam="abc"`) or one out of range is a one-line ValueError."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)} (or 'none')")
    cls = METHODS[name]
    return cls(cls.Config(**checked_options(name, cls.Config, options)))


__all__ = ["METHODS", "make_method", "LayerView", "Plan"]
