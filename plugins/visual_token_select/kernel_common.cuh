// The selection kernels' shared pieces: launch constants, the element types' widening, the ranking rule
// (rankable, orderKey, the MMR mix) and the fixed-order block reductions every stage uses.
#pragma once

#include "gpu.h"
#include "plan.h"
#include <cfloat>
#include <cmath>
#include <cstdint>

namespace iwp
{
namespace vts
{

// kMaxHeadDim (plan.h) bounds the shared-memory tiles; validation refuses larger heads.
constexpr int kSelectThreads = 1024; // one block per sample for selections
constexpr int kSimCols = 8;          // tokens compared per pass of the similarity kernels
constexpr int kSimDimChunk = 256;    // feature dims staged in shared memory at a time
constexpr int kColumnSlices = 16;    // row slices of the column means (then summed in order)
constexpr double kEps = 1e-12;

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

// max(x, floor) that keeps a NaN x, as std::max(x, floor) on the CPU and torch's clamp(min=floor) do; CUDA's
// fmaxf returns `floor` for a NaN and would turn a NaN norm or distance into a finite one.
__device__ __forceinline__ float clampMin(float x, float floor)
{
    return x < floor ? floor : x;
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

// Σ row[e]² over e < n, one warp per row: each lane sums its strided elements in order, then a fixed shuffle
// tree; lane 0 holds the total. Every lane must call it (no early return before the shuffles), so inactive
// lanes pass active = false and add nothing.
template <typename T>
__device__ float warpSquaredNorm(T const* row, int64_t n, int lane, bool active)
{
    float sum = 0.0F;
    for (int64_t e = lane; active && e < n; e += 32)
    {
        float const x = toFloat(row[e]);
        sum += x * x;
    }
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        sum += __shfl_down_sync(0xFFFFFFFFU, sum, offset);
    }
    return sum;
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

} // namespace vts
} // namespace iwp
