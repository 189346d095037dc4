// Per-token features for the similarities: column means of the visual rows, IWP's update features (centred
// scaled keys, unit values, head weights) and the unit hidden rows, all stored feature-major.
#pragma once

#include "kernel_common.cuh"

namespace iwp
{
namespace vts
{

// Column sums of the visual rows of `matrices` [M, rows, cols] (matrix m belongs to sample m / perSample),
// in kColumnSlices slices of rows, each summed in a fixed order: partial[m, slice, col].
template <typename T>
__global__ void columnSumKernel(T const* matrices, int64_t const* visualStart, float* partial, int64_t perSample,
    int64_t rows, int64_t cols, int64_t visual)
{
    __shared__ float shared[8][33];
    int64_t const m = blockIdx.x, col = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
    int64_t const slice = blockIdx.z, per = (visual + kColumnSlices - 1) / kColumnSlices;
    int64_t const start = visualStart[m / perSample], lo = slice * per, hi = min(visual, lo + per);
    float sum = 0.0F;
    if (col < cols)
    {
        for (int64_t i = lo + threadIdx.y; i < hi; i += blockDim.y)
        {
            sum += toFloat(matrices[(m * rows + start + i) * cols + col]);
        }
    }
    shared[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols)
    {
        float total = 0.0F;
        for (int y = 0; y < static_cast<int>(blockDim.y); ++y)
        {
            total += shared[y][threadIdx.x];
        }
        partial[(m * kColumnSlices + slice) * cols + col] = total;
    }
}

// mean[m, col] = scale * sum of the slices / visual.
__global__ void columnMeanKernel(float const* partial, float* mean, int64_t matrices, int64_t cols, int64_t visual,
    float scale)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= matrices * cols)
    {
        return;
    }
    int64_t const m = idx / cols, col = idx % cols;
    float total = 0.0F;
    for (int s = 0; s < kColumnSlices; ++s)
    {
        total += partial[(m * kColumnSlices + s) * cols + col];
    }
    mean[idx] = total * scale / static_cast<float>(visual);
}

// IWP's update features for 16 tokens of one KV head per block, stored feature-major so the similarity
// kernels read them coalesced: A = k_rot / d^(1/4) - mean (featA[b,h,e,i]), the unit value (featV), |A|^2
// (sq), log|v| (logVnorm) and, in logW, log self-similarity sum(a^2) + 2 log|v| (made log weights later).
template <typename T>
__global__ void updateFeaturesKernel(T const* kRot, T const* v, int64_t const* visualStart, float const* keyMean,
    float* featA, float* featV, float* sq, float* logW, float* logVnorm, int64_t kvHeads, int64_t tokens,
    int64_t dim, int64_t visual)
{
    constexpr int kTile = 16;
    __shared__ float aTile[kMaxHeadDim][kTile + 1];
    __shared__ float vTile[kMaxHeadDim][kTile + 1];
    __shared__ float vInverse[kTile];
    int64_t const b = blockIdx.z, h = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kTile;
    int64_t const start = visualStart[b];
    int const lane = threadIdx.x, warp = threadIdx.y;
    float const quarter = powf(static_cast<float>(dim), 0.25F);
    float const* mean = keyMean + (b * kvHeads + h) * dim;
    for (int t = warp; t < kTile; t += blockDim.y)
    {
        int64_t const i = i0 + t;
        float a2 = 0.0F, centred2 = 0.0F, v2 = 0.0F;
        if (i < visual)
        {
            int64_t const row = ((b * kvHeads + h) * tokens + start + i) * dim;
            for (int64_t e = lane; e < dim; e += 32)
            {
                float const a = toFloat(kRot[row + e]) / quarter, value = toFloat(v[row + e]);
                a2 += a * a;
                centred2 += (a - mean[e]) * (a - mean[e]);
                v2 += value * value;
                aTile[e][t] = a - mean[e];
                vTile[e][t] = value;
            }
        }
        for (int offset = 16; offset > 0; offset >>= 1)
        {
            a2 += __shfl_down_sync(0xFFFFFFFFU, a2, offset);
            centred2 += __shfl_down_sync(0xFFFFFFFFU, centred2, offset);
            v2 += __shfl_down_sync(0xFFFFFFFFU, v2, offset);
        }
        if (lane == 0 && i < visual)
        {
            float const vnorm = clampMin(sqrtf(v2), static_cast<float>(kEps));
            int64_t const at = (b * kvHeads + h) * visual + i;
            vInverse[t] = 1.0F / vnorm;
            sq[at] = centred2;
            logVnorm[at] = logf(vnorm);
            logW[at] = a2 + 2.0F * logf(vnorm);
        }
    }
    __syncthreads();
    // transposed write: consecutive threads take consecutive tokens
    int const flat = warp * 32 + lane, threads = blockDim.x * blockDim.y;
    for (int idx = flat; idx < kTile * dim; idx += threads)
    {
        int const e = idx / kTile, t = idx % kTile;
        int64_t const i = i0 + t;
        if (i < visual)
        {
            int64_t const at = ((b * kvHeads + h) * dim + e) * visual + i;
            featA[at] = aTile[e][t];
            featV[at] = vTile[e][t] * vInverse[t];
        }
    }
}

// logW[b, h, i] = ½ log_softmax over heads of the log self-similarities: the head weights of the update cosine.
__global__ void headWeightsKernel(float* logW, int64_t batch, int64_t kvHeads, int64_t visual)
{
    int64_t const idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= batch * visual)
    {
        return;
    }
    int64_t const b = idx / visual, i = idx % visual;
    float* self = logW + b * kvHeads * visual + i;
    float top = -INFINITY;
    for (int64_t h = 0; h < kvHeads; ++h)
    {
        top = fmaxf(top, self[h * visual]);
    }
    float total = 0.0F;
    for (int64_t h = 0; h < kvHeads; ++h)
    {
        total += expf(self[h * visual] - top);
    }
    float const logTotal = logf(total);
    for (int64_t h = 0; h < kvHeads; ++h)
    {
        self[h * visual] = 0.5F * (self[h * visual] - top - logTotal);
    }
}

// 1 / max(|hidden row|, eps) for each visual token: one warp per token.
template <typename T>
__global__ void inverseNormKernel(T const* hidden, int64_t const* visualStart, float* inverse, int64_t batch,
    int64_t tokens, int64_t width, int64_t visual)
{
    int64_t const token = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    int const lane = threadIdx.x & 31;
    // no early return: every lane of the block reaches the shuffles (HIP-CPU runs them as block barriers)
    bool const active = token < batch * visual;
    int64_t const b = active ? token / visual : 0, i = active ? token % visual : 0;
    float const sum = warpSquaredNorm(hidden + (b * tokens + visualStart[b] + i) * width, width, lane, active);
    if (active && lane == 0)
    {
        inverse[token] = 1.0F / clampMin(sqrtf(sum), static_cast<float>(kEps));
    }
}

// unit[b, e, i] = hidden[b, start + i, e] * inverse[b, i]: a 32x32 tiled transpose.
template <typename T>
__global__ void unitRowsKernel(T const* hidden, int64_t const* visualStart, float const* inverse, float* unit,
    int64_t tokens, int64_t width, int64_t visual)
{
    __shared__ float tile[32][33];
    int64_t const b = blockIdx.z, i0 = static_cast<int64_t>(blockIdx.x) * 32, e0 = static_cast<int64_t>(blockIdx.y) * 32;
    int64_t const start = visualStart[b];
    for (int y = threadIdx.y; y < 32; y += blockDim.y)
    {
        int64_t const i = i0 + y, e = e0 + threadIdx.x;
        tile[y][threadIdx.x] = (i < visual && e < width)
            ? toFloat(hidden[(b * tokens + start + i) * width + e]) * inverse[b * visual + i]
            : 0.0F;
    }
    __syncthreads();
    for (int y = threadIdx.y; y < 32; y += blockDim.y)
    {
        int64_t const e = e0 + y, i = i0 + threadIdx.x;
        if (i < visual && e < width)
        {
            unit[(b * width + e) * visual + i] = tile[threadIdx.x][y];
        }
    }
}

} // namespace vts
} // namespace iwp
