// The baselines' scores (random's hash, DART's key norms and duplication, DivPrune's atypicality,
// TransPrune's mix, BTP's rebalancing): one thread per token or one block per sample.
#pragma once

#include "kernel_common.cuh"

namespace iwp
{
namespace vts
{

// The random baseline's integer hash of (index, seed), as baselines.hash_scores computes it in int64.
__global__ void hashScoreKernel(float* scores, int64_t batch, int64_t visual, int64_t seed)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= batch * visual)
    {
        return;
    }
    int64_t x = idx % visual + seed * 7919;
    for (int round = 0; round < 2; ++round)
    {
        auto const wrapped = static_cast<int64_t>(static_cast<uint64_t>(x) * 1103515245ULL + 12345ULL);
        x = wrapped % 2147483648LL;
        x = x < 0 ? x + 2147483648LL : x; // floor modulo, as torch's %
        x = x ^ (x / 65536);
    }
    scores[idx] = static_cast<float>(x % (1LL << 24));
}

// DART's pivot score: the mean over KV heads of the key norm of each visual token (one warp per token).
template <typename T>
__global__ void keyNormKernel(T const* k, int64_t const* visualStart, float* scores, int64_t batch, int64_t kvHeads,
    int64_t tokens, int64_t dim, int64_t visual)
{
    int64_t const token = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    int const lane = threadIdx.x & 31;
    // no early return: every lane of the block reaches the shuffles (HIP-CPU runs them as block barriers)
    bool const active = token < batch * visual;
    int64_t const b = active ? token / visual : 0, i = active ? token % visual : 0;
    float total = 0.0F;
    for (int64_t g = 0; g < kvHeads; ++g)
    {
        total += sqrtf(warpSquaredNorm(k + ((b * kvHeads + g) * tokens + visualStart[b] + i) * dim, dim, lane, active));
    }
    if (active && lane == 0)
    {
        scores[token] = total / static_cast<float>(kvHeads);
    }
}

// DART's duplication score: minus the max cosine to the pivots; pivots always stay.
__global__ void dartScoreKernel(float const* unit, int32_t const* pivots, int64_t nPivots, float* scores,
    int64_t batch, int64_t width, int64_t visual)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= batch * visual)
    {
        return;
    }
    int64_t const b = idx / visual, i = idx % visual;
    float const* plane = unit + b * width * visual;
    float dup = -INFINITY;
    bool nan = false, pivot = false;
    for (int64_t p = 0; p < nPivots; ++p)
    {
        int32_t const other = pivots[b * nPivots + p];
        pivot = pivot || other == i;
        float c = 0.0F;
        for (int64_t e = 0; e < width; ++e)
        {
            c = fmaf(plane[e * visual + i], plane[e * visual + other], c);
        }
        nan = nan || isnan(c);
        dup = fmaxf(dup, c);
    }
    scores[idx] = pivot ? FLT_MAX : rankable(nan ? NAN : -dup);
}

// DivPrune's atypicality: 1 - cos(hidden_i, mean hidden), the mean taken over raw rows.
__global__ void atypicalKernel(float const* unit, float const* mean, float* scores, int64_t batch, int64_t width,
    int64_t visual)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= batch * visual)
    {
        return;
    }
    int64_t const b = idx / visual, i = idx % visual;
    float const* m = mean + b * width;
    float dotMean = 0.0F, norm2 = 0.0F;
    for (int64_t e = 0; e < width; ++e)
    {
        dotMean = fmaf(unit[(b * width + e) * visual + i], m[e], dotMean);
        norm2 = fmaf(m[e], m[e], norm2);
    }
    scores[idx] = 1.0F - dotMean / fmaxf(sqrtf(norm2), 1e-8F);
}

// x = max(rankable(x), 0) / sum: TransPrune's normalisation of a score row (one block per sample).
__global__ void sumNormalizeKernel(float const* in, float* out, int64_t visual)
{
    __shared__ float shared[32];
    int64_t const b = blockIdx.x;
    float total = 0.0F;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        total += fmaxf(rankable(in[b * visual + i]), 0.0F);
    }
    total = fmaxf(blockReduce(total, Sum(), shared), 1e-30F);
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        out[b * visual + i] = fmaxf(rankable(in[b * visual + i]), 0.0F) / total;
    }
}

// TransPrune's mix: alpha * accumulated + (1 - alpha) * instruction-guided attention, without contraction.
__global__ void mixKernel(float const* accumulated, float const* guided, float* out, int64_t size, float alpha,
    float rest)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx < size)
    {
        out[idx] = __fadd_rn(__fmul_rn(alpha, accumulated[idx]), __fmul_rn(rest, guided[idx]));
    }
}

// BTP's rebalancing: remove the least-squares linear trend of log-attention along the token order, then
// softmax; the result is made rankable. One block per sample.
__global__ void rebalanceKernel(float* attn, int64_t visual)
{
    __shared__ float shared[32];
    int64_t const b = blockIdx.x;
    float* row = attn + b * visual;
    if (visual <= 2) // a line through every point: exactly uniform
    {
        for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
        {
            row[i] = 1.0F / static_cast<float>(visual);
        }
        return;
    }
    auto position = [&](int64_t i) { return visual == 1 ? -1.0F : -1.0F + 2.0F * i / static_cast<float>(visual - 1); };
    auto logA = [&](int64_t i) { return logf(clampMin(row[i], 1e-30F)); }; // NaN attention stays NaN
    float cov = 0.0F, var = 0.0F;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        cov += logA(i) * position(i);
        var += position(i) * position(i);
    }
    cov = blockReduce(cov, Sum(), shared);
    var = blockReduce(var, Sum(), shared);
    float const slope = cov / var;
    float top = -INFINITY;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        top = fmaxf(top, logA(i) - slope * position(i));
    }
    top = blockReduce(top, Max(), shared);
    float total = 0.0F;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        total += expf(logA(i) - slope * position(i) - top);
    }
    total = blockReduce(total, Sum(), shared);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        row[i] = rankable(expf(logA(i) - slope * position(i) - top) / total);
    }
}

__global__ void rankableKernel(float* x, int64_t size)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx < size)
    {
        x[idx] = rankable(x[idx]);
    }
}

} // namespace vts
} // namespace iwp
