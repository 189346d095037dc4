"""Every selection method behind the common interface: output contract, determinism, plans and config checks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synthetic_view
from iwp.plugins.visual_token_select import METHODS, make_method
from iwp.plugins.visual_token_select.stages import Plan, average_budget_plan

N = 24
KEEPS = [1, 3, 10, N - 1, N]
NAMES = ["iwp", "btp", "transprune", "fastv", "dart", "divprune", "random"]


def test_registry_has_every_method():
    assert sorted(METHODS) == sorted(NAMES)
    for name, cls in METHODS.items():
        assert cls.name == name


def view_for(name: str, seed: int = 0, ttv: bool = True):
    # B=2 with visual blocks at 3 and 6; BTP reads stage/n_stages for its attention weight
    return synthetic_view(B=2, N=N, Q=4, Hq=4, Hkv=2, d=16, starts=[3, 6], seed=seed, ttv=ttv,
                          stage=1, n_stages=3)


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("name", NAMES)
def test_select_contract(name, keep):
    method = make_method(name)
    view = view_for(name)
    out = method.select(view, keep)
    assert out.shape == (2, keep)
    assert out.dtype == torch.int64
    assert bool((out >= 0).all()) and bool((out < N).all())
    if keep > 1:
        assert bool((out[:, 1:] > out[:, :-1]).all()), f"not strictly ascending (so not unique): {out}"
    assert torch.equal(out, method.select(view, keep)), "not deterministic"
    assert torch.equal(out, make_method(name).select(view_for(name), keep)), "depends on more than the view"
    if keep == N:
        assert torch.equal(out, torch.arange(N).expand(2, N))


@pytest.mark.parametrize("keep", [1, 7])
def test_transprune_without_ttv(keep):
    out = make_method("transprune").select(view_for("transprune", ttv=False), keep)
    assert out.shape == (2, keep) and out.dtype == torch.int64
    assert len(set(out[0].tolist())) == keep and bool((out < N).all())


@pytest.mark.parametrize("name", ["iwp", "btp", "transprune", "fastv", "dart", "divprune"])
def test_selection_reads_the_view(name):
    """A method that reads activations picks differently for at least one of several random views."""
    method = make_method(name)
    picks = {tuple(method.select(view_for(name, seed=s), 6)[0].tolist()) for s in range(5)}
    assert len(picks) > 1, f"{name} picked {picks} for every view"


# ---------------------------------------------------------------- random

def test_random_seeds():
    view = view_for("random")
    a = make_method("random", seed=0).select(view, 8)
    b = make_method("random", seed=1).select(view, 8)
    assert not torch.equal(a, b), "two seeds gave the same selection"
    assert torch.equal(a, make_method("random", seed=0).select(view_for("random", seed=3), 8)), \
        "the same seed gave a different selection"
    assert torch.equal(b, make_method("random", seed=1).select(view, 8))


# ---------------------------------------------------------------- plans

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_layers,n_visual,budget", [(24, 729, 192), (28, 729, 128), (32, 2916, 640)])
def test_plan_counts_every_layer(name, n_layers, n_visual, budget):
    plan = make_method(name).plan(n_layers, n_visual, budget)
    assert isinstance(plan, Plan)
    assert len(plan.tokens_per_layer) == n_layers
    assert all(1 <= t <= n_visual for t in plan.tokens_per_layer)
    assert list(plan.tokens_per_layer) == sorted(plan.tokens_per_layer, reverse=True)
    first_layer, _ = plan.stages[0]
    assert plan.tokens_per_layer[:first_layer] == (n_visual,) * first_layer  # nothing pruned before it
    if name not in ("btp", "transprune"):
        assert plan.stages == ((make_method(name).config.layer, budget),)
        assert plan.tokens_per_layer[first_layer:] == (budget,) * (n_layers - first_layer)


@pytest.mark.parametrize("name", ["btp", "transprune"])
@pytest.mark.parametrize("n_layers,n_visual,budget", [(24, 729, 192), (28, 729, 128), (32, 2916, 640),
                                                      (24, 729, 729), (28, 729, 110)])
def test_multi_stage_plan_meets_budget(name, n_layers, n_visual, budget):
    plan = make_method(name).plan(n_layers, n_visual, budget)
    assert len(plan.tokens_per_layer) == n_layers
    assert len(plan.stages) == len(make_method(name).stage_layers(n_layers))
    assert abs(plan.mean_tokens - budget) <= 1.0, (plan.mean_tokens, budget, plan.stages)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["btp", "transprune"]), n_layers=st.integers(8, 40), n_visual=st.integers(16, 3000),
       frac=st.floats(0.0, 1.0))
def test_multi_stage_plan_meets_any_feasible_budget(name, n_layers, n_visual, frac):
    method = make_method(name)
    first = min(method.stage_layers(n_layers))
    floor = (first * n_visual + (n_layers - first)) / n_layers      # what layers before the first stage cost
    budget = min(n_visual, int(floor) + 1 + round(frac * (n_visual - floor)))
    plan = method.plan(n_layers, n_visual, budget)
    assert len(plan.tokens_per_layer) == n_layers
    assert abs(plan.mean_tokens - budget) <= 1.0, (plan.mean_tokens, budget, plan.stages)


def test_infeasible_budget_names_budget():
    with pytest.raises(ValueError, match="budget"):
        average_budget_plan((3, 9, 15), 24, 729, 50)   # layers 0..2 alone already cost ~92 per layer
    for name in ("btp", "transprune"):
        with pytest.raises(ValueError, match="budget"):
            make_method(name).plan(24, 729, 50)


# ---------------------------------------------------------------- configs

def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError) as err:
        make_method("nope")
    assert "nope" in str(err.value)
    for name in NAMES:
        assert name in str(err.value)


def test_unknown_option():
    with pytest.raises(ValueError, match="bogus"):
        make_method("iwp", bogus=1)


@pytest.mark.parametrize("name,options,field", [
    ("iwp", {"lam": 2.0}, "lam"),
    ("iwp", {"lam": -0.1}, "lam"),
    ("iwp", {"chunk": 0}, "chunk"),
    ("iwp", {"growth": 0.5}, "growth"),
    ("iwp", {"queries": "x"}, "queries"),
    ("iwp", {"layer": -1}, "layer"),
    ("btp", {"attention_first": -1.0}, "attention_first"),
    ("btp", {"seed_fraction": 1.5}, "seed_fraction"),
    ("btp", {"layers": ()}, "layers"),
    ("transprune", {"alpha": 2.0}, "alpha"),
    ("dart", {"pivots": 0}, "pivots"),
    ("random", {"seed": -1}, "seed"),
])
def test_invalid_config_values(name, options, field):
    with pytest.raises(ValueError, match=field):
        make_method(name, **options)


@pytest.mark.parametrize("name", NAMES)
def test_default_config_is_valid(name):
    method = make_method(name)
    assert isinstance(method.config, METHODS[name].Config)


def test_dart_ranks_a_nan_token_last():
    view = synthetic_view(B=1, N=12, seed=4, ttv=False)
    bad = int(view.visual_start[0]) + 5
    view.hidden[0, bad] = float("nan")
    out = make_method("dart", pivots=2).select(view, 6)[0].tolist()
    assert 5 not in out and len(set(out)) == 6
