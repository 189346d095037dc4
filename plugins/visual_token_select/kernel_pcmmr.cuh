// PCMMR on the GPU: per chunk step a pool of the 2c best MMR scores (one block per sample), the exact
// greedy over the pool, and the taken flags compacted to ascending indices at the end. The host walks the
// chunk schedule (kernel_enqueue.cuh), so the launch sequence depends on the attributes only.
#pragma once

#include "kernel_topk.cuh"

namespace iwp
{
namespace vts
{

struct PcmmrState
{
    float* mag;       // [B, N] magnitudes divided by their max (non-finite -> 0)
    uint8_t* finite;  // [B, N]
    uint8_t* taken;   // [B, N]
    float* maxSim;    // [B, N] max similarity to the chosen set (-inf before the first step)
    uint32_t* keys;   // [B, N]
    int32_t* chosen;  // [B, K] in pick order
    int32_t* cand;    // [B, maxPool]
    float* intra;     // [B, maxPool, maxPool]
};

__global__ void pcmmrInitKernel(float const* raw, PcmmrState st, int64_t visual)
{
    __shared__ float shared[32];
    int64_t const b = blockIdx.x;
    // the inf rule: +inf is the largest finite float (so it normalizes to 1 and is weighed at every λ);
    // NaN and -inf rank last
    auto const magnitude = [&](int64_t i) {
        float const x = raw[b * visual + i];
        return x == INFINITY ? FLT_MAX : x;
    };
    float top = 0.0F;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        float const x = magnitude(i);
        top = isfinite(x) ? fmaxf(top, x) : top;
    }
    top = fmaxf(blockReduce(top, Max(), shared), FLT_MIN);
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        float const x = magnitude(i);
        bool const ok = isfinite(x);
        st.finite[b * visual + i] = ok;
        st.mag[b * visual + i] = (ok ? x : 0.0F) / top;
        st.taken[b * visual + i] = 0;
        st.maxSim[b * visual + i] = -INFINITY;
    }
}

// Copy `count` seed tokens into the chosen list and mark them taken (BTP's first chunk).
__global__ void pcmmrSeedKernel(int32_t const* seed, int64_t count, PcmmrState st, int64_t keep, int64_t visual)
{
    int64_t const b = blockIdx.x;
    for (int64_t t = threadIdx.x; t < count; t += blockDim.x)
    {
        int32_t const token = seed[b * count + t];
        st.chosen[b * keep + t] = token;
        st.taken[b * visual + token] = 1;
    }
}

// The pool of a step: the `pool` best MMR scores among untaken tokens, ascending by index.
__global__ void __launch_bounds__(kSelectThreads) pcmmrPoolKernel(PcmmrState st, int64_t visual, int64_t pool, int64_t maxPool, bool hasSim,
    float lam, float rest)
{
    __shared__ SelectShared sh;
    int64_t const b = blockIdx.x;
    uint32_t* keys = st.keys + b * visual;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        int64_t const at = b * visual + i;
        float const score = st.taken[at]
            ? -INFINITY
            : mmrScore(st.mag[at], st.maxSim[at], hasSim, st.finite[at], lam, rest);
        keys[i] = orderKey(score);
    }
    __syncthreads();
    blockTopSorted(keys, static_cast<int>(visual), static_cast<int>(pool), st.cand + b * maxPool, sh);
}

// Exact greedy over the pool: `count` picks, each the best MMR score against the chosen set so far
// (ties to the lower pool position, i.e. the lower token index). Picks go to chosen[done..done+count).
__global__ void pcmmrGreedyKernel(PcmmrState st, int64_t visual, int64_t keep, int64_t pool, int64_t maxPool,
    int64_t count, int64_t done, bool hasSim, float lam, float rest)
{
    IWP_DYNAMIC_SHARED(float, inner); // [pool], then picked flags
    uint8_t* picked = reinterpret_cast<uint8_t*>(inner + pool);
    __shared__ unsigned long long reduce[32];
    int64_t const b = blockIdx.x;
    int32_t const* cand = st.cand + b * maxPool;
    float const* intra = st.intra + b * maxPool * maxPool; // [pool, pool] rows of this step
    for (int64_t p = threadIdx.x; p < pool; p += blockDim.x)
    {
        inner[p] = st.maxSim[b * visual + cand[p]];
        picked[p] = 0;
    }
    bool innerHasSim = hasSim;
    __syncthreads();
    for (int64_t t = 0; t < count; ++t)
    {
        unsigned long long best = 0;
        for (int64_t p = threadIdx.x; p < pool; p += blockDim.x)
        {
            int64_t const at = b * visual + cand[p];
            float const s = picked[p] ? -INFINITY : mmrScore(st.mag[at], inner[p], innerHasSim, st.finite[at], lam, rest);
            unsigned long long const key
                = (static_cast<unsigned long long>(orderKey(s)) << 32) | (0xFFFFFFFFULL - static_cast<uint64_t>(p));
            best = key > best ? key : best;
        }
        best = blockReduce(best, Max(), reduce);
        int64_t const winner = static_cast<int64_t>(0xFFFFFFFFULL - (best & 0xFFFFFFFFULL));
        if (threadIdx.x == 0)
        {
            picked[winner] = 1;
            st.chosen[b * keep + done + t] = cand[winner];
            st.taken[b * visual + cand[winner]] = 1;
        }
        for (int64_t p = threadIdx.x; p < pool; p += blockDim.x)
        {
            float const col = intra[p * pool + winner];
            inner[p] = innerHasSim ? fmaxf(inner[p], col) : col;
        }
        innerHasSim = true;
        __syncthreads();
    }
}

// The taken flags as ascending indices: out[b, 0..keep).
template <typename OutT>
__global__ void __launch_bounds__(kSelectThreads) takenToIndicesKernel(uint8_t const* taken, OutT* out, int64_t visual, int64_t keep)
{
    __shared__ int scan[33];
    int64_t const b = blockIdx.x;
    int const n = static_cast<int>(visual);
    int const per = (n + blockDim.x - 1) / blockDim.x;
    int const lo = min(n, static_cast<int>(threadIdx.x) * per), hi = min(n, lo + per);
    int count = 0;
    for (int i = lo; i < hi; ++i)
    {
        count += taken[b * visual + i] != 0;
    }
    int total = 0;
    int position = blockExclusiveScan(count, scan, total);
    for (int i = lo; i < hi; ++i)
    {
        if (taken[b * visual + i] && position < keep)
        {
            out[b * keep + position++] = static_cast<OutT>(i);
        }
    }
}

} // namespace vts
} // namespace iwp
