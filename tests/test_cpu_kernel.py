"""The compiled C++ CPU kernel against the PyTorch reference: identical indices."""
import pytest
import torch
from conftest import synthetic_view
from hypothesis import given, settings
from hypothesis import strategies as st

from iwp.plugins.visual_token_select.cpu import iwp_select
from iwp.plugins.visual_token_select.iwp import IWP, IWPConfig


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60), b=st.integers(1, 3), gqa=st.sampled_from([(4, 2), (4, 4), (6, 2)]),
       lam=st.sampled_from([0.0, 0.3, 0.7, 1.0]), schedule=st.sampled_from([(1, 1.0), (4, 1.5), (2, 2.0), (8, 1.0)]),
       queries=st.sampled_from(["instruction", "last"]), data=st.data())
def test_cpu_kernel_matches_reference(seed, n, b, gqa, lam, schedule, queries, data):
    keep = data.draw(st.integers(1, n))
    view = synthetic_view(B=b, N=n, Q=3, Hq=gqa[0], Hkv=gqa[1], d=16, seed=seed, ttv=False)
    config = IWPConfig(lam=lam, chunk=schedule[0], growth=schedule[1], queries=queries)
    assert iwp_select(view, config, keep).tolist() == IWP(config).select(view, keep).tolist()


def test_cpu_kernel_at_real_shapes():
    """LLaVA-OV-7B layer shapes (28 query heads, 4 KV heads, head dim 128) at N=729, K=64 and 128."""
    view = synthetic_view(B=1, N=729, Q=8, Hq=28, Hkv=4, d=128, D=16, seed=1, ttv=False)
    for keep in (64, 128):
        config = IWPConfig()
        assert iwp_select(view, config, keep).tolist() == IWP(config).select(view, keep).tolist()


def test_cpu_kernel_survives_nan_and_rejects_bad_arguments():
    view = synthetic_view(B=1, N=20, seed=2, ttv=False)
    view.v[0, :, int(view.visual_start[0]) + 3] = float("nan")
    out = iwp_select(view, IWPConfig(), 6)[0]
    assert out.unique().numel() == 6 and torch.equal(out, out.sort().values) and int(out.max()) < 20
    with pytest.raises(ValueError, match="keep <= N"):
        iwp_select(view, IWPConfig(), 21)
