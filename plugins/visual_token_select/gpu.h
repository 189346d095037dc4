// The few CUDA names the selection kernels use, for two targets: nvcc (plain CUDA, this header adds nothing
// but IWP_LAUNCH and the element types) and HIP-CPU (IWP_HIP_CPU defined: the kernels run on the host's
// threads through github.com/ROCm/HIP-CPU, found at HIP_CPU_ROOT, so the parity tests execute them without a
// GPU). Only the names the kernels need are mapped; a new intrinsic in a kernel fails the CPU build first.
#pragma once

#include <cstdint>

#if defined(IWP_HIP_CPU)

#include <hip/hip_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

// __launch_bounds__, __forceinline__, __shared__ (thread_local: a block runs on one thread) and __syncthreads
// come from HIP-CPU as they are. It marks kernels flatten+simd and device functions simd: SIMD clones of every
// function for nothing here (its lanes are fibers, not vector lanes) and minutes of compile time; both are
// plain functions here.
#undef __global__
#define __global__
#undef __device__
#define __device__

using cudaStream_t = hipStream_t;
using cudaError_t = hipError_t;

inline cudaError_t cudaGetLastError()
{
    return hipGetLastError();
}

// The CPU library's one addition to kernel.h: wait for everything enqueued (HIP-CPU runs launches on its own
// threads), as cudaStreamSynchronize would; the Python binding calls it before reading the indices.
extern "C" int32_t iwpVtsCpuSynchronize();

namespace iwp
{
namespace gpu
{
// The stream a null `stream` argument means. Not HIP-CPU's null stream: its runtime drains that one from two
// consumers at once (an async task and its loop over every stream, which includes the null stream), so two
// launches in a row can overlap, and a kernel reads what the previous one has not yet written. A stream of
// our own is drained by one consumer, in order.
inline hipStream_t ownStream()
{
    static hipStream_t const stream = [] {
        hipStream_t s = nullptr;
        return hipStreamCreate(&s) == hipSuccess ? s : nullptr;
    }();
    return stream;
}
} // namespace gpu
} // namespace iwp

inline cudaStream_t iwpStream(void* stream)
{
    return stream != nullptr ? static_cast<cudaStream_t>(stream) : iwp::gpu::ownStream();
}

// Device math the kernels call unqualified, as CUDA's device headers declare them.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;

// Round-to-nearest arithmetic that CUDA keeps apart from FMA contraction; the CPU build also compiles with
// -ffp-contract=off, so a plain operation rounds the same way.
inline float __fadd_rn(float a, float b)
{
    return a + b;
}
inline float __fsub_rn(float a, float b)
{
    return a - b;
}
inline float __fmul_rn(float a, float b)
{
    return a * b;
}
inline uint32_t __float_as_uint(float x)
{
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}

namespace iwp
{
namespace gpu
{
// The thread's rank in its block as CUDA counts it (x fastest), which is also how CUDA forms warps.
inline int32_t linearThread()
{
    return static_cast<int32_t>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

// One exchange slot per thread of a block (CUDA's limit is 1024); thread_local, as a block runs on one thread.
template <typename T>
inline T* shuffleSlots()
{
    thread_local static T slots[1024];
    return slots;
}

template <typename T>
inline T exchange(T var, int32_t source, bool valid)
{
    T* slots = shuffleSlots<T>();
    slots[linearThread()] = var;
    __syncthreads();
    T const r = valid ? slots[source] : var;
    __syncthreads();
    return r;
}
} // namespace gpu
} // namespace iwp

// 32-wide shuffles, built on the block barrier. HIP-CPU's own shuffles cannot stand in: its warpSize is a
// constant 64, its width-32 __shfl_down/__shfl_up leave lanes 32..63 unshuffled (they bound the source lane by
// the width, not by the half-warp's end), and it numbers a block's threads z fastest, so for a 2-D block its
// "warps" are not CUDA's. Like every HIP-CPU shuffle these are block-wide barriers: every thread of the block
// must reach them, so no kernel returns early before one.
template <typename T>
inline T __shfl_down_sync(uint32_t /*mask*/, T var, uint32_t delta, int32_t width = 32)
{
    int32_t const me = iwp::gpu::linearThread(), source = me + static_cast<int32_t>(delta);
    return iwp::gpu::exchange(var, source, me % width + static_cast<int32_t>(delta) < width);
}
template <typename T>
inline T __shfl_up_sync(uint32_t /*mask*/, T var, uint32_t delta, int32_t width = 32)
{
    int32_t const me = iwp::gpu::linearThread(), source = me - static_cast<int32_t>(delta);
    return iwp::gpu::exchange(var, source, me % width >= static_cast<int32_t>(delta));
}

// fp16 is HIP-CPU's own binary16 type; HIP-CPU has no bf16, so it is a raw 16-bit pattern here (the kernels
// only widen it to float, which is exact: bf16 is the upper half of an fp32).
using IwpHalf = __half;
struct IwpBFloat16
{
    uint16_t bits;
};
inline float __bfloat162float(IwpBFloat16 x)
{
    uint32_t const u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// `extern __shared__ T name[]` in CUDA; HIP-CPU sizes the buffer from the launch's shared-memory bytes.
#define IWP_DYNAMIC_SHARED(type, name) HIP_DYNAMIC_SHARED(type, name)

// One launch syntax for both targets. A template kernel with several arguments goes through a local
// function pointer, as a comma inside the name would split the macro's arguments.
#define IWP_LAUNCH(kernel, grid, block, shmem, stream, ...)                                                        \
    hipLaunchKernelGGL(kernel, dim3(grid), dim3(block), static_cast<uint32_t>(shmem), stream, __VA_ARGS__)

#else // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

using IwpHalf = __half;
using IwpBFloat16 = __nv_bfloat16;

// The caller's stream (null: CUDA's default stream).
inline cudaStream_t iwpStream(void* stream)
{
    return static_cast<cudaStream_t>(stream);
}

#define IWP_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

#define IWP_LAUNCH(kernel, grid, block, shmem, stream, ...) kernel<<<(grid), (block), (shmem), (stream)>>>(__VA_ARGS__)

#endif
