// VisualTokenSelect on the CPU (cpu.h): one function per method, behind a table indexed by method id.
// Each takes one sample's inputs and the parameters and returns its `keep` indices, ascending.
#include "cpu.h"

#include "cpu_ops.h"
#include "cpu_pcmmr.h"
#include "plan.h"

#include <algorithm>
#include <array>
#include <numeric>
#include <stdexcept>

namespace iwp
{
namespace cpu
{
namespace
{

// One sample of the inputs, with the views every method needs.
struct Sample
{
    Inputs const& in;
    IwpVtsParams const& p;
    int64_t b, start, n;
    Heads q, k, qRot, kRot, v;

    Sample(Inputs const& inputs, IwpVtsParams const& params, int64_t sample)
        : in(inputs)
        , p(params)
        , b(sample)
        , start(inputs.visualStart[sample])
        , n(params.visual)
        , q{inputs.q, params.queryHeads, params.tokens, params.headDim}
        , k{inputs.k, params.kvHeads, params.tokens, params.headDim}
        , qRot{inputs.qRot, params.queryHeads, params.tokens, params.headDim}
        , kRot{inputs.kRot, params.kvHeads, params.tokens, params.headDim}
        , v{inputs.v, params.kvHeads, params.tokens, params.headDim}
    {
    }

    // The attention mean over the instruction queries, or over the last token alone.
    std::vector<float> attention(Heads const& qs, Heads const& ks, double const* vnorm, bool last) const
    {
        if (last)
        {
            return attentionMean(qs, ks, vnorm, in.keyMask, b, start, n, {in.lastIdx[b]}, {1});
        }
        std::vector<int64_t> const idx(in.queryIdx + b * p.queries, in.queryIdx + (b + 1) * p.queries);
        std::vector<uint8_t> const ok(in.queryMask + b * p.queries, in.queryMask + (b + 1) * p.queries);
        return attentionMean(qs, ks, vnorm, in.keyMask, b, start, n, idx, ok);
    }

    HiddenCosine hiddenCosine() const
    {
        return HiddenCosine(in.hidden, p.tokens, p.width, b, start, n);
    }
};

// Integer hash of (index, seed) as baselines.hash_scores computes it with torch's wrapping int64 ops.
float hashScore(int64_t i, int64_t seed)
{
    int64_t x = i + seed * 7919;
    for (int round = 0; round < 2; ++round)
    {
        auto const wrapped = static_cast<int64_t>(static_cast<uint64_t>(x) * 1103515245ULL + 12345ULL);
        x = wrapped % 2147483648LL;
        x = x < 0 ? x + 2147483648LL : x; // floor modulo, as torch's %
        x = x ^ (x / 65536);
    }
    return static_cast<float>(x % (1LL << 24));
}

// max(rankable(x), 0) / sum: TransPrune's normalization of a score row.
std::vector<float> sumNormalized(std::vector<float> x)
{
    double total = 0;
    for (float& v : x)
    {
        v = std::max(rankable(v), 0.0F);
        total += v;
    }
    for (float& v : x)
    {
        v = static_cast<float>(v / std::max(total, 1e-30));
    }
    return x;
}

// BTP's rebalancing: remove the least-squares linear trend of log-attention along the token order.
std::vector<float> rebalanced(std::vector<float> const& attn)
{
    int64_t const n = static_cast<int64_t>(attn.size());
    if (n <= 2) // a line through every point: exactly uniform
    {
        return std::vector<float>(n, 1.0F / static_cast<float>(n));
    }
    std::vector<double> logA(n), t(n);
    double cov = 0, var = 0;
    for (int64_t i = 0; i < n; ++i)
    {
        logA[i] = std::log(std::max(static_cast<double>(attn[i]), 1e-30));
        t[i] = -1.0 + 2.0 * i / (n - 1);
        cov += logA[i] * t[i];
        var += t[i] * t[i];
    }
    double const slope = cov / var;
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i)
    {
        logA[i] -= slope * t[i];
        top = std::max(top, logA[i]);
    }
    double total = 0;
    for (double v : logA)
    {
        total += std::exp(v - top);
    }
    std::vector<float> out(n);
    for (int64_t i = 0; i < n; ++i)
    {
        out[i] = static_cast<float>(std::exp(logA[i] - top) / total);
    }
    return out;
}

std::vector<int64_t> selectIwp(Sample const& s)
{
    std::vector<double> vnorm(s.p.kvHeads * s.n);
    for (int64_t g = 0; g < s.p.kvHeads; ++g)
    {
        for (int64_t i = 0; i < s.n; ++i)
        {
            float const* val = s.v.at(s.b, g, s.start + i);
            double norm2 = 0;
            for (int64_t e = 0; e < s.p.headDim; ++e)
            {
                norm2 += static_cast<double>(val[e]) * val[e];
            }
            vnorm[g * s.n + i] = std::max(std::sqrt(norm2), kEps);
        }
    }
    auto const mag = s.attention(s.q, s.k, vnorm.data(), s.p.queriesLast != 0);
    if (s.p.lam == 1.0) // no similarity needed (the reference does not build it either)
    {
        return topKSorted(mag, s.p.keep);
    }
    return pcmmr(mag, UpdateCosine(s.kRot, s.v, s.b, s.start, s.n), s.p.keep, s.p.lam, s.p.chunk, s.p.growth);
}

std::vector<int64_t> selectFastV(Sample const& s)
{
    return topKSorted(s.attention(s.qRot, s.kRot, nullptr, true), s.p.keep);
}

std::vector<int64_t> selectRandom(Sample const& s)
{
    std::vector<float> score(s.n);
    for (int64_t i = 0; i < s.n; ++i)
    {
        score[i] = hashScore(i, s.p.seed);
    }
    return topKSorted(score, s.p.keep);
}

std::vector<int64_t> selectDart(Sample const& s)
{
    std::vector<float> keyNorm(s.n, 0.0F);
    for (int64_t i = 0; i < s.n; ++i)
    {
        double total = 0;
        for (int64_t g = 0; g < s.p.kvHeads; ++g)
        {
            float const* key = s.k.at(s.b, g, s.start + i);
            double norm2 = 0;
            for (int64_t e = 0; e < s.p.headDim; ++e)
            {
                norm2 += static_cast<double>(key[e]) * key[e];
            }
            total += std::sqrt(norm2);
        }
        keyNorm[i] = static_cast<float>(total / s.p.kvHeads);
    }
    auto const pivots = topKSorted(keyNorm, std::min(s.p.pivots, s.p.keep));
    std::vector<float> cosine;
    s.hiddenCosine().columns(pivots, cosine);
    std::vector<float> score(s.n);
    for (int64_t i = 0; i < s.n; ++i)
    {
        float dup = kNegInf;
        bool nan = false;
        for (size_t j = 0; j < pivots.size(); ++j)
        {
            float const c = cosine[j * s.n + i];
            nan = nan || std::isnan(c);
            dup = std::max(dup, c);
        }
        score[i] = rankable(nan ? std::nanf("") : -dup); // least duplicated first; NaN last
    }
    for (int64_t p : pivots)
    {
        score[p] = kMax; // pivots always stay
    }
    return topKSorted(score, s.p.keep);
}

std::vector<int64_t> selectDivPrune(Sample const& s)
{
    HiddenCosine const cosine = s.hiddenCosine();
    int64_t const width = s.p.width;
    std::vector<double> mean(width, 0.0);
    for (int64_t i = 0; i < s.n; ++i)
    {
        float const* row = s.in.hidden + (s.b * s.p.tokens + s.start + i) * width;
        for (int64_t e = 0; e < width; ++e)
        {
            mean[e] += static_cast<double>(row[e]) / s.n;
        }
    }
    double const meanNorm = std::sqrt(std::inner_product(mean.begin(), mean.end(), mean.begin(), 0.0));
    std::vector<double> const toMean = cosine.dotAll(mean);
    std::vector<float> atypical(s.n); // seeds the spread
    for (int64_t i = 0; i < s.n; ++i)
    {
        atypical[i] = static_cast<float>(1.0 - toMean[i] / std::max(meanNorm, 1e-8));
    }
    return pcmmr(atypical, cosine, s.p.keep, 0.0, 1, 1.0);
}

std::vector<int64_t> selectTransPrune(Sample const& s)
{
    auto const iga = sumNormalized(s.attention(s.qRot, s.kRot, nullptr, false));
    auto const accumulated = sumNormalized(std::vector<float>(s.in.ttv + s.b * s.n, s.in.ttv + (s.b + 1) * s.n));
    std::vector<float> score(s.n);
    float const a = static_cast<float>(s.p.alpha), rest = static_cast<float>(1.0 - s.p.alpha);
    for (int64_t i = 0; i < s.n; ++i)
    {
        score[i] = a * accumulated[i] + rest * iga[i];
    }
    return topKSorted(score, s.p.keep);
}

std::vector<int64_t> selectBtp(Sample const& s)
{
    auto attn = s.attention(s.qRot, s.kRot, nullptr, false);
    if (s.p.rebalance)
    {
        attn = rebalanced(attn);
    }
    std::transform(attn.begin(), attn.end(), attn.begin(), rankable);
    int64_t const nSeed = vts::btpSeedCount(s.p);
    auto const seed = pcmmr(attn, GridDistance(s.in.visualXy + s.b * s.n * 2, s.n), nSeed, 0.0, 1, 1.0);
    if (nSeed == s.p.keep)
    {
        return seed;
    }
    return pcmmr(attn, s.hiddenCosine(), s.p.keep, vts::btpLambda(s.p), s.p.chunk, s.p.growth, &seed);
}

using MethodFunction = std::vector<int64_t> (*)(Sample const&);

// Indexed by IwpVtsMethod (params.h); a method id without an entry fails to compile below.
std::array<MethodFunction, kIwpVtsNumMethods> const& methods()
{
    static std::array<MethodFunction, kIwpVtsNumMethods> const table = [] {
        std::array<MethodFunction, kIwpVtsNumMethods> t{};
        t[kIwpVtsIwp] = selectIwp;
        t[kIwpVtsFastV] = selectFastV;
        t[kIwpVtsDart] = selectDart;
        t[kIwpVtsDivPrune] = selectDivPrune;
        t[kIwpVtsRandom] = selectRandom;
        t[kIwpVtsTransPrune] = selectTransPrune;
        t[kIwpVtsBtp] = selectBtp;
        return t;
    }();
    return table;
}

} // namespace

void select(Inputs const& in, IwpVtsParams const& p, int64_t* indices)
{
    std::string const error = vts::validate(p);
    if (!error.empty())
    {
        throw std::invalid_argument("VisualTokenSelect: " + error);
    }
    MethodFunction const method = methods()[p.method];
    if (method == nullptr)
    {
        throw std::invalid_argument("VisualTokenSelect: the CPU kernel has no method id " + std::to_string(p.method));
    }
    for (int64_t b = 0; b < p.batch; ++b)
    {
        std::vector<int64_t> const chosen = method(Sample(in, p, b));
        std::copy(chosen.begin(), chosen.end(), indices + b * p.keep);
    }
}

} // namespace cpu
} // namespace iwp
