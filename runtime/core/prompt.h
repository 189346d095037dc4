// The first decoder graph's inputs for one prompt, built in C++ as runtime/prompt.py builds them in Python
// (a test holds the two equal element by element): the prompt's own token ids, unpadded (the prefill runs
// over its real length T), with the image's N placeholder tokens already expanded by the processor, the
// positions derived from them, and the selection's fixed query slots (Q = maxPrompt - N).
#pragma once

#include "manifest.h"

#include <cstdint>
#include <vector>

namespace iwp
{

struct PrefillInputs
{
    std::vector<int64_t> tokenIds;  // [T] the embed graph's input
    std::vector<int64_t> positions; // [T] RoPE positions 0..T-1
    int64_t visualStart = 0;        // first image token
    std::vector<int64_t> queryIdx;  // [maxPrompt - nVisual] instruction tokens: the slots after the image,
                                    // clamped to the last token
    std::vector<uint8_t> queryMask; // [maxPrompt - nVisual] 1 where queryIdx is a real instruction token
    int64_t lastIdx = 0;            // the last token: T - 1
    int64_t offset = 0;             // each segment's cache fill before the prefill: 0
    int64_t promptLen = 0;          // T (EngineManifest::segmentPrefillLen takes it)
    int64_t nextPosition = 0;       // RoPE position of the first generated token: T
};

// Throws std::invalid_argument with one line naming the problem: a prompt past the engine's capacity, an
// image-token count or layout the engine was not built for, or no text after the image.
PrefillInputs makePrefillInputs(std::vector<int32_t> const& ids, EngineManifest const& manifest);

} // namespace iwp
