// VisualTokenSelect on the CPU: the entry the Python binding (cpu_module.cpp) calls.
//
// Every method follows the PyTorch reference exactly (same formulas, same PCMMR candidate pools, ties to the
// lower index, the NaN and inf rules of README.md). Products and sums are in double, final scores in float,
// as the reference ranks them. The heavy loops run over packed double panels the compiler vectorizes, on
// std::thread workers; each result element is computed by one worker in a fixed order, so the indices do not
// depend on the thread count.
#pragma once

#include "params.h"

#include <cstdint>

namespace iwp
{
namespace cpu
{

// The op's inputs (contract.INPUTS), contiguous, activations as float32 and masks as uint8 (0 or 1).
struct Inputs
{
    float const* hidden;       // [B, T, D]
    float const* q;            // [B, Hq, T, d]
    float const* k;            // [B, Hkv, T, d]
    float const* qRot;         // [B, Hq, T, d]
    float const* kRot;         // [B, Hkv, T, d]
    float const* v;            // [B, Hkv, T, d]
    uint8_t const* keyMask;    // [B, T]
    int64_t const* visualStart; // [B]
    int64_t const* queryIdx;   // [B, Q]
    uint8_t const* queryMask;  // [B, Q]
    int64_t const* lastIdx;    // [B]
    float const* visualXy;     // [B, N, 2]
    float const* ttv;          // [B, N]
};

// indices [B, keep] int64, ascending per row. `p` must be valid (vts::validate); std::invalid_argument
// otherwise.
void select(Inputs const& in, IwpVtsParams const& p, int64_t* indices);

} // namespace cpu
} // namespace iwp
