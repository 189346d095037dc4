"""The compiled C++ CPU kernel against the PyTorch reference: identical indices, every method."""
import os

import pytest
import torch
from conftest import synthetic_view
from hypothesis import given, settings
from hypothesis import strategies as st

from iwp.plugins.visual_token_select import METHODS, make_method
from iwp.plugins.visual_token_select.cpu import select

OPTIONS = {
    "iwp": st.fixed_dictionaries({"lam": st.sampled_from([0.0, 0.3, 0.7, 1.0]),
                                  "chunk": st.sampled_from([1, 2, 4, 8]), "growth": st.sampled_from([1.0, 1.5, 2.0]),
                                  "queries": st.sampled_from(["instruction", "last"])}),
    "btp": st.fixed_dictionaries({"attention_first": st.sampled_from([0.0, 0.3]),
                                  "seed_fraction": st.sampled_from([0.1, 0.5, 1.0]),
                                  "rebalance": st.booleans(), "chunk": st.sampled_from([1, 4]),
                                  "growth": st.sampled_from([1.0, 1.5])}),
    "transprune": st.fixed_dictionaries({"alpha": st.sampled_from([0.0, 0.5, 1.0])}),
    "fastv": st.just({}), "dart": st.fixed_dictionaries({"pivots": st.integers(1, 6)}),
    "divprune": st.just({}), "random": st.fixed_dictionaries({"seed": st.integers(0, 2**31 - 1)}),
}


# IWP_HYPOTHESIS_EXAMPLES=500 for a deeper search than the 60 cases CI draws
@settings(max_examples=int(os.environ.get("IWP_HYPOTHESIS_EXAMPLES", "60")), deadline=None)
@given(name=st.sampled_from(sorted(METHODS)), seed=st.integers(0, 10_000), n=st.integers(2, 48),
       b=st.integers(1, 3), gqa=st.sampled_from([(4, 2), (4, 4), (6, 2)]), data=st.data())
def test_cpu_kernel_matches_reference(name, seed, n, b, gqa, data):
    keep = data.draw(st.integers(1, n))
    method = make_method(name, **data.draw(OPTIONS[name]))
    stages = data.draw(st.integers(1, 3))
    view = synthetic_view(B=b, N=n, Q=3, Hq=gqa[0], Hkv=gqa[1], d=16, seed=seed,
                          stage=data.draw(st.integers(0, stages - 1)), n_stages=stages)
    assert select(method, view, keep).tolist() == method.select(view, keep).tolist()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cpu_kernel_at_real_shapes(name):
    """LLaVA-OV-7B layer shapes (28 query heads, 4 KV heads, head dim 128) at N=729, K=64."""
    view = synthetic_view(B=1, N=729, Q=8, Hq=28, Hkv=4, d=128, D=64, seed=1)
    method = make_method(name)
    assert select(method, view, 64).tolist() == method.select(view, 64).tolist()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cpu_kernel_survives_nan(name):
    view = synthetic_view(B=1, N=20, seed=2)
    start = int(view.visual_start[0])
    view.v[0, :, start + 3] = float("nan")
    view.hidden[0, start + 7] = float("nan")
    out = select(make_method(name), view, 6)[0]
    assert out.unique().numel() == 6 and torch.equal(out, out.sort().values) and int(out.max()) < 20


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("tensor", ["q", "k", "q_rot", "k_rot"])
def test_cpu_kernel_keeps_nan_where_the_reference_does(name, tensor):
    """A NaN in a query or key of one visual token: the same indices as the reference (a NaN distance stays
    NaN, as torch.clamp keeps it, instead of becoming 0)."""
    view = synthetic_view(B=1, N=20, seed=3)
    start = int(view.visual_start[0])
    getattr(view, tensor)[0, :, start + 5] = float("nan")
    method = make_method(name)
    assert select(method, view, 6).tolist() == method.select(view, 6).tolist()


def test_cpu_kernel_rejects_bad_arguments():
    view = synthetic_view(B=1, N=20, seed=2)
    with pytest.raises(ValueError, match=r"keep=21 must be in \[1, N=20\]"):
        select(make_method("iwp"), view, 21)
    with pytest.raises(ValueError, match="head dim 300 is outside"):
        select(make_method("iwp"), synthetic_view(B=1, N=4, d=300, seed=2), 2)


def test_cpu_kernel_reads_attributes_through_the_generated_table():
    """Options come from the node's attributes via params.h's table: values are checked against their
    value sets, and another method's neutral options (queries="" on a FastV node) are ignored."""
    from iwp.plugins.visual_token_select import _cpu, contract
    view = synthetic_view(B=1, N=12, seed=4)
    arrays = [a.numpy() for a in (getattr(view, n) for n in contract.INPUTS)]
    arrays[contract.INPUTS.index("key_mask")] = arrays[contract.INPUTS.index("key_mask")].astype("uint8")
    arrays[contract.INPUTS.index("query_mask")] = arrays[contract.INPUTS.index("query_mask")].astype("uint8")
    fastv = contract.complete_attributes(contract.node_attributes(make_method("fastv"), 5, 2, 0, 1))
    assert fastv["queries"] == ""
    assert _cpu.select(arrays, fastv).tolist() == make_method("fastv").select(view, 5).tolist()
    iwp = contract.complete_attributes(contract.node_attributes(make_method("iwp"), 5, 2, 0, 1))
    with pytest.raises(ValueError, match="attribute queries='first' must be one of instruction, last"):
        _cpu.select(arrays, {**iwp, "queries": "first"})
    with pytest.raises(ValueError, match="attribute method='magic' must be one of iwp, fastv"):
        _cpu.select(arrays, {**iwp, "method": "magic"})
    with pytest.raises(ValueError, match="lam must be in"):
        _cpu.select(arrays, {**iwp, "lam": 1.5})
    with pytest.raises(ValueError, match=r"input k has shape \[1, 2, 17, 15\], expected \[1, 2, 17, 16\]"):
        _cpu.select([*arrays[:2], arrays[2][..., :-1].copy(), *arrays[3:]], iwp)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_infinite_magnitude_ranks_as_the_largest_float_at_every_lam(lam):
    """The inf rule (README): an infinite value norm makes the token's IWP magnitude +inf; it ranks as the
    largest finite float whatever λ (before, λ < 1 ranked it last, as non-finite), in the reference and the
    kernel alike."""
    view = synthetic_view(B=1, N=24, Q=3, seed=6)
    start = int(view.visual_start[0])
    view.v[0, :, start + 5] = float("inf")
    method = make_method("iwp", lam=lam)
    reference = method.select(view, 6)
    assert 5 in reference[0].tolist()
    assert select(method, view, 6).tolist() == reference.tolist()


def test_pcmmr_ranks_plus_inf_first_and_minus_inf_and_nan_last():
    from iwp.plugins.visual_token_select.pcmmr import pcmmr
    mag = torch.tensor([[1.0, float("inf"), float("nan"), 2.0, float("-inf"), 3.0]])
    never = lambda chosen: torch.zeros(1, 6, chosen.shape[1])   # noqa: E731  no duplication at all
    for lam in (0.0, 0.5, 1.0):
        assert pcmmr(mag, never, 4, lam=lam).tolist() == [[0, 1, 3, 5]], lam


def test_cpu_kernel_breaks_grid_distance_ties_as_the_reference():
    """BTP's spatial seeds rank exact distance ties on the patch grid. Both rank minus the squared distance in
    float32, step by step (no sqrt: torch's float32 sqrt is not correctly rounded, so ties round apart).
    Found by hypothesis."""
    method = make_method("btp", attention_first=0.0, seed_fraction=0.5, rebalance=False, chunk=1, growth=1.0)
    view = synthetic_view(B=1, N=26, Q=3, Hq=4, Hkv=2, d=16, seed=0)
    assert select(method, view, 10).tolist() == method.select(view, 10).tolist() == \
        [[0, 2, 8, 9, 12, 13, 20, 21, 23, 24]]


def test_rebalancing_two_tokens_is_exactly_uniform():
    """Detrending the log-attention of two tokens leaves nothing: the reference and the kernel both return
    the uniform distribution exactly, so the tie goes to the lower index (hypothesis found the rounding)."""
    method = make_method("btp", seed_fraction=0.1, rebalance=True, chunk=1, growth=1.0)
    view = synthetic_view(B=2, N=2, Q=3, Hq=4, Hkv=2, d=16, seed=3903)
    assert select(method, view, 1).tolist() == method.select(view, 1).tolist() == [[0], [0]]
