// The prefill graph's inputs for one prompt, built in C++ as iwp.inputs.pad_to_length builds them in Python
// (a test holds the two equal): the prompt's token ids, with the image's N placeholder tokens already
// expanded by the processor, left-padded to the engine's fixed length, plus the positions derived from them.
#pragma once

#include "manifest.h"

#include <cstdint>
#include <vector>

namespace iwp
{

struct PrefillInputs
{
    std::vector<int64_t> inputIds;      // [maxPrompt], left-padded with the pad token
    std::vector<int64_t> attentionMask; // [maxPrompt], 0 on padding
    std::vector<int64_t> positions;     // [maxPrompt] RoPE positions (0 on padding)
    int64_t visualStart = 0;            // first image token
    std::vector<int64_t> queryIdx;      // [maxPrompt - nVisual] instruction tokens: every slot after the image
    std::vector<uint8_t> queryMask;     // [maxPrompt - nVisual] 1 where queryIdx is a real slot
    int64_t lastIdx = 0;                // the last token (always maxPrompt - 1: left padding)
    int64_t nextPosition = 0;           // RoPE position of the first generated token
};

// Throws std::invalid_argument with one line naming the problem: a prompt past the engine's capacity, or an
// image-token count or layout the engine was not built for.
PrefillInputs makePrefillInputs(std::vector<int32_t> const& ids, EngineManifest const& manifest);

} // namespace iwp
