"""Property tests of PCMMR (pcmmr.py) and IWP's scoring (iwp_method.py) on random tensors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synthetic_view
from iwp.plugins.visual_token_select import iwp_method as iwp_module
from iwp.plugins.visual_token_select.iwp_method import IWP, IWPConfig, UpdateCosine, magnitude
from iwp.plugins.visual_token_select.pcmmr import chunk_schedule, pcmmr, top_indices
from iwp.plugins.visual_token_select.view import LayerView

SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)
lams = st.floats(0.0, 1.0, allow_nan=False)
positive_lams = st.floats(0.0, 1.0, allow_nan=False)
chunks = st.integers(1, 6)
growths = st.floats(1.0, 3.0, allow_nan=False)


# ---------------------------------------------------------------- helpers

def random_problem(seed: int, B: int, N: int, D: int = 8, pool: int | None = None, quantize: bool = False):
    """Positive magnitudes [B, N] and a full cosine similarity matrix [B, N, N] (fp32).

    pool: draw embeddings from only `pool` distinct vectors, so the similarity has exact ties (duplicates).
    quantize: magnitudes on a coarse grid, so they tie too."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) + 0.05
    if quantize:
        m = torch.floor(m * 4) / 4 + 0.25
    x = torch.randn(B, N if pool is None else pool, D, generator=g)
    if pool is not None:
        x = x.gather(1, torch.randint(0, pool, (B, N, 1), generator=g).expand(-1, -1, D))
    xn = torch.nn.functional.normalize(x, dim=-1)
    return m, xn @ xn.transpose(1, 2)


def columns(S: torch.Tensor):
    """similarity(chosen [B, c]) -> S[:, :, chosen] as [B, N, c], read from a full matrix."""
    return lambda chosen: S.gather(2, chosen[:, None, :].expand(-1, S.shape[1], -1))


def naive_mmr(m: torch.Tensor, S: torch.Tensor, k: int, lam: float) -> list[int]:
    """Textbook greedy MMR on one sample: m [N], S [N, N]. Ties go to the lowest index."""
    n = m.shape[0]
    m_hat = m / m.max()
    chosen = [max(range(n), key=lambda i: (m_hat[i].item(), -i))]
    while len(chosen) < k:
        max_sim = torch.stack([S[:, j] for j in chosen], dim=1).amax(dim=1)       # [N]
        score = lam * m_hat - (1 - lam) * max_sim
        best = None
        for i in range(n):
            if i not in chosen and (best is None or score[i].item() > score[best].item()):
                best = i
        chosen.append(best)
    return sorted(chosen)


def naive_top_k(score: torch.Tensor, k: int) -> list[int]:
    """k largest of a 1-D score, ties to the lowest index, in rank order."""
    return sorted(range(score.shape[0]), key=lambda i: (-score[i].item(), i))[:k]


def assert_selection(idx: torch.Tensor, B: int, K: int, N: int) -> None:
    assert idx.shape == (B, K)
    assert idx.dtype == torch.int64
    assert bool((idx >= 0).all()) and bool((idx < N).all())
    if K > 1:
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), f"not strictly ascending (so not unique): {idx}"


# ---------------------------------------------------------------- pcmmr output contract

@SETTINGS
@given(seed=seeds, B=st.integers(1, 3), N=st.integers(1, 40), k_frac=st.floats(0.0, 1.0), lam=lams,
       chunk=chunks, growth=growths, pool=st.sampled_from([None, 2, 5]))
def test_pcmmr_returns_k_unique_sorted_indices(seed, B, N, k_frac, lam, chunk, growth, pool):
    K = max(1, round(k_frac * N))
    m, S = random_problem(seed, B, N, pool=pool)
    out = pcmmr(m, columns(S), K, lam, chunk, growth)
    assert_selection(out, B, K, N)
    assert torch.equal(out, pcmmr(m, columns(S), K, lam, chunk, growth)), "not deterministic"


def test_pcmmr_rejects_bad_lam_and_k():
    m, S = random_problem(0, 1, 5)
    for lam in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lam"):
            pcmmr(m, columns(S), 2, lam)
    for k in (0, 6):
        with pytest.raises(ValueError, match="k must"):
            pcmmr(m, columns(S), k, 0.5)


# ---------------------------------------------------------------- ties

@pytest.mark.parametrize("chunk,growth", [(1, 1.0), (4, 1.5)])
@pytest.mark.parametrize("K", [1, 3, 7])
def test_equal_magnitudes_lam1_is_arange(K, chunk, growth):
    m = torch.full((2, 7), 0.3)
    out = pcmmr(m, lambda chosen: torch.zeros(2, 7, chosen.shape[1]), K, 1.0, chunk, growth)
    assert torch.equal(out, torch.arange(K).expand(2, K))


def test_top_indices_ties_lower_index_first():
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    assert top_indices(score, 1).tolist() == [[1], [0]]
    assert top_indices(score, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert top_indices(score, 5).tolist() == [[1, 2, 4, 3, 0], [0, 1, 2, 3, 4]]


@SETTINGS
@given(seed=seeds, N=st.integers(1, 30), k_frac=st.floats(0.0, 1.0), levels=st.integers(1, 4))
def test_top_indices_matches_naive_ranking_under_ties(seed, N, k_frac, levels):
    K = max(1, round(k_frac * N))
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, levels, (2, N), generator=g).float()
    got = top_indices(score, K)
    assert got.shape == (2, K)
    for b in range(2):
        assert got[b].tolist() == naive_top_k(score[b], K)


# ---------------------------------------------------------------- equivalences

@SETTINGS
@given(seed=seeds, B=st.integers(1, 2), N=st.integers(1, 14), k_frac=st.floats(0.0, 1.0), lam=lams,
       pool=st.sampled_from([None, 2, 4]), quantize=st.booleans())
def test_chunk1_equals_naive_greedy_mmr(seed, B, N, k_frac, lam, pool, quantize):
    K = max(1, round(k_frac * N))
    m, S = random_problem(seed, B, N, pool=pool, quantize=quantize)
    out = pcmmr(m, columns(S), K, lam, chunk=1, growth=1.0)
    for b in range(B):
        assert out[b].tolist() == naive_mmr(m[b], S[b], K, lam)


@SETTINGS
@given(seed=seeds, B=st.integers(1, 3), N=st.integers(1, 40), k_frac=st.floats(0.0, 1.0), chunk=chunks,
       growth=growths, quantize=st.booleans())
def test_lam1_is_top_k_by_magnitude(seed, B, N, k_frac, chunk, growth, quantize):
    K = max(1, round(k_frac * N))
    m, S = random_problem(seed, B, N, quantize=quantize)
    out = pcmmr(m, columns(S), K, 1.0, chunk, growth)
    for b in range(B):
        assert out[b].tolist() == sorted(naive_top_k(m[b], K))


@SETTINGS
@given(seed=seeds, N=st.integers(2, 24), k_frac=st.floats(0.0, 1.0), chunk=chunks, growth=growths,
       queries=st.sampled_from(["instruction", "last"]))
def test_iwp_lam1_is_top_k_of_magnitude(seed, N, k_frac, chunk, growth, queries):
    K = max(1, round(k_frac * N))
    view = synthetic_view(B=2, N=N, seed=seed)
    out = IWP(IWPConfig(lam=1.0, chunk=chunk, growth=growth, queries=queries)).select(view, K)
    m = magnitude(view, queries)
    assert m.shape == (2, N) and bool(torch.isfinite(m).all())
    for b in range(2):
        assert out[b].tolist() == sorted(naive_top_k(m[b], K))


# ---------------------------------------------------------------- chunk schedule

@SETTINGS
@given(k=st.integers(1, 300), chunk=st.integers(1, 20), growth=st.floats(1.0, 4.0, allow_nan=False))
def test_chunk_schedule(k, chunk, growth):
    sizes = chunk_schedule(k, chunk, growth)
    assert sum(sizes) == k
    assert all(c >= 1 for c in sizes)
    assert sizes[0] == min(k, chunk)
    assert all(a <= b for a, b in zip(sizes[:-2], sizes[1:-1])), f"body not non-decreasing: {sizes}"
    if len(sizes) > 1:  # the last one is at most its untruncated size
        assert sizes[-1] <= max(1, round(chunk * growth ** (len(sizes) - 1)))
        assert sizes[-2] <= max(1, round(chunk * growth ** (len(sizes) - 1)))


@pytest.mark.parametrize("k", [1, 2, 17])
def test_chunk_schedule_unit_is_greedy(k):
    assert chunk_schedule(k, 1, 1.0) == [1] * k


def test_chunk_schedule_grows():
    assert chunk_schedule(30, 4, 1.5) == [4, 6, 9, 11]  # 4, 6, 9, then 13.5 -> truncated to 11


@pytest.mark.parametrize("chunk,growth", [(0, 1.5), (-1, 1.5), (4, 0.99), (4, 0.0)])
def test_chunk_schedule_rejects_bad_values(chunk, growth):
    with pytest.raises(ValueError, match="chunk"):
        chunk_schedule(10, chunk, growth)


# ---------------------------------------------------------------- duplicates (the case)

COPIES = (3, 6)  # visual indices of the two identical tokens


def duplicate_view() -> LayerView:
    """B=1, T=12: 2 text tokens, N=8 visual tokens at 2..9, 2 instruction tokens at 10, 11.

    Visual tokens 3 and 6 are exact copies (same k, k_rot, v, hidden) with value norm 10x the others',
    so they are the top-2 by magnitude. k_rot is large, so distinct tokens' updates are far from parallel."""
    g = torch.Generator().manual_seed(1234)
    B, T, N, start, Hq, Hkv, d, D = 1, 12, 8, 2, 4, 2, 16, 32
    hidden = torch.randn(B, T, D, generator=g)
    q = torch.randn(B, Hq, T, d, generator=g) * 0.3
    k = torch.randn(B, Hkv, T, d, generator=g) * 0.3
    q_rot = torch.randn(B, Hq, T, d, generator=g) * 0.3
    k_rot = torch.randn(B, Hkv, T, d, generator=g) * 2.0
    v = torch.randn(B, Hkv, T, d, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    a, b = (start + i for i in COPIES)
    v[:, :, a] *= 10.0
    hidden[:, b] = hidden[:, a]
    for x in (k, k_rot, v):
        x[:, :, b] = x[:, :, a]
    return LayerView(
        hidden=hidden, q=q, k=k, q_rot=q_rot, k_rot=k_rot, v=v,
        key_mask=torch.ones(B, T, dtype=torch.bool),
        visual_start=torch.tensor([start]), n_visual=N,
        query_idx=torch.tensor([[10, 11]]), query_mask=torch.ones(B, 2, dtype=torch.bool),
        last_idx=torch.tensor([11]),
        visual_xy=torch.rand(B, N, 2, generator=g), ttv=None, layer=2, stage=0, n_stages=1)


def test_duplicate_view_precondition():
    view = duplicate_view()
    m = magnitude(view, "instruction")
    assert sorted(naive_top_k(m[0], 2)) == list(COPIES), f"copies are not the top-2 by magnitude: {m}"
    assert m[0, COPIES[0]] == m[0, COPIES[1]]
    S = UpdateCosine(view)(torch.tensor([list(COPIES)]))           # [1, N, 2]
    assert S[0, COPIES[1], 0].item() == pytest.approx(1.0, abs=1e-5)
    others = [i for i in range(8) if i not in COPIES]
    assert S[0, others, 0].abs().max().item() < 0.05, "distinct tokens should look distinct"


@pytest.mark.parametrize("config", [
    IWPConfig(lam=0.5, chunk=1, growth=1.0),
    IWPConfig(lam=0.0, chunk=1, growth=1.0),
    pytest.param(IWPConfig(lam=0.5), id="default-chunk"),
    pytest.param(IWPConfig(lam=0.5, chunk=2, growth=1.0), id="chunk2"),
])
def test_iwp_does_not_keep_both_copies(config):
    kept = IWP(config).select(duplicate_view(), 3)[0].tolist()
    assert len(set(kept) & set(COPIES)) == 1, f"kept {kept}; copies are {COPIES}"


@pytest.mark.parametrize("chunk,growth", [(1, 1.0), (4, 1.5)])
def test_iwp_lam1_keeps_both_copies(chunk, growth):
    kept = IWP(IWPConfig(lam=1.0, chunk=chunk, growth=growth)).select(duplicate_view(), 3)[0].tolist()
    assert set(COPIES) <= set(kept), f"kept {kept}; copies are {COPIES}"


# ---------------------------------------------------------------- UpdateCosine

def direct_update_cosine(view: LayerView) -> torch.Tensor:
    """Σ_h (v_i·v_j)·exp(k_i·k_j/√d) / (‖ΔW_i‖‖ΔW_j‖) in float64, straight from the definition: [B, N, N]."""
    k = view.visual(view.k_rot).double()
    v = view.visual(view.v).double()
    gram = ((v @ v.transpose(-1, -2)) * torch.exp(k @ k.transpose(-1, -2) / math.sqrt(k.shape[-1]))).sum(1)
    norm = gram.diagonal(dim1=1, dim2=2).sqrt()                      # ‖ΔW_i‖ = sqrt(<ΔW_i, ΔW_i>)
    return gram / (norm[:, :, None] * norm[:, None, :])


def full_update_cosine(view: LayerView) -> torch.Tensor:
    B, N = view.visual_start.shape[0], view.n_visual
    return UpdateCosine(view)(torch.arange(N).expand(B, N))


def assert_cosine_matrix(S: torch.Tensor) -> None:
    assert bool(torch.isfinite(S).all())
    assert torch.allclose(S.diagonal(dim1=1, dim2=2), torch.ones(()), atol=1e-5)
    assert S.abs().max().item() <= 1 + 1e-5
    assert torch.allclose(S, S.transpose(1, 2), atol=1e-5)


@SETTINGS
@given(seed=seeds, B=st.integers(1, 2), N=st.integers(2, 12), Hkv=st.integers(1, 3), d=st.sampled_from([4, 8, 16]),
       scale=st.floats(0.05, 1.0), v_scale=st.floats(0.1, 3.0))
def test_update_cosine_matches_direct_float64(seed, B, N, Hkv, d, scale, v_scale):
    view = synthetic_view(B=B, N=N, Hq=2 * Hkv, Hkv=Hkv, d=d, seed=seed, scale=scale, v_scale=v_scale)
    S = full_update_cosine(view)
    assert S.shape == (B, N, N) and S.dtype == torch.float32
    assert_cosine_matrix(S)
    torch.testing.assert_close(S.double(), direct_update_cosine(view), atol=2e-5, rtol=1e-4)
    chosen = torch.randint(0, N, (B, 3), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(UpdateCosine(view)(chosen), S.gather(2, chosen[:, None, :].expand(-1, N, -1)))


def huge_key_view() -> LayerView:
    """Keys of norm 60·√d, where κ(k, k) = exp(3600·√d) overflows fp32 (and fp64).

    Visual token 1 is token 0 with its values doubled (the same update direction: S = 1); visual token 2 is
    token 0 with its values negated (S = -1)."""
    B, N, d = 2, 10, 16
    view = synthetic_view(B=B, N=N, Hq=4, Hkv=2, d=d, seed=7)
    view.k_rot = view.k_rot / view.k_rot.norm(dim=-1, keepdim=True) * 60 * math.sqrt(d)
    idx = view.visual_idx
    for b in range(B):
        p0, p1, p2 = idx[b, :3].tolist()
        view.k_rot[b, :, p1] = view.k_rot[b, :, p0]
        view.k_rot[b, :, p2] = view.k_rot[b, :, p0]
        view.v[b, :, p1] = 2 * view.v[b, :, p0]
        view.v[b, :, p2] = -view.v[b, :, p0]
    kv = view.visual(view.k_rot)
    assert not bool(torch.isfinite(torch.exp((kv * kv).sum(-1) / math.sqrt(d))).any()), "precondition: overflow"
    return view


def test_update_cosine_is_finite_where_direct_exp_overflows():
    S = full_update_cosine(huge_key_view())
    N = S.shape[-1]
    assert bool(torch.isfinite(S).all())
    # fp32 rounding of exponents near 3600·√d costs about 1e-3 here (see the strict test below)
    assert torch.allclose(S.diagonal(dim1=1, dim2=2), torch.ones(()), atol=1e-2)
    assert torch.allclose(S[:, 0, 1], torch.ones(()), atol=1e-2)
    assert torch.allclose(S[:, 0, 2], -torch.ones(()), atol=1e-2)
    assert (S[:, 3:, 3:] - torch.eye(N - 3)).abs().max().item() < 1e-2  # distinct huge keys: ~orthogonal updates


def test_update_cosine_is_exact_on_the_diagonal_for_huge_keys():
    assert_cosine_matrix(full_update_cosine(huge_key_view()))


# ---------------------------------------------------------------- NaN rule

def assert_nan_rule(idx: torch.Tensor, m: torch.Tensor, K: int) -> None:
    """NaN-magnitude candidates are taken only when fewer than K finite ones exist."""
    for b in range(m.shape[0]):
        finite = set(torch.nonzero(~torch.isnan(m[b])).flatten().tolist())
        kept = set(idx[b].tolist())
        if len(finite) >= K:
            assert kept <= finite, f"kept NaN candidates {sorted(kept - finite)} with {len(finite)} finite ones"
        else:
            assert finite <= kept, f"dropped finite candidates {sorted(finite - kept)}"


@SETTINGS
@given(seed=seeds, B=st.integers(1, 3), N=st.integers(1, 30), k_frac=st.floats(0.0, 1.0), lam=positive_lams,
       chunk=chunks, growth=growths, nan_frac=st.floats(0.0, 1.0), nan_sim=st.booleans())
def test_pcmmr_nan_magnitudes(seed, B, N, k_frac, lam, chunk, growth, nan_frac, nan_sim):
    K = max(1, round(k_frac * N))
    m, S = random_problem(seed, B, N)
    g = torch.Generator().manual_seed(seed + 1)
    nan = torch.rand(B, N, generator=g) < nan_frac
    m = m.masked_fill(nan, float("nan"))
    if nan_sim:  # NaN tokens have NaN similarities too, as they would in IWP
        S = S.masked_fill(nan[:, :, None] | nan[:, None, :], float("nan"))
    out = pcmmr(m, columns(S), K, lam, chunk, growth)
    assert_selection(out, B, K, N)
    assert_nan_rule(out, m, K)


@pytest.mark.parametrize("scale", [
    0.5,
    2.0,
])
def test_pcmmr_lam0_nan_magnitude_ranks_last(scale):
    S = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]])
    m = torch.tensor([[1.0, float("nan"), 0.5]]) * scale
    assert pcmmr(m, columns(S), 2, 0.0).tolist() == [[0, 2]]


@SETTINGS
@given(seed=seeds, N=st.integers(2, 20), k_frac=st.floats(0.0, 1.0), lam=positive_lams, which=st.sampled_from(["q", "k", "v"]),
       nan_frac=st.floats(0.05, 1.0), chunk=chunks)
def test_iwp_select_with_nan_activations(seed, N, k_frac, lam, which, nan_frac, chunk):
    K = max(1, round(k_frac * N))
    view = synthetic_view(B=2, N=N, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    bad = torch.rand(2, N, generator=g) < nan_frac                     # [B, N] visual tokens to poison
    pos = view.visual_idx
    for name in ([which, which + "_rot"] if which in ("q", "k") else [which]):
        x = getattr(view, name)
        for b in range(2):
            x[b, :, pos[b, bad[b]]] = float("nan")
    out = IWP(IWPConfig(lam=lam, chunk=chunk)).select(view, K)
    assert_selection(out, 2, K, N)
    assert_nan_rule(out, magnitude(view, "instruction"), K)


def test_iwp_skips_nan_value_tokens():
    N = 8
    view = synthetic_view(B=1, N=N, seed=5)
    pos = view.visual_idx[0]
    view.v[0, :, pos[[1, 4, 6]]] = float("nan")
    m = magnitude(view, "instruction")
    assert torch.isnan(m[0]).tolist() == [i in (1, 4, 6) for i in range(N)]
    for lam in (0.0, 0.7, 1.0):
        assert IWP(IWPConfig(lam=lam)).select(view, 5)[0].tolist() == [0, 2, 3, 5, 7]
        out = IWP(IWPConfig(lam=lam)).select(view, 7)[0].tolist()
        assert {0, 2, 3, 5, 7} <= set(out) and len(set(out)) == 7


# ---------------------------------------------------------------- memory: no N×N matrix

def test_iwp_similarity_is_only_asked_for_chosen_columns(monkeypatch):
    B, N, K = 1, 7290, 128
    calls = []

    class Recording(UpdateCosine):
        def __call__(self, chosen):
            out = super().__call__(chosen)
            calls.append((tuple(chosen.shape), tuple(out.shape)))
            return out

    monkeypatch.setattr(iwp_module, "UpdateCosine", Recording)
    view = synthetic_view(B=B, N=N, Q=4, Hq=8, Hkv=4, d=128, D=16, seed=0, ttv=False)
    out = IWP(IWPConfig(lam=0.7, chunk=4, growth=1.5)).select(view, K)
    assert_selection(out, B, K, N)
    assert calls, "UpdateCosine was never called"
    for (b, c), shape in calls:
        assert b == B and 1 <= c <= K, (b, c)
        assert shape == (B, N, c)
    sizes = chunk_schedule(K, 4, 1.5)
    # one call per step, for its pool of 2·c_s candidates (capped by what is left): never all N columns
    assert [c for (_, c), _ in calls] == [min(2 * c, N - sum(sizes[:i])) for i, c in enumerate(sizes)]
