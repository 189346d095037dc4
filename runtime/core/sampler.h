// Token samplers: greedy, or temperature then top-p (nucleus) from a seeded SplitMix64 stream.
// The algorithm is specified exactly (sums in index or rank order, in double) so that the pure-Python
// reference (iwp/runtime/pipeline.py, Sampler) draws the same token for the same seed.
#pragma once

#include <cstddef>
#include <cstdint>

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
