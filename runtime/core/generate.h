// The decode loop, its stop conditions and the backend interface it drives. A backend runs the engine's
// decode graph (ONNX Runtime from Python, TensorRT in C++); the loop owns sampling, stopping and the arena.
#pragma once

#include "kv_arena.h"
#include "sampler.h"

#include <cstdint>
#include <functional>
#include <vector>

namespace iwp
{

struct StopConditions
{
    int64_t maxNewTokens = 32;
    std::vector<int32_t> stopTokens; // e.g. EOS; the stop token is emitted, then generation ends
};

class Backend
{
public:
    virtual ~Backend() = default;
    // One decode step: feed `token` at `position` (`step` = tokens decoded so far) reading the arena's past
    // set and writing its present set. Returns [vocab] logits that stay valid until the next call.
    virtual float const* decode(int32_t token, int64_t position, int64_t step, KvArena& arena) = 0;
    virtual size_t vocab() const = 0;
};

// Called with each new token; returning false stops generation after it.
using TokenCallback = std::function<bool(int32_t)>;

// Generate from the prefill's last logits (the arena's past set holds the prefill caches). The first
// token comes from `firstLogits`; each later one from a decode step at position `nextPosition + step`.
std::vector<int32_t> generate(Backend& backend, KvArena& arena, float const* firstLogits, int64_t nextPosition,
    Sampler& sampler, StopConditions const& stop, TokenCallback const& onToken = {});

} // namespace iwp
