// Attention mass: the logits of the query rows against every key (a tiled product, keys staged transposed),
// a log-sum-exp per row, then one thread per visual token sums the probabilities over heads and queries in
// a fixed order (IWP's magnitude when the log value norms are added).
#pragma once

#include "kernel_common.cuh"

namespace iwp
{
namespace vts
{

// The query rows of a selection: the instruction tokens (query_idx, query_mask) or the last token.
struct QuerySet
{
    int64_t const* index; // [B, count]
    int32_t const* valid; // [B, count], or null when every row is valid
    int64_t count;

    __device__ int64_t position(int64_t b, int64_t r) const
    {
        return index[b * count + r];
    }
    __device__ bool ok(int64_t b, int64_t r) const
    {
        return valid == nullptr || valid[b * count + r] != 0;
    }
};

// logits[b, h, r, j] = q[b, h, pos_r] . k[b, g(h), j] / sqrt(d), or -inf where j is not visible to row r
// (after it, padding, or r invalid). A block takes 128 keys of one head and `Rows` query rows at a time;
// keys are staged transposed in shared memory so every load is coalesced.
template <typename T, int Rows>
__global__ void attentionLogitsKernel(T const* q, T const* k, int32_t const* keyMask, QuerySet queries,
    float* logits, int64_t queryHeads, int64_t kvHeads, int64_t tokens, int64_t dim)
{
    constexpr int kKeys = 128, kDims = 32;
    __shared__ float keyTile[kDims][kKeys + 1];
    __shared__ float queryTile[Rows][kMaxHeadDim];
    int64_t const b = blockIdx.z, h = blockIdx.y, g = h / (queryHeads / kvHeads);
    int64_t const j0 = static_cast<int64_t>(blockIdx.x) * kKeys, j = j0 + threadIdx.x;
    float const scale = 1.0F / sqrtf(static_cast<float>(dim));
    T const* keys = k + (b * kvHeads + g) * tokens * dim;
    for (int64_t r0 = 0; r0 < queries.count; r0 += Rows)
    {
        int const rows = static_cast<int>(min(static_cast<int64_t>(Rows), queries.count - r0));
        __syncthreads();
        for (int idx = threadIdx.x; idx < Rows * dim; idx += blockDim.x)
        {
            int const r = idx / static_cast<int>(dim), e = idx % static_cast<int>(dim);
            float value = 0.0F;
            if (r < rows && queries.ok(b, r0 + r))
            {
                value = toFloat(q[((b * queryHeads + h) * tokens + queries.position(b, r0 + r)) * dim + e]);
            }
            queryTile[r][e] = value;
        }
        float acc[Rows];
#pragma unroll
        for (int r = 0; r < Rows; ++r)
        {
            acc[r] = 0.0F;
        }
        for (int64_t e0 = 0; e0 < dim; e0 += kDims)
        {
            __syncthreads();
            for (int idx = threadIdx.x; idx < kKeys * kDims; idx += blockDim.x)
            {
                int const jj = idx / kDims, ee = idx % kDims;
                int64_t const jt = j0 + jj, e = e0 + ee;
                keyTile[ee][jj] = (jt < tokens && e < dim) ? toFloat(keys[jt * dim + e]) : 0.0F;
            }
            __syncthreads();
            int const dims = static_cast<int>(min(static_cast<int64_t>(kDims), dim - e0));
            for (int ee = 0; ee < dims; ++ee)
            {
                float const key = keyTile[ee][threadIdx.x];
#pragma unroll
                for (int r = 0; r < Rows; ++r)
                {
                    acc[r] = fmaf(queryTile[r][e0 + ee], key, acc[r]);
                }
            }
        }
        if (j < tokens)
        {
            bool const keyOk = keyMask[b * tokens + j] != 0;
            for (int r = 0; r < rows; ++r)
            {
                int64_t const row = r0 + r;
                bool const visible = keyOk && queries.ok(b, row) && j <= queries.position(b, row);
                logits[((b * queryHeads + h) * queries.count + row) * tokens + j] = visible ? acc[r] * scale : -INFINITY;
            }
        }
    }
}

// lse[row] = log sum_j exp(logits[row, j]); NaN if any logit is NaN (then the whole row's probabilities are).
__global__ void rowLogSumExpKernel(float const* logits, float* lse, int64_t tokens)
{
    __shared__ float shared[32];
    __shared__ int flag[32];
    float const* row = logits + static_cast<int64_t>(blockIdx.x) * tokens;
    float top = -INFINITY;
    int nan = 0;
    for (int64_t j = threadIdx.x; j < tokens; j += blockDim.x)
    {
        float const x = row[j];
        nan |= isnan(x);
        top = x > top ? x : top;
    }
    top = blockReduce(top, Max(), shared);
    nan = blockReduce(nan, Max(), flag);
    float total = 0.0F;
    for (int64_t j = threadIdx.x; j < tokens; j += blockDim.x)
    {
        total += expf(row[j] - top);
    }
    total = blockReduce(total, Sum(), shared);
    if (threadIdx.x == 0)
    {
        lse[blockIdx.x] = nan ? NAN : top + logf(total);
    }
}

// mass[b, i] = mean over query heads and valid query rows of exp(logit - lse + logVnorm[g, i]): IWP's
// magnitude when logVnorm is given, plain attention mass otherwise. One thread per visual token.
__global__ void attentionMassKernel(float const* logits, float const* lse, QuerySet queries,
    int64_t const* visualStart, float const* logVnorm, float* mass, int64_t queryHeads, int64_t kvHeads,
    int64_t tokens, int64_t visual)
{
    int64_t const b = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= visual)
    {
        return;
    }
    int64_t const column = visualStart[b] + i, groups = queryHeads / kvHeads;
    int64_t valid = 0;
    for (int64_t r = 0; r < queries.count; ++r)
    {
        valid += queries.ok(b, r);
    }
    float sum = 0.0F;
    for (int64_t h = 0; h < queryHeads; ++h)
    {
        float const bonus = logVnorm ? logVnorm[(b * kvHeads + h / groups) * visual + i] : 0.0F;
        for (int64_t r = 0; r < queries.count; ++r)
        {
            if (!queries.ok(b, r))
            {
                continue;
            }
            int64_t const row = (b * queryHeads + h) * queries.count + r;
            sum += expf(logits[row * tokens + column] - lse[row] + bonus);
        }
    }
    mass[b * visual + i] = sum / fmaxf(1.0F, static_cast<float>(valid * queryHeads));
}

} // namespace vts
} // namespace iwp
