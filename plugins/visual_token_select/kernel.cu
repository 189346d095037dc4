// VisualTokenSelect on the GPU: every method of the reference (see kernel.h for the interface).
//
// The structure follows cpu.cpp, which follows the PyTorch reference:
//  * attention mass: logits as a tiled product of queries and keys, a log-sum-exp per query row, then one
//    thread per visual token sums the probabilities over heads and queries in a fixed order;
//  * PCMMR: the host walks the chunk schedule (it depends only on the attributes) and enqueues, per step, a
//    pool selection (one block per sample: radix select of the 2c best MMR scores), the similarities inside
//    the pool, the exact greedy over the pool, and the max-similarity update of every token against the c
//    tokens just added (spread over the whole GPU);
//  * top-K: a radix select of the K best scores (ties to the lower index) and an index-ordered compaction,
//    so the output is ascending without a sort.
// Every reduction has a fixed order, so results do not depend on scheduling. Float atomics are never used.
#include "kernel.h"

#include "gpu.h"
#include "plan.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace
{

using iwp::vts::btpLambda;
using iwp::vts::btpSeedCount;
using iwp::vts::chunkSchedule;
using iwp::vts::validate;

constexpr int kSelectThreads = 1024; // one block per sample for selections
constexpr int kSimCols = 8;          // tokens compared per pass of the similarity kernels
constexpr int kSimDimChunk = 256;    // feature dims staged in shared memory at a time
constexpr int kColumnSlices = 16;    // row slices of the column means (then summed in order)
using iwp::vts::kMaxHeadDim; // the shared-memory tiles' bound, which validation enforces
constexpr double kEps = 1e-12;

enum SimKind : int
{
    kSimUpdate = 0, // IWP's rank-1 update cosine (head-weighted RBF on centred keys times value cosine)
    kSimHidden = 1, // cosine of the visual hidden states
    kSimXy = 2,     // minus the squared grid distance (BTP's spatial seeds)
};

// ---------------------------------------------------------------------------------------------- helpers

__device__ __forceinline__ float toFloat(float x)
{
    return x;
}
__device__ __forceinline__ float toFloat(IwpHalf x)
{
    return __half2float(x);
}
__device__ __forceinline__ float toFloat(IwpBFloat16 x)
{
    return __bfloat162float(x);
}

// The ranking rule: NaN and -inf rank last (as the lowest finite float), +inf as the largest.
__device__ __forceinline__ float rankable(float x)
{
    if (isnan(x) || x == -INFINITY)
    {
        return -FLT_MAX;
    }
    return isinf(x) ? FLT_MAX : x;
}

// Order-preserving map of a float to uint32 (larger float, larger key); -0 and +0 share a key.
__device__ __forceinline__ uint32_t orderKey(float x)
{
    uint32_t const u = __float_as_uint(x == 0.0F ? 0.0F : x);
    return (u & 0x80000000U) ? ~u : (u | 0x80000000U);
}

// lam * mag - (1 - lam) * maxSim, rounded as the reference does (no contraction into an FMA).
__device__ __forceinline__ float mmrScore(float mag, float maxSim, bool hasSim, bool finite, float lam, float rest)
{
    float const score = hasSim ? __fsub_rn(__fmul_rn(lam, mag), __fmul_rn(rest, maxSim)) : mag;
    return finite ? rankable(score) : -FLT_MAX;
}

// Deterministic block reductions: a shuffle tree per warp, then warp 0 over the warp results in order.
template <typename T, typename Op>
__device__ T blockReduce(T value, Op op, T* shared)
{
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        value = op(value, __shfl_down_sync(0xFFFFFFFFU, value, offset));
    }
    __syncthreads(); // `shared` may still be read by a previous reduction
    if (lane == 0)
    {
        shared[warp] = value;
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        T v = shared[0];
        for (int w = 1; w < warps; ++w)
        {
            v = op(v, shared[w]);
        }
        shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

struct Sum
{
    template <typename T>
    __device__ T operator()(T a, T b) const
    {
        return a + b;
    }
};
struct Max
{
    template <typename T>
    __device__ T operator()(T a, T b) const
    {
        return a > b ? a : b; // NaN in b is dropped, as std::max(top, x) drops it on the CPU
    }
};

// Exclusive prefix sum over the block's threads (in thread order); `total` gets the block's sum.
__device__ int blockExclusiveScan(int value, int* shared, int& total)
{
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    int inclusive = value;
    for (int offset = 1; offset < 32; offset <<= 1)
    {
        int const up = __shfl_up_sync(0xFFFFFFFFU, inclusive, offset);
        inclusive += lane >= offset ? up : 0;
    }
    __syncthreads();
    if (lane == 31)
    {
        shared[warp] = inclusive;
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        int running = 0;
        for (int w = 0; w < warps; ++w)
        {
            int const t = shared[w];
            shared[w] = running;
            running += t;
        }
        shared[32] = running;
    }
    __syncthreads();
    total = shared[32];
    return shared[warp] + inclusive - value;
}

struct SelectShared
{
    int hist[256];
    int scan[33];
    int digit;
    int remaining;
};

// The m best of n keys (ties to the lower index), written to out[0..m) in ascending index order.
// Radix select finds the m-th largest key (the threshold); an index-ordered compaction then keeps every key
// above it and the lowest-indexed keys equal to it.
template <typename OutT>
__device__ void blockTopSorted(uint32_t const* keys, int n, int m, OutT* out, SelectShared& sh)
{
    uint32_t prefix = 0, mask = 0;
    int remaining = m;
    for (int shift = 24; shift >= 0; shift -= 8)
    {
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
        {
            sh.hist[i] = 0;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x)
        {
            uint32_t const u = keys[i];
            if ((u & mask) == prefix)
            {
                atomicAdd(&sh.hist[(u >> shift) & 255U], 1); // integer counts: order-independent
            }
        }
        __syncthreads();
        if (threadIdx.x == 0)
        {
            int above = 0, digit = 255;
            for (; digit > 0 && above + sh.hist[digit] < remaining; --digit)
            {
                above += sh.hist[digit];
            }
            sh.digit = digit;
            sh.remaining = remaining - above;
        }
        __syncthreads();
        prefix |= static_cast<uint32_t>(sh.digit) << shift;
        mask |= 255U << shift;
        remaining = sh.remaining;
        __syncthreads();
    }
    int const per = (n + blockDim.x - 1) / blockDim.x;
    int const lo = min(n, static_cast<int>(threadIdx.x) * per), hi = min(n, lo + per);
    int equal = 0;
    for (int i = lo; i < hi; ++i)
    {
        equal += keys[i] == prefix;
    }
    int total = 0;
    int rank = blockExclusiveScan(equal, sh.scan, total);
    int kept = 0;
    for (int i = lo, r = rank; i < hi; ++i)
    {
        uint32_t const u = keys[i];
        kept += u > prefix || (u == prefix && r < remaining);
        r += u == prefix;
    }
    int position = blockExclusiveScan(kept, sh.scan, total);
    for (int i = lo, r = rank; i < hi; ++i)
    {
        uint32_t const u = keys[i];
        if (u > prefix || (u == prefix && r < remaining))
        {
            out[position++] = static_cast<OutT>(i);
        }
        r += u == prefix;
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------- attention mass

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

// ------------------------------------------------------------------------------------------ token features

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
            float const vnorm = fmaxf(sqrtf(v2), static_cast<float>(kEps));
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
    T const* row = hidden + (b * tokens + visualStart[b] + i) * width;
    float sum = 0.0F;
    for (int64_t e = lane; active && e < width; e += 32)
    {
        float const x = toFloat(row[e]);
        sum += x * x;
    }
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        sum += __shfl_down_sync(0xFFFFFFFFU, sum, offset);
    }
    if (active && lane == 0)
    {
        inverse[token] = 1.0F / fmaxf(sqrtf(sum), static_cast<float>(kEps));
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

// -------------------------------------------------------------------------------------------- similarity

// Where a similarity kind finds its per-token data (all feature-major, per sample contiguous).
struct SimData
{
    int kind;
    int64_t heads, dim, visual;
    float const* featA; // update: centred scaled keys [B,H,d,N]; hidden: unit rows [B,D,N]
    float const* featV; // update: unit values [B,H,d,N]
    float const* sq;    // update [B,H,N]
    float const* logW;  // update [B,H,N]
    float const* xy;    // xy: visual_xy [B,N,2]
};

// sim(row, col) for rows given by `rows` ([B, nRows] int32, or identity when null) against cols
// ([B, colStride] int32 at colOffset, nCols of them). Each thread owns one row token; kSimCols column tokens
// at a time are staged in shared memory. A NaN similarity counts as 0, as in the reference.
// Mode 0: out[b * outStride + row * nCols + col] = sim. Mode 1: out[b, row] = max(out[b, row], max over cols of sim).
template <int Mode>
__global__ void similarityKernel(SimData sim, int32_t const* rows, int64_t nRows, int64_t rowStride,
    int32_t const* cols, int64_t colOffset, int64_t nCols, int64_t colStride, float* out, int64_t outStride)
{
    __shared__ float colA[kSimCols][kSimDimChunk];
    __shared__ float colV[kSimCols][kSimDimChunk];
    __shared__ int32_t colToken[kSimCols];
    int64_t const b = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    bool const active = p < nRows;
    int64_t const n = sim.visual;
    int64_t const token = active ? (rows ? rows[b * rowStride + p] : p) : 0;
    float best = -INFINITY;
    for (int64_t c0 = 0; c0 < nCols; c0 += kSimCols)
    {
        int const count = static_cast<int>(min(static_cast<int64_t>(kSimCols), nCols - c0));
        __syncthreads();
        if (threadIdx.x < kSimCols)
        {
            colToken[threadIdx.x] = threadIdx.x < count ? cols[b * colStride + colOffset + c0 + threadIdx.x] : 0;
        }
        __syncthreads();
        float total[kSimCols];
#pragma unroll
        for (int c = 0; c < kSimCols; ++c)
        {
            total[c] = 0.0F;
        }
        if (sim.kind == kSimXy)
        {
            float const* xy = sim.xy + b * n * 2;
#pragma unroll
            for (int c = 0; c < kSimCols; ++c)
            {
                // minus the squared distance in fp32 step by step, as the reference: grid ties stay exact
                float const dy = __fsub_rn(xy[2 * token], xy[2 * colToken[c]]);
                float const dx = __fsub_rn(xy[2 * token + 1], xy[2 * colToken[c] + 1]);
                total[c] = -__fadd_rn(__fmul_rn(dy, dy), __fmul_rn(dx, dx));
            }
        }
        else
        {
            int64_t const heads = sim.kind == kSimUpdate ? sim.heads : 1;
            for (int64_t h = 0; h < heads; ++h)
            {
                float dotA[kSimCols], dotV[kSimCols];
#pragma unroll
                for (int c = 0; c < kSimCols; ++c)
                {
                    dotA[c] = 0.0F;
                    dotV[c] = 0.0F;
                }
                float const* planeA = sim.featA + (b * heads + h) * sim.dim * n;
                float const* planeV = sim.kind == kSimUpdate ? sim.featV + (b * heads + h) * sim.dim * n : nullptr;
                for (int64_t e0 = 0; e0 < sim.dim; e0 += kSimDimChunk)
                {
                    int const dims = static_cast<int>(min(static_cast<int64_t>(kSimDimChunk), sim.dim - e0));
                    __syncthreads();
                    for (int idx = threadIdx.x; idx < kSimCols * dims; idx += blockDim.x)
                    {
                        int const c = idx / dims, e = idx % dims;
                        colA[c][e] = planeA[(e0 + e) * n + colToken[c]];
                        colV[c][e] = planeV ? planeV[(e0 + e) * n + colToken[c]] : 0.0F;
                    }
                    __syncthreads();
                    if (active)
                    {
                        for (int e = 0; e < dims; ++e)
                        {
                            float const a = planeA[(e0 + e) * n + token];
                            float const value = planeV ? planeV[(e0 + e) * n + token] : 0.0F;
#pragma unroll
                            for (int c = 0; c < kSimCols; ++c)
                            {
                                dotA[c] = fmaf(a, colA[c][e], dotA[c]);
                                dotV[c] = fmaf(value, colV[c][e], dotV[c]);
                            }
                        }
                    }
                }
                if (sim.kind == kSimHidden)
                {
#pragma unroll
                    for (int c = 0; c < kSimCols; ++c)
                    {
                        total[c] = dotA[c];
                    }
                }
                else if (active)
                {
                    int64_t const base = (b * heads + h) * n;
#pragma unroll
                    for (int c = 0; c < kSimCols; ++c)
                    {
                        int32_t const other = colToken[c];
                        float const dist2
                            = token == other ? 0.0F : fmaxf(0.0F, sim.sq[base + token] + sim.sq[base + other] - 2.0F * dotA[c]);
                        total[c] += dotV[c] * expf(-0.5F * dist2 + sim.logW[base + token] + sim.logW[base + other]);
                    }
                }
            }
        }
        if (active)
        {
            for (int c = 0; c < count; ++c)
            {
                float const s = isnan(total[c]) ? 0.0F : total[c];
                if (Mode == 0)
                {
                    out[b * outStride + p * nCols + c0 + c] = s;
                }
                best = fmaxf(best, s);
            }
        }
    }
    if (Mode == 1 && active)
    {
        float* slot = out + b * n + token;
        *slot = fmaxf(*slot, best);
    }
}

// ------------------------------------------------------------------------------------------------- PCMMR

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
    float top = 0.0F;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        float const x = raw[b * visual + i];
        top = isfinite(x) ? fmaxf(top, x) : top;
    }
    top = fmaxf(blockReduce(top, Max(), shared), FLT_MIN);
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        float const x = raw[b * visual + i];
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

// ------------------------------------------------------------------------------------ scores and top-K

// out[b, 0..keep) = the keep best of scores[b] (rankable), ascending by index.
template <typename OutT>
__global__ void __launch_bounds__(kSelectThreads) topSortedKernel(float const* scores, uint32_t* keys, OutT* out, int64_t visual, int64_t keep)
{
    __shared__ SelectShared sh;
    int64_t const b = blockIdx.x;
    for (int64_t i = threadIdx.x; i < visual; i += blockDim.x)
    {
        keys[b * visual + i] = orderKey(rankable(scores[b * visual + i]));
    }
    __syncthreads();
    blockTopSorted(keys + b * visual, static_cast<int>(visual), static_cast<int>(keep), out + b * keep, sh);
}

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
        T const* row = k + ((b * kvHeads + g) * tokens + visualStart[b] + i) * dim;
        float sum = 0.0F;
        for (int64_t e = lane; active && e < dim; e += 32)
        {
            float const x = toFloat(row[e]);
            sum += x * x;
        }
        for (int offset = 16; offset > 0; offset >>= 1)
        {
            sum += __shfl_down_sync(0xFFFFFFFFU, sum, offset);
        }
        total += sqrtf(sum);
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
    auto logA = [&](int64_t i) { return logf(fmaxf(row[i], 1e-30F)); };
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

// --------------------------------------------------------------------------------------- host: planning

int64_t blocksFor(int64_t work, int64_t threads)
{
    return (work + threads - 1) / threads;
}

// The largest pool any PCMMR run of this method uses (2c capped by the tokens left).
int64_t maxPool(IwpVtsParams const& p)
{
    auto poolOf = [&](int64_t keep, int64_t chunk, double growth, int64_t seeded) {
        int64_t best = 1, done = seeded;
        for (int64_t c : chunkSchedule(keep - seeded, chunk, growth))
        {
            best = std::max(best, std::min(2 * c, p.visual - done));
            done += c;
        }
        return best;
    };
    switch (p.method)
    {
    case kIwpVtsIwp: return poolOf(p.keep, p.chunk, p.growth, 0);
    case kIwpVtsDivPrune: return 2;
    case kIwpVtsBtp: return std::max<int64_t>(2, poolOf(p.keep, p.chunk, p.growth, btpSeedCount(p)));
    default: return 1;
    }
}

int64_t queryRows(IwpVtsParams const& p)
{
    bool const last = p.method == kIwpVtsFastV || (p.method == kIwpVtsIwp && p.queriesLast);
    return last ? 1 : p.queries;
}

bool usesAttention(IwpVtsParams const& p)
{
    return p.method == kIwpVtsIwp || p.method == kIwpVtsFastV || p.method == kIwpVtsTransPrune || p.method == kIwpVtsBtp;
}

bool usesHidden(IwpVtsParams const& p)
{
    return p.method == kIwpVtsDart || p.method == kIwpVtsDivPrune || p.method == kIwpVtsBtp;
}

bool usesPcmmr(IwpVtsParams const& p)
{
    return p.method == kIwpVtsIwp || p.method == kIwpVtsDivPrune || p.method == kIwpVtsBtp;
}

// Byte offsets of every scratch buffer in the workspace; absent buffers have size 0.
struct Layout
{
    size_t logits, lse, scoreA, scoreB, keys, mag, finite, taken, maxSim, chosen, cand, intra, aux;
    size_t featA, featV, sq, logW, logVnorm, partial, mean, inverse, unit;
    size_t total;

    explicit Layout(IwpVtsParams const& p)
    {
        size_t offset = 0;
        auto take = [&](size_t bytes) {
            size_t const at = offset;
            offset += (bytes + 255) / 256 * 256;
            return at;
        };
        int64_t const b = p.batch, n = p.visual, rows = queryRows(p);
        int64_t const attention = usesAttention(p) ? 1 : 0, hidden = usesHidden(p) ? 1 : 0;
        int64_t const pcmmr = usesPcmmr(p) ? 1 : 0, update = p.method == kIwpVtsIwp ? 1 : 0;
        int64_t const pool = maxPool(p);
        logits = take(sizeof(float) * attention * b * p.queryHeads * rows * p.tokens);
        lse = take(sizeof(float) * attention * b * p.queryHeads * rows);
        scoreA = take(sizeof(float) * b * n);
        scoreB = take(sizeof(float) * b * n);
        keys = take(sizeof(uint32_t) * b * n);
        mag = take(sizeof(float) * pcmmr * b * n);
        finite = take(pcmmr * b * n);
        taken = take(pcmmr * b * n);
        maxSim = take(sizeof(float) * pcmmr * b * n);
        chosen = take(sizeof(int32_t) * b * p.keep);
        cand = take(sizeof(int32_t) * b * pool);
        intra = take(sizeof(float) * pcmmr * b * pool * pool);
        aux = take(sizeof(int32_t) * b * p.keep); // DART's pivots, BTP's seeds
        featA = take(sizeof(float) * update * b * p.kvHeads * p.headDim * n);
        featV = take(sizeof(float) * update * b * p.kvHeads * p.headDim * n);
        sq = take(sizeof(float) * update * b * p.kvHeads * n);
        logW = take(sizeof(float) * update * b * p.kvHeads * n);
        logVnorm = take(sizeof(float) * update * b * p.kvHeads * n);
        int64_t const meanCols = std::max(update * p.kvHeads * p.headDim, hidden * p.width);
        partial = take(sizeof(float) * b * kColumnSlices * meanCols);
        mean = take(sizeof(float) * b * meanCols);
        inverse = take(sizeof(float) * hidden * b * n);
        unit = take(sizeof(float) * hidden * b * p.width * n);
        total = offset;
    }
};

template <typename T>
T* at(void* workspace, size_t offset)
{
    return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

// ----------------------------------------------------------------------------------- host: enqueueing

template <typename T>
class Run
{
public:
    Run(IwpVtsParams const& p, void const* const* inputs, void* workspace, cudaStream_t stream)
        : p(p)
        , layout(p)
        , ws(workspace)
        , stream(stream)
        , hidden(static_cast<T const*>(inputs[kIwpVtsHidden]))
        , q(static_cast<T const*>(inputs[kIwpVtsQ]))
        , k(static_cast<T const*>(inputs[kIwpVtsK]))
        , qRot(static_cast<T const*>(inputs[kIwpVtsQRot]))
        , kRot(static_cast<T const*>(inputs[kIwpVtsKRot]))
        , v(static_cast<T const*>(inputs[kIwpVtsV]))
        , keyMask(static_cast<int32_t const*>(inputs[kIwpVtsKeyMask]))
        , visualStart(static_cast<int64_t const*>(inputs[kIwpVtsVisualStart]))
        , queryIdx(static_cast<int64_t const*>(inputs[kIwpVtsQueryIdx]))
        , queryMask(static_cast<int32_t const*>(inputs[kIwpVtsQueryMask]))
        , lastIdx(static_cast<int64_t const*>(inputs[kIwpVtsLastIdx]))
        , visualXy(static_cast<float const*>(inputs[kIwpVtsVisualXy]))
        , ttv(static_cast<float const*>(inputs[kIwpVtsTtv]))
    {
    }

    void select(int64_t* out)
    {
        int64_t const n = p.visual, bn = p.batch * n;
        float* scoreA = at<float>(ws, layout.scoreA);
        float* scoreB = at<float>(ws, layout.scoreB);
        switch (p.method)
        {
        case kIwpVtsIwp:
        {
            updateFeatures();
            bool const last = p.queriesLast != 0;
            attentionMass(q, k, last, at<float>(ws, layout.logVnorm), scoreA);
            SimData const sim{kSimUpdate, p.kvHeads, p.headDim, n, at<float>(ws, layout.featA),
                at<float>(ws, layout.featV), at<float>(ws, layout.sq), at<float>(ws, layout.logW), nullptr};
            pcmmr(scoreA, sim, p.keep, p.lam, p.chunk, p.growth, nullptr, 0, out, nullptr);
            break;
        }
        case kIwpVtsFastV:
            attentionMass(qRot, kRot, true, nullptr, scoreA);
            topSorted(scoreA, p.keep, out);
            break;
        case kIwpVtsRandom:
            IWP_LAUNCH(hashScoreKernel, blocksFor(bn, 256), 256, 0, stream, scoreA, p.batch, n, p.seed);
            topSorted(scoreA, p.keep, out);
            break;
        case kIwpVtsDart:
        {
            int64_t const nPivots = std::min(p.pivots, p.keep);
            int32_t* pivots = at<int32_t>(ws, layout.aux);
            IWP_LAUNCH(keyNormKernel<T>, blocksFor(bn * 32, 256), 256, 0, stream, k, visualStart, scoreA, p.batch, p.kvHeads,
                p.tokens, p.headDim, n);
            IWP_LAUNCH(topSortedKernel<int32_t>, p.batch, kSelectThreads, 0, stream, scoreA, at<uint32_t>(ws, layout.keys),
                pivots, n, nPivots);
            unitRows();
            IWP_LAUNCH(dartScoreKernel, blocksFor(bn, 256), 256, 0, stream, at<float>(ws, layout.unit), pivots, nPivots,
                scoreB, p.batch, p.width, n);
            topSorted(scoreB, p.keep, out);
            break;
        }
        case kIwpVtsDivPrune:
        {
            unitRows();
            columnMean(hidden, 1, p.tokens, p.width, 1.0F);
            IWP_LAUNCH(atypicalKernel, blocksFor(bn, 256), 256, 0, stream, at<float>(ws, layout.unit),
                at<float>(ws, layout.mean), scoreA, p.batch, p.width, n);
            pcmmr(scoreA, hiddenSim(), p.keep, 0.0, 1, 1.0, nullptr, 0, out, nullptr);
            break;
        }
        case kIwpVtsTransPrune:
        {
            attentionMass(qRot, kRot, false, nullptr, scoreA);
            IWP_LAUNCH(sumNormalizeKernel, p.batch, 256, 0, stream, scoreA, scoreA, n);
            IWP_LAUNCH(sumNormalizeKernel, p.batch, 256, 0, stream, ttv, scoreB, n);
            IWP_LAUNCH(mixKernel, blocksFor(bn, 256), 256, 0, stream, scoreB, scoreA, scoreA, bn, static_cast<float>(p.alpha),
                static_cast<float>(1.0 - p.alpha));
            topSorted(scoreA, p.keep, out);
            break;
        }
        case kIwpVtsBtp:
        {
            attentionMass(qRot, kRot, false, nullptr, scoreA);
            if (p.rebalance)
            {
                IWP_LAUNCH(rebalanceKernel, p.batch, 256, 0, stream, scoreA, n); // ends rankable
            }
            else
            {
                IWP_LAUNCH(rankableKernel, blocksFor(bn, 256), 256, 0, stream, scoreA, bn);
            }
            int64_t const nSeed = btpSeedCount(p);
            int32_t* seed = at<int32_t>(ws, layout.aux);
            SimData const xy{kSimXy, 1, 2, n, nullptr, nullptr, nullptr, nullptr, visualXy};
            if (nSeed == p.keep)
            {
                pcmmr(scoreA, xy, nSeed, 0.0, 1, 1.0, nullptr, 0, out, nullptr);
                break;
            }
            pcmmr(scoreA, xy, nSeed, 0.0, 1, 1.0, nullptr, 0, nullptr, seed);
            unitRows();
            pcmmr(scoreA, hiddenSim(), p.keep, btpLambda(p), p.chunk, p.growth, seed, nSeed, out, nullptr);
            break;
        }
        default: break;
        }
    }

private:
    SimData hiddenSim() const
    {
        return SimData{kSimHidden, 1, p.width, p.visual, at<float>(ws, layout.unit), nullptr, nullptr, nullptr, nullptr};
    }

    // Column means of the visual rows: key means per (sample, KV head) or hidden means per sample.
    void columnMean(T const* matrices, int64_t perSample, int64_t rows, int64_t cols, float scale)
    {
        int64_t const m = p.batch * perSample;
        float* partial = at<float>(ws, layout.partial);
        dim3 const grid(static_cast<unsigned>(m), static_cast<unsigned>(blocksFor(cols, 32)), kColumnSlices);
        IWP_LAUNCH(columnSumKernel<T>, grid, dim3(32, 8), 0, stream, matrices, visualStart, partial, perSample, rows, cols,
            p.visual);
        IWP_LAUNCH(columnMeanKernel, blocksFor(m * cols, 256), 256, 0, stream, partial, at<float>(ws, layout.mean), m, cols,
            p.visual, scale);
    }

    void updateFeatures()
    {
        int64_t const n = p.visual;
        float const quarter = std::pow(static_cast<float>(p.headDim), 0.25F);
        columnMean(kRot, p.kvHeads, p.tokens, p.headDim, 1.0F / quarter);
        dim3 const grid(static_cast<unsigned>(blocksFor(n, 16)), static_cast<unsigned>(p.kvHeads),
            static_cast<unsigned>(p.batch));
        IWP_LAUNCH(updateFeaturesKernel<T>, grid, dim3(32, 8), 0, stream, kRot, v, visualStart, at<float>(ws, layout.mean),
            at<float>(ws, layout.featA), at<float>(ws, layout.featV), at<float>(ws, layout.sq),
            at<float>(ws, layout.logW), at<float>(ws, layout.logVnorm), p.kvHeads, p.tokens, p.headDim, n);
        IWP_LAUNCH(headWeightsKernel, blocksFor(p.batch * n, 256), 256, 0, stream, at<float>(ws, layout.logW), p.batch,
            p.kvHeads, n);
    }

    void unitRows()
    {
        int64_t const n = p.visual;
        float* inverse = at<float>(ws, layout.inverse);
        IWP_LAUNCH(inverseNormKernel<T>, blocksFor(p.batch * n * 32, 256), 256, 0, stream, hidden, visualStart, inverse,
            p.batch, p.tokens, p.width, n);
        dim3 const grid(static_cast<unsigned>(blocksFor(n, 32)), static_cast<unsigned>(blocksFor(p.width, 32)),
            static_cast<unsigned>(p.batch));
        IWP_LAUNCH(unitRowsKernel<T>, grid, dim3(32, 8), 0, stream, hidden, visualStart, inverse, at<float>(ws, layout.unit),
            p.tokens, p.width, n);
    }

    void attentionMass(T const* queries, T const* keys, bool last, float const* logVnorm, float* out)
    {
        QuerySet const set = last ? QuerySet{lastIdx, nullptr, 1} : QuerySet{queryIdx, queryMask, p.queries};
        float* logits = at<float>(ws, layout.logits);
        float* lse = at<float>(ws, layout.lse);
        dim3 const grid(static_cast<unsigned>(blocksFor(p.tokens, 128)), static_cast<unsigned>(p.queryHeads),
            static_cast<unsigned>(p.batch));
        // rows staged per pass: one for the last token, else 8 or 16 (a pointer: the name has a comma)
        auto const logitsKernel = set.count == 1 ? attentionLogitsKernel<T, 1>
            : set.count <= 8                     ? attentionLogitsKernel<T, 8>
                                                 : attentionLogitsKernel<T, 16>;
        IWP_LAUNCH(logitsKernel, grid, 128, 0, stream, queries, keys, keyMask, set, logits, p.queryHeads, p.kvHeads,
            p.tokens, p.headDim);
        IWP_LAUNCH(rowLogSumExpKernel, static_cast<unsigned>(p.batch * p.queryHeads * set.count), 256, 0, stream, logits, lse,
            p.tokens);
        dim3 const massGrid(static_cast<unsigned>(blocksFor(p.visual, 256)), static_cast<unsigned>(p.batch));
        IWP_LAUNCH(attentionMassKernel, massGrid, 256, 0, stream, logits, lse, set, visualStart, logVnorm, out, p.queryHeads,
            p.kvHeads, p.tokens, p.visual);
    }

    void topSorted(float const* scores, int64_t keep, int64_t* out)
    {
        IWP_LAUNCH(topSortedKernel<int64_t>, p.batch, kSelectThreads, 0, stream, scores, at<uint32_t>(ws, layout.keys), out,
            p.visual, keep);
    }

    // PCMMR of `raw` under similarity `sim`, with an optional seed taken as the first chunk. The result goes
    // to `out` (int64) or `out32` (int32), ascending.
    void pcmmr(float const* raw, SimData const& sim, int64_t keep, double lam, int64_t chunk, double growth,
        int32_t const* seed, int64_t seeded, int64_t* out, int32_t* out32)
    {
        int64_t const n = p.visual, pool = maxPool(p);
        if (lam == 1.0 && seed == nullptr)
        {
            if (out)
            {
                topSorted(raw, keep, out);
            }
            else
            {
                IWP_LAUNCH(topSortedKernel<int32_t>, p.batch, kSelectThreads, 0, stream, raw, at<uint32_t>(ws, layout.keys),
                    out32, n, keep);
            }
            return;
        }
        PcmmrState const st{at<float>(ws, layout.mag), at<uint8_t>(ws, layout.finite), at<uint8_t>(ws, layout.taken),
            at<float>(ws, layout.maxSim), at<uint32_t>(ws, layout.keys), at<int32_t>(ws, layout.chosen),
            at<int32_t>(ws, layout.cand), at<float>(ws, layout.intra)};
        float const lamF = static_cast<float>(lam), rest = static_cast<float>(1.0 - lam);
        IWP_LAUNCH(pcmmrInitKernel, p.batch, 256, 0, stream, raw, st, n);
        int64_t done = 0;
        dim3 const rowGrid(static_cast<unsigned>(blocksFor(n, 128)), static_cast<unsigned>(p.batch));
        if (seed)
        {
            IWP_LAUNCH(pcmmrSeedKernel, p.batch, 256, 0, stream, seed, seeded, st, keep, n);
            IWP_LAUNCH(similarityKernel<1>, rowGrid, 128, 0, stream, sim, nullptr, n, 0, st.chosen, 0, seeded, keep, st.maxSim, 0);
            done = seeded;
        }
        for (int64_t c : chunkSchedule(keep - seeded, chunk, growth))
        {
            bool const hasSim = done > 0;
            int64_t const poolSize = std::min(2 * c, n - done);
            IWP_LAUNCH(pcmmrPoolKernel, p.batch, kSelectThreads, 0, stream, st, n, poolSize, pool, hasSim, lamF, rest);
            dim3 const poolGrid(static_cast<unsigned>(blocksFor(poolSize, 128)), static_cast<unsigned>(p.batch));
            IWP_LAUNCH(similarityKernel<0>, poolGrid, 128, 0, stream, sim, st.cand, poolSize, pool, st.cand, 0, poolSize, pool,
                st.intra, pool * pool);
            size_t const shared = poolSize * (sizeof(float) + 1);
            IWP_LAUNCH(pcmmrGreedyKernel, p.batch, 256, shared, stream, st, n, keep, poolSize, pool, c, done, hasSim, lamF, rest);
            IWP_LAUNCH(similarityKernel<1>, rowGrid, 128, 0, stream, sim, nullptr, n, 0, st.chosen, done, c, keep, st.maxSim, 0);
            done += c;
        }
        if (out)
        {
            IWP_LAUNCH(takenToIndicesKernel<int64_t>, p.batch, kSelectThreads, 0, stream, st.taken, out, n, keep);
        }
        else
        {
            IWP_LAUNCH(takenToIndicesKernel<int32_t>, p.batch, kSelectThreads, 0, stream, st.taken, out32, n, keep);
        }
    }

    IwpVtsParams const& p;
    Layout const layout;
    void* ws;
    cudaStream_t stream;
    T const *hidden, *q, *k, *qRot, *kRot, *v;
    int32_t const* keyMask;
    int64_t const* visualStart;
    int64_t const* queryIdx;
    int32_t const* queryMask;
    int64_t const* lastIdx;
    float const* visualXy;
    float const* ttv;
};

} // namespace

extern "C"
{

int32_t iwpVtsAbiVersion()
{
    return IWP_VTS_ABI_VERSION;
}

size_t iwpVtsParamsSize()
{
    return sizeof(IwpVtsParams);
}

int32_t iwpVtsMethodId(char const* name)
{
    return iwp::vts::methodId(name);
}

int32_t iwpVtsValidate(IwpVtsParams const* params, char* message, size_t capacity)
{
    std::string const error = params == nullptr ? std::string("no parameters") : validate(*params);
    if (message != nullptr && capacity > 0)
    {
        std::snprintf(message, capacity, "%s", error.c_str());
    }
    return error.empty() ? 0 : 1;
}

size_t iwpVtsWorkspaceSize(IwpVtsParams const* params)
{
    return params == nullptr || !validate(*params).empty() ? 0 : Layout(*params).total;
}

int32_t iwpVtsEnqueue(IwpVtsParams const* params, void const* const* inputs, int64_t* indices, void* workspace,
    void* stream)
{
    if (params == nullptr || !validate(*params).empty())
    {
        return -1;
    }
    auto const s = iwpStream(stream);
    switch (params->dtype)
    {
    case kIwpVtsFloat32: Run<float>(*params, inputs, workspace, s).select(indices); break;
    case kIwpVtsFloat16: Run<IwpHalf>(*params, inputs, workspace, s).select(indices); break;
    case kIwpVtsBFloat16: Run<IwpBFloat16>(*params, inputs, workspace, s).select(indices); break;
    default: return -1;
    }
    return static_cast<int32_t>(cudaGetLastError());
}

#if defined(IWP_HIP_CPU)
int32_t iwpVtsCpuSynchronize()
{
    return static_cast<int32_t>(hipStreamSynchronize(iwp::gpu::ownStream()));
}
#endif

} // extern "C"
