#include "prompt.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace iwp
{

PrefillInputs makePrefillInputs(std::vector<int32_t> const& ids, EngineManifest const& m)
{
    int64_t const t = static_cast<int64_t>(ids.size());
    if (t > m.maxPrompt)
    {
        throw std::invalid_argument("prompt is " + std::to_string(t) + " tokens (with " + std::to_string(m.nVisual)
            + " image tokens) but the engine's capacity is " + std::to_string(m.maxPrompt)
            + "; shorten the prompt or rebuild the engine with a larger MAX_TEXT_TOKENS");
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
    int64_t const after = start + m.nVisual; // the first instruction token
    if (after >= t)
    {
        throw std::invalid_argument("no text follows the image; the chat template must put the prompt after the image");
    }
    PrefillInputs in;
    in.tokenIds.assign(ids.begin(), ids.end());
    for (int64_t i = 0; i < t; ++i)
    {
        in.positions.push_back(i);
    }
    in.visualStart = start;
    for (int64_t i = 0; i < m.maxPrompt - m.nVisual; ++i)
    {
        in.queryIdx.push_back(std::min(after + i, t - 1));
        in.queryMask.push_back(after + i < t ? 1 : 0);
    }
    in.lastIdx = t - 1;
    in.promptLen = t;
    in.nextPosition = t;
    return in;
}

} // namespace iwp
