// PCMMR on the CPU, as pcmmr.py: a pool of 2c candidates per step, c of them added by exact greedy MMR.
// Generic over the similarity: `sim.block(rows, cols, out)` fills S[rows, cols] and `sim.columns(cols, out)`
// S[:, cols], the same number for the same pair either way; a NaN similarity counts as 0.
#pragma once

#include "cpu_ops.h"
#include "plan.h"

#include <algorithm>
#include <optional>

namespace iwp
{
namespace cpu
{

// As torch evaluates `lam * m - (1.0 - lam) * s` on float32 tensors: both scalars are rounded to float.
struct Mix
{
    float lam, rest;
    explicit Mix(double l)
        : lam(static_cast<float>(l))
        , rest(static_cast<float>(1.0 - l))
    {
    }
};

inline float mmrScore(float mag, std::optional<float> maxSim, bool finite, Mix const& mix)
{
    float const score = maxSim ? mix.lam * mag - mix.rest * *maxSim : mag;
    return finite ? rankable(score) : kLowest;
}

// `raw` [n] magnitudes -> k indices, ascending. `seed`, if given, is taken as the first chunk.
template <typename Sim>
std::vector<int64_t> pcmmr(std::vector<float> const& raw, Sim const& sim, int64_t k, double lam, int64_t chunk,
    double growth, std::vector<int64_t> const* seed = nullptr)
{
    int64_t const n = static_cast<int64_t>(raw.size());
    Mix const mix(lam);
    if (lam == 1.0 && seed == nullptr) // pure magnitude: the schedule cannot change the set
    {
        return topKSorted(raw, k);
    }
    std::vector<uint8_t> finite(n);
    std::vector<float> mag(n);
    float top = 0.0F;
    for (int64_t i = 0; i < n; ++i)
    {
        float const x = raw[i] == kPosInf ? kMax : raw[i]; // the inf rule: +inf is the largest finite float
        finite[i] = std::isfinite(x);                       // NaN and -inf rank last
        mag[i] = finite[i] ? x : 0.0F;
        top = std::max(top, mag[i]);
    }
    top = std::max(top, std::numeric_limits<float>::min());
    for (float& m : mag)
    {
        m /= top;
    }
    std::vector<uint8_t> taken(n, 0);
    std::vector<std::optional<float>> maxSim(n);
    std::vector<int64_t> chosen;
    int64_t const seeded = seed ? static_cast<int64_t>(seed->size()) : 0;
    std::vector<int64_t> sizes = vts::chunkSchedule(k - seeded, chunk, growth);
    if (seed)
    {
        sizes.insert(sizes.begin(), seeded);
    }
    int64_t done = 0;
    std::vector<float> column;
    for (size_t step = 0; step < sizes.size(); ++step)
    {
        int64_t const c = sizes[step];
        std::vector<int64_t> added;
        if (step == 0 && seed)
        {
            added = *seed;
        }
        else
        {
            int64_t const pool = std::min<int64_t>(2 * c, n - done);
            std::vector<float> score(n);
            for (int64_t i = 0; i < n; ++i)
            {
                score[i] = taken[i] ? kNegInf : mmrScore(mag[i], maxSim[i], finite[i], mix);
            }
            std::vector<int64_t> cand = topIndices(score, pool);
            std::sort(cand.begin(), cand.end()); // ascending, so argmax ties below go to the lower index
            std::vector<float> intra; // [pool, pool]: S[cand[p], cand[r]]
            sim.block(cand, cand, intra);
            std::transform(intra.begin(), intra.end(), intra.begin(), cleanSimilarity);
            std::vector<std::optional<float>> inner(pool);
            for (int64_t p = 0; p < pool; ++p)
            {
                inner[p] = maxSim[cand[p]];
            }
            std::vector<uint8_t> picked(pool, 0);
            for (int64_t t = 0; t < c; ++t)
            {
                int64_t best = -1;
                float bestScore = kNegInf;
                for (int64_t p = 0; p < pool; ++p)
                {
                    float const s = picked[p] ? kNegInf : mmrScore(mag[cand[p]], inner[p], finite[cand[p]], mix);
                    if (best < 0 || s > bestScore)
                    {
                        best = p;
                        bestScore = s;
                    }
                }
                picked[best] = 1;
                added.push_back(cand[best]);
                for (int64_t p = 0; p < pool; ++p)
                {
                    float const col = intra[p * pool + best];
                    inner[p] = inner[p] ? std::max(*inner[p], col) : col;
                }
            }
        }
        for (int64_t a : added)
        {
            taken[a] = 1;
            chosen.push_back(a);
        }
        sim.columns(added, column); // S[:, added], the step's one pass over the similarity's data
        int64_t const na = static_cast<int64_t>(added.size());
        for (int64_t i = 0; i < n; ++i)
        {
            float s = kNegInf;
            for (int64_t j = 0; j < na; ++j)
            {
                s = std::max(s, cleanSimilarity(column[j * n + i]));
            }
            maxSim[i] = maxSim[i] ? std::max(*maxSim[i], s) : s;
        }
        done += c;
    }
    std::sort(chosen.begin(), chosen.end());
    return chosen;
}

} // namespace cpu
} // namespace iwp
