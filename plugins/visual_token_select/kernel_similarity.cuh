// Similarities between visual tokens (IWP's update cosine, the hidden-state cosine, BTP's grid distance):
// a block of row tokens against a few column tokens staged in shared memory, written out or max-reduced.
#pragma once

#include "kernel_common.cuh"

namespace iwp
{
namespace vts
{

enum SimKind : int
{
    kSimUpdate = 0, // IWP's rank-1 update cosine (head-weighted RBF on centred keys times value cosine)
    kSimHidden = 1, // cosine of the visual hidden states
    kSimXy = 2,     // minus the squared grid distance (BTP's spatial seeds)
};

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
                            = token == other ? 0.0F : clampMin(sim.sq[base + token] + sim.sq[base + other] - 2.0F * dotA[c], 0.0F);
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

} // namespace vts
} // namespace iwp
