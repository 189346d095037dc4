// The planning unit (plan.h): scalar schedule, λ, seed count and validation, written once for every backend.
#include "plan.h"

#include <algorithm>
#include <cmath>

namespace iwp
{
namespace vts
{

std::vector<int64_t> chunkSchedule(int64_t k, int64_t chunk, double growth)
{
    std::vector<int64_t> sizes;
    for (int64_t step = 0, total = 0; total < k; ++step)
    {
        // nearbyint rounds half to even under the default rounding mode, as Python's round() does
        int64_t c = std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(chunk * std::pow(growth, step))));
        c = std::min<int64_t>(k - total, c);
        sizes.push_back(c);
        total += c;
    }
    return sizes;
}

double btpLambda(IwpVtsParams const& p)
{
    if (p.nStages == 1)
    {
        return p.attentionLast;
    }
    return p.attentionFirst + (p.attentionLast - p.attentionFirst) * p.stage / static_cast<double>(p.nStages - 1);
}

int64_t btpSeedCount(IwpVtsParams const& p)
{
    auto const rounded = static_cast<int64_t>(std::nearbyint(p.seedFraction * p.keep));
    return std::min<int64_t>(p.keep, std::max<int64_t>(1, rounded));
}

std::string validate(IwpVtsParams const& p)
{
    auto inUnit = [](double x) { return x >= 0.0 && x <= 1.0; }; // false for NaN
    if (p.method < kIwpVtsIwp || p.method > kIwpVtsBtp)
    {
        return "unknown method id " + std::to_string(p.method);
    }
    if (p.dtype < kIwpVtsFloat32 || p.dtype > kIwpVtsBFloat16)
    {
        return "activations must be float32, float16 or bfloat16";
    }
    if (p.batch < 1 || p.tokens < 1 || p.visual < 1 || p.queries < 1 || p.width < 1)
    {
        return "empty input: batch, tokens, visual tokens, query rows and width must all be >= 1";
    }
    if (p.keep < 1 || p.keep > p.visual)
    {
        return "keep=" + std::to_string(p.keep) + " must be in [1, N=" + std::to_string(p.visual)
            + "]; export with a budget of at most the visual token count";
    }
    if (p.visual > p.tokens)
    {
        return "N=" + std::to_string(p.visual) + " visual tokens exceed the sequence length " + std::to_string(p.tokens);
    }
    if (p.kvHeads < 1 || p.queryHeads % p.kvHeads != 0)
    {
        return "query heads (" + std::to_string(p.queryHeads) + ") must be a multiple of KV heads ("
            + std::to_string(p.kvHeads) + ")";
    }
    if (p.headDim < 1 || p.headDim > kMaxHeadDim)
    {
        return "head dim " + std::to_string(p.headDim) + " is outside [1, " + std::to_string(kMaxHeadDim) + "]";
    }
    if (p.nStages < 1 || p.stage < 0 || p.stage >= p.nStages)
    {
        return "stage " + std::to_string(p.stage) + " is outside [0, n_stages=" + std::to_string(p.nStages) + ")";
    }
    bool const chunked = p.method == kIwpVtsIwp || p.method == kIwpVtsBtp;
    if (chunked && (p.chunk < 1 || !(p.growth >= 1.0)))
    {
        return "chunk must be >= 1 and growth >= 1.0";
    }
    if (p.method == kIwpVtsIwp && !inUnit(p.lam))
    {
        return "lam must be in [0, 1]";
    }
    if (p.method == kIwpVtsDart && p.pivots < 1)
    {
        return "pivots must be >= 1";
    }
    if (p.method == kIwpVtsTransPrune && !inUnit(p.alpha))
    {
        return "alpha must be in [0, 1]";
    }
    if (p.method == kIwpVtsBtp && !(inUnit(p.attentionFirst) && inUnit(p.attentionLast) && inUnit(p.seedFraction)))
    {
        return "attention_first, attention_last and seed_fraction must be in [0, 1]";
    }
    if (p.visual > kMaxVisual)
    {
        return "too many visual tokens for the selection kernels";
    }
    return {};
}

} // namespace vts
} // namespace iwp
