// VisualTokenSelect's host-side planning, shared by the CPU kernel (cpu.cpp), the CUDA launchers (kernel.cu)
// and the TensorRT plugin (plugin.cpp): the PCMMR chunk schedule, BTP's per-stage λ and seed count, and the
// validation of a parameter set. Host-only C++17: no CUDA, no pybind, no TensorRT.
#pragma once

#include "params.h"

#include <cstdint>
#include <string>
#include <vector>

namespace iwp
{
namespace vts
{

// The largest head dim the CUDA kernels' shared-memory tiles hold; every backend refuses the same shapes.
constexpr int64_t kMaxHeadDim = 256;

// The largest visual token count: the CUDA top-K indexes tokens with 32-bit keys.
constexpr int64_t kMaxVisual = int64_t{1} << 30;

// PCMMR's chunk sizes c_s = round(chunk·growth^s), summing to k, the last one truncated: pcmmr.chunk_schedule.
// Rounded as Python's round() (nearbyint: half to even under the default rounding mode). Empty for k <= 0.
std::vector<int64_t> chunkSchedule(int64_t k, int64_t chunk, double growth);

// BTP's attention weight λ at this stage: attentionLast alone, else the linear ramp attentionFirst ->
// attentionLast over the stages (btp.BTP.attention_weight).
double btpLambda(IwpVtsParams const& p);

// BTP's spatial seeds: min(keep, max(1, round(seedFraction·keep))).
int64_t btpSeedCount(IwpVtsParams const& p);

// Empty if the parameters are valid, otherwise a one-line reason (the shapes, the core attributes and the
// chosen method's options; other methods' options are ignored).
std::string validate(IwpVtsParams const& p);

} // namespace vts
} // namespace iwp
