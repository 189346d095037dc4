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
//
// The stages live in one header each (kernel_attention, _features, _similarity, _pcmmr, _topk, _scores) and
// the host's launch sequence in kernel_enqueue.cuh; this file is the C interface. gpu.h lets the same sources
// build for nvcc or, with IWP_HIP_CPU, for the CPU through HIP-CPU (make kernels-cpu).
#include "kernel.h"

#include "kernel_enqueue.cuh"
#include "plan.h"

#include <cstdio>
#include <string>

using iwp::vts::Run;
using iwp::vts::validate;

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
    return params == nullptr || !validate(*params).empty() ? 0 : iwp::vts::Layout(*params).total;
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
