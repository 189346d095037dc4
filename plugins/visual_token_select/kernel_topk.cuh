// Top-K: a radix select of the m best 32-bit keys (ties to the lower index) and an index-ordered
// compaction, so the output is ascending without a sort.
#pragma once

#include "kernel_common.cuh"

namespace iwp
{
namespace vts
{

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

} // namespace vts
} // namespace iwp
