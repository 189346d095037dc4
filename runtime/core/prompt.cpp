#include "prompt.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace iwp
{

PrefillInputs makePrefillInputs(std::vector<int32_t> const& ids, EngineManifest const& m)
{
    int64_t const length = m.maxPrompt;
    int64_t const t = static_cast<int64_t>(ids.size());
    if (t > length)
    {
        throw std::invalid_argument("prompt is " + std::to_string(t) + " tokens (with " + std::to_string(m.nVisual)
            + " image tokens) but the engine's capacity is " + std::to_string(length)
            + "; shorten the prompt or rebuild the engine with a larger max prompt");
    }
    auto const first = std::find(ids.begin(), ids.end(), m.imageToken);
    int64_t const count = std::count(ids.begin(), ids.end(), m.imageToken);
    int64_t const start = first - ids.begin();
    if (count != m.nVisual || !std::all_of(first, first + std::min(count, t - start),
                                  [&](int32_t id) { return id == m.imageToken; }))
    {
        throw std::invalid_argument("prompt has " + std::to_string(count) + " image tokens but the engine expects "
            + std::to_string(m.nVisual) + " in one contiguous block; tokenize with the engine's own processor");
    }
    int64_t const pad = length - t;
    PrefillInputs in;
    in.inputIds.assign(static_cast<size_t>(pad), m.padToken);
    in.inputIds.insert(in.inputIds.end(), ids.begin(), ids.end());
    in.attentionMask.assign(static_cast<size_t>(pad), 0);
    in.attentionMask.resize(static_cast<size_t>(length), 1);
    in.positions.assign(static_cast<size_t>(pad), 0);
    for (int64_t i = 0; i < t; ++i)
    {
        in.positions.push_back(i);
    }
    in.visualStart = start + pad;
    int64_t const after = in.visualStart + m.nVisual; // the first instruction token
    int64_t const queries = length - m.nVisual;
    for (int64_t i = 0; i < queries; ++i)
    {
        in.queryIdx.push_back(std::min(after + i, length - 1));
        in.queryMask.push_back(after + i < length ? 1 : 0);
    }
    in.lastIdx = length - 1;
    in.nextPosition = t; // positions run 0..t-1 over the real tokens
    return in;
}

} // namespace iwp
