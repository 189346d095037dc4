// Token samplers: greedy, or temperature then top-p (nucleus) from a seeded SplitMix64 stream.
// The algorithm is specified exactly (sums in index or rank order, in double) so that the pure-Python
// reference (iwp/runtime/pipeline.py, Sampler) draws the same token for the same seed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace iwp
{

class SplitMix64
{
public:
    explicit SplitMix64(uint64_t seed)
        : mState(seed)
    {
    }
    uint64_t next();
    double uniform(); // [0, 1), 53 random bits

private:
    uint64_t mState;
};

// A seed written as a decimal integer of any size or sign, wrapped to uint64 as the Python reference wraps
// any int (seed & (2**64 - 1)): "-1" is 2**64 - 1. Throws std::invalid_argument on anything else.
uint64_t parseSeed(std::string const& text);

class Sampler
{
public:
    // temperature 0 is greedy; otherwise temperature > 0 and top_p in (0, 1].
    Sampler(double temperature = 0.0, double topP = 1.0, uint64_t seed = 0);

    int32_t sample(float const* logits, size_t vocab);

    double temperature() const { return mTemperature; }
    double topP() const { return mTopP; }

private:
    double mTemperature;
    double mTopP;
    SplitMix64 mRng;
};

} // namespace iwp
