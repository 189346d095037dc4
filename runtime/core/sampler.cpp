#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace iwp
{

uint64_t SplitMix64::next()
{
    uint64_t z = (mState += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

double SplitMix64::uniform()
{
    return static_cast<double>(next() >> 11) * 0x1.0p-53;
}

uint64_t parseSeed(std::string const& text)
{
    bool const negative = !text.empty() && text[0] == '-';
    size_t const first = negative || (!text.empty() && text[0] == '+') ? 1 : 0;
    if (text.size() == first)
    {
        throw std::invalid_argument("seed must be an integer, got \"" + text + "\"");
    }
    uint64_t value = 0; // arithmetic modulo 2**64: the low 64 bits of the integer
    for (size_t i = first; i < text.size(); ++i)
    {
        if (text[i] < '0' || text[i] > '9')
        {
            throw std::invalid_argument("seed must be an integer, got \"" + text + "\"");
        }
        value = value * 10 + static_cast<uint64_t>(text[i] - '0');
    }
    return negative ? ~value + 1 : value; // two's complement: -x modulo 2**64
}

Sampler::Sampler(double temperature, double topP, uint64_t seed)
    : mTemperature(temperature)
    , mTopP(topP)
    , mRng(seed)
{
    if (!(temperature >= 0.0) || !(topP > 0.0 && topP <= 1.0))
    {
        throw std::invalid_argument("sampler: temperature must be >= 0 and top_p in (0, 1], got "
            + std::to_string(temperature) + ", " + std::to_string(topP));
    }
}

int32_t Sampler::sample(float const* logits, size_t vocab)
{
    if (vocab == 0)
    {
        throw std::invalid_argument("sampler: empty logits");
    }
    if (mTemperature == 0.0) // greedy: the first maximum
    {
        return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
    }
    std::vector<double> p(vocab);
    double top = -INFINITY;
    for (size_t i = 0; i < vocab; ++i)
    {
        p[i] = static_cast<double>(logits[i]) / mTemperature;
        top = std::max(top, p[i]);
    }
    double total = 0.0;
    for (size_t i = 0; i < vocab; ++i) // index order
    {
        p[i] = std::exp(p[i] - top);
        total += p[i];
    }
    for (double& x : p)
    {
        x /= total;
    }
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    // the smallest prefix (by probability) whose mass before each member is below top_p
    std::vector<double> cumulative;
    double before = 0.0;
    for (int32_t token : order)
    {
        if (!(before < mTopP))
        {
            break;
        }
        before += p[token];
        cumulative.push_back(before);
    }
    double const u = mRng.uniform() * cumulative.back();
    size_t const pick = std::upper_bound(cumulative.begin(), cumulative.end(), u) - cumulative.begin();
    return order[std::min(pick, cumulative.size() - 1)];
}

} // namespace iwp
