// VisualTokenSelect on the CPU, every method, following the PyTorch reference exactly (same formulas,
// same PCMMR candidate pools, ties to the lower index, NaN scores ranked last).
// Built by the package's own build (setup.py) as iwp.plugins.visual_token_select._cpu; the ONNX Runtime op
// calls it. Accumulations are in double, final scores in float, as the reference ranks them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "plan.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace iwp
{
namespace
{

constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr float kMax = std::numeric_limits<float>::max();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kEps = 1e-12;

float rankable(float x)
{
    if (std::isnan(x) || x == kNegInf)
    {
        return kLowest;
    }
    return std::isinf(x) ? kMax : x;
}

// Indices of the k largest scores, ties to the lower index, in rank order.
std::vector<int64_t> topIndices(std::vector<float> const& score, int64_t k)
{
    std::vector<int64_t> idx(score.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
    idx.resize(k);
    return idx;
}

// Strided views of the contiguous [B, H, T, d] inputs.
struct Heads
{
    float const* data;
    int64_t heads, tokens, dim;
    float const* at(int64_t b, int64_t h, int64_t t) const
    {
        return data + ((b * heads + h) * tokens + t) * dim;
    }
};

double dot(float const* x, float const* y, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; ++i)
    {
        s += static_cast<double>(x[i]) * y[i];
    }
    return s;
}

// Mean over query heads and valid queries of attention probability, times the value norm when logVnorm
// (per KV head and token) is given: [N]. With q, k without RoPE and value norms this is IWP's magnitude.
std::vector<float> attentionMean(Heads const& q, Heads const& k, std::vector<double> const* logVnorm, uint8_t const* keyMask,
    int64_t b, int64_t start, int64_t n, std::vector<int64_t> const& queryPos, std::vector<uint8_t> const& queryOk)
{
    int64_t const groups = q.heads / k.heads;
    int64_t const t = k.tokens;
    double const scale = 1.0 / std::sqrt(static_cast<double>(q.dim));
    std::vector<double> sum(n, 0.0);
    std::vector<double> logits(t);
    int64_t valid = 0;
    for (size_t r = 0; r < queryPos.size(); ++r)
    {
        valid += queryOk[r] ? 1 : 0;
    }
    for (int64_t h = 0; h < q.heads; ++h)
    {
        int64_t const g = h / groups;
        for (size_t r = 0; r < queryPos.size(); ++r)
        {
            if (!queryOk[r])
            {
                continue;
            }
            int64_t const pos = queryPos[r];
            double top = -std::numeric_limits<double>::infinity();
            bool nan = false;
            for (int64_t j = 0; j < t; ++j)
            {
                bool const visible = j <= pos && keyMask[b * t + j];
                logits[j] = visible ? dot(q.at(b, h, pos), k.at(b, g, j), q.dim) * scale
                                    : -std::numeric_limits<double>::infinity();
                nan = nan || std::isnan(logits[j]);
                top = std::max(top, logits[j]);
            }
            double total = 0;
            for (int64_t j = 0; j < t; ++j)
            {
                total += std::exp(logits[j] - top);
            }
            double const lse = top + std::log(total);
            for (int64_t i = 0; i < n; ++i)
            {
                double const logP = nan ? std::nan("") : logits[start + i] - lse;
                sum[i] += std::exp(logP + (logVnorm ? (*logVnorm)[g * n + i] : 0.0));
            }
        }
    }
    double const denom = std::max<double>(1.0, static_cast<double>(valid * q.heads));
    std::vector<float> out(n);
    for (int64_t i = 0; i < n; ++i)
    {
        out[i] = static_cast<float>(sum[i] / denom);
    }
    return out;
}

// S[i, c] of the rank-1 updates, as a head-weighted RBF kernel on centred keys times the value cosine.
class UpdateCosine
{
public:
    UpdateCosine(Heads const& kRot, Heads const& v, int64_t b, int64_t start, int64_t n)
        : mHeads(kRot.heads)
        , mN(n)
        , mDim(kRot.dim)
        , mA(mHeads * n * mDim)
        , mVUnit(mHeads * n * mDim)
        , mLogW(mHeads * n)
        , mSq(mHeads * n)
    {
        double const quarter = std::pow(static_cast<double>(mDim), 0.25);
        std::vector<double> logSelf(mHeads * n);
        for (int64_t h = 0; h < mHeads; ++h)
        {
            std::vector<double> mean(mDim, 0.0);
            for (int64_t i = 0; i < n; ++i)
            {
                float const* key = kRot.at(b, h, start + i);
                float const* val = v.at(b, h, start + i);
                double norm2 = 0, a2 = 0;
                for (int64_t e = 0; e < mDim; ++e)
                {
                    norm2 += static_cast<double>(val[e]) * val[e];
                }
                double const vnorm = std::max(std::sqrt(norm2), kEps);
                for (int64_t e = 0; e < mDim; ++e)
                {
                    double const a = key[e] / quarter;
                    a2 += a * a;
                    mA[(h * n + i) * mDim + e] = a;
                    mVUnit[(h * n + i) * mDim + e] = val[e] / vnorm;
                    mean[e] += a / n;
                }
                logSelf[h * n + i] = a2 + 2 * std::log(vnorm);
            }
            for (int64_t i = 0; i < n; ++i)
            {
                double sq = 0;
                for (int64_t e = 0; e < mDim; ++e)
                {
                    double& a = mA[(h * n + i) * mDim + e];
                    a -= mean[e];
                    sq += a * a;
                }
                mSq[h * n + i] = sq;
            }
        }
        for (int64_t i = 0; i < n; ++i)  // log w = ½ log_softmax over heads
        {
            double top = -std::numeric_limits<double>::infinity();
            for (int64_t h = 0; h < mHeads; ++h)
            {
                top = std::max(top, logSelf[h * n + i]);
            }
            double total = 0;
            for (int64_t h = 0; h < mHeads; ++h)
            {
                total += std::exp(logSelf[h * n + i] - top);
            }
            for (int64_t h = 0; h < mHeads; ++h)
            {
                mLogW[h * n + i] = 0.5 * (logSelf[h * n + i] - top - std::log(total));
            }
        }
    }

    float operator()(int64_t i, int64_t c) const
    {
        double s = 0;
        for (int64_t h = 0; h < mHeads; ++h)
        {
            double const* ai = &mA[(h * mN + i) * mDim];
            double const* ac = &mA[(h * mN + c) * mDim];
            double const* vi = &mVUnit[(h * mN + i) * mDim];
            double const* vc = &mVUnit[(h * mN + c) * mDim];
            double cross = 0, vcos = 0;
            for (int64_t e = 0; e < mDim; ++e)
            {
                cross += ai[e] * ac[e];
                vcos += vi[e] * vc[e];
            }
            double const dist2 = i == c ? 0.0 : std::max(0.0, mSq[h * mN + i] + mSq[h * mN + c] - 2 * cross);
            s += vcos * std::exp(-0.5 * dist2 + mLogW[h * mN + i] + mLogW[h * mN + c]);
        }
        float const out = static_cast<float>(s);
        return std::isnan(out) ? 0.0F : out;  // a NaN similarity counts as 0
    }

private:
    int64_t mHeads, mN, mDim;
    std::vector<double> mA, mVUnit, mLogW, mSq;
};

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

float mmrScore(float mag, std::optional<float> maxSim, bool finite, Mix const& mix)
{
    float const score = maxSim ? mix.lam * mag - mix.rest * *maxSim : mag;
    return finite ? rankable(score) : kLowest;
}

// PCMMR over one sample, as pcmmr.py: a pool of 2c candidates per step, c of them added by exact greedy.
// `sim(i, c)` is S[i, c]; a NaN similarity counts as 0. `seed`, if given, is taken as the first chunk.
template <typename Sim>
std::vector<int64_t> pcmmr(std::vector<float> const& raw, Sim const& simRaw, int64_t k, double lam, int64_t chunk,
    double growth, std::vector<int64_t> const* seed = nullptr)
{
    int64_t const n = static_cast<int64_t>(raw.size());
    auto sim = [&](int64_t i, int64_t c) {
        float const v = simRaw(i, c);
        return std::isnan(v) ? 0.0F : v;
    };
    Mix const mix(lam);
    if (lam == 1.0 && seed == nullptr)
    {
        std::vector<float> score(n);
        std::transform(raw.begin(), raw.end(), score.begin(), rankable);
        auto out = topIndices(score, k);
        std::sort(out.begin(), out.end());
        return out;
    }
    std::vector<uint8_t> finite(n);
    std::vector<float> mag(n);
    float top = 0.0F;
    for (int64_t i = 0; i < n; ++i)
    {
        finite[i] = std::isfinite(raw[i]);
        mag[i] = finite[i] ? raw[i] : 0.0F;
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
            std::sort(cand.begin(), cand.end());
            std::vector<float> intra(pool * pool);
            for (int64_t p = 0; p < pool; ++p)
            {
                for (int64_t r = 0; r < pool; ++r)
                {
                    intra[p * pool + r] = sim(cand[p], cand[r]);
                }
            }
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
        for (int64_t i = 0; i < n; ++i)
        {
            float s = kNegInf;
            for (int64_t a : added)
            {
                s = std::max(s, sim(i, a));
            }
            maxSim[i] = maxSim[i] ? std::max(*maxSim[i], s) : s;
        }
        done += c;
    }
    std::sort(chosen.begin(), chosen.end());
    return chosen;
}

std::vector<int64_t> topKSorted(std::vector<float> score, int64_t k)
{
    std::transform(score.begin(), score.end(), score.begin(), rankable);
    auto out = topIndices(score, k);
    std::sort(out.begin(), out.end());
    return out;
}

// Cosine of the visual hidden states (rows normalized as F.normalize does): sim(i, c).
class HiddenCosine
{
public:
    HiddenCosine(float const* hidden, int64_t tokens, int64_t dim, int64_t b, int64_t start, int64_t n)
        : mDim(dim)
        , mUnit(n * dim)
    {
        for (int64_t i = 0; i < n; ++i)
        {
            float const* row = hidden + (b * tokens + start + i) * dim;
            double const norm = std::max(std::sqrt(dot(row, row, dim)), kEps);
            for (int64_t e = 0; e < dim; ++e)
            {
                mUnit[i * dim + e] = row[e] / norm;
            }
        }
    }

    float operator()(int64_t i, int64_t c) const
    {
        double s = 0;
        for (int64_t e = 0; e < mDim; ++e)
        {
            s += mUnit[i * mDim + e] * mUnit[c * mDim + e];
        }
        return static_cast<float>(s);
    }

    std::vector<double> const& unit() const
    {
        return mUnit;
    }

private:
    int64_t mDim;
    std::vector<double> mUnit;
};

template <typename T>
py::array_t<T, py::array::c_style> contiguous(py::array const& a, char const* name, int ndim)
{
    auto out = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
    if (!out || out.ndim() != ndim)
    {
        throw std::invalid_argument(std::string("iwp_select: ") + name + " must be a " + std::to_string(ndim)
            + "-d array");
    }
    return out;
}

} // namespace

namespace
{

template <typename T>
T option(py::dict const& options, char const* name)
{
    if (!options.contains(name))
    {
        throw std::invalid_argument(std::string("select: option '") + name + "' is missing");
    }
    return options[name].cast<T>();
}

// Integer hash of (index, seed) as baselines.hash_scores computes it with torch's wrapping int64 ops.
float hashScore(int64_t i, int64_t seed)
{
    int64_t x = i + seed * 7919;
    for (int round = 0; round < 2; ++round)
    {
        auto const wrapped = static_cast<int64_t>(static_cast<uint64_t>(x) * 1103515245ULL + 12345ULL);
        x = wrapped % 2147483648LL;
        x = x < 0 ? x + 2147483648LL : x;  // floor modulo, as torch's %
        x = x ^ (x / 65536);
    }
    return static_cast<float>(x % (1LL << 24));
}

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
        t[i] = n == 1 ? -1.0 : -1.0 + 2.0 * i / (n - 1);
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

} // namespace

// One entry for every method, over the op contract's inputs (LayerView's fields, contiguous):
// hidden [B, T, D]; q, qRot [B, Hq, T, d]; k, kRot, v [B, Hkv, T, d]; keyMask [B, T]; visualStart [B];
// queryIdx, queryMask [B, Q]; lastIdx [B]; visualXy [B, N, 2]; ttv [B, N]. `options` is the method's
// resolved config (every field), so the defaults live in Python only.
py::array_t<int64_t> select(std::string const& method, py::array hiddenIn, py::array qIn, py::array kIn,
    py::array qRotIn, py::array kRotIn, py::array vIn, py::array keyMaskIn, py::array visualStartIn,
    py::array queryIdxIn, py::array queryMaskIn, py::array lastIdxIn, py::array visualXyIn, py::array ttvIn,
    int64_t keep, int64_t stage, int64_t nStages, py::dict const& options)
{
    auto hidden = contiguous<float>(hiddenIn, "hidden", 3);
    auto q = contiguous<float>(qIn, "q", 4);
    auto k = contiguous<float>(kIn, "k", 4);
    auto qRot = contiguous<float>(qRotIn, "q_rot", 4);
    auto kRot = contiguous<float>(kRotIn, "k_rot", 4);
    auto v = contiguous<float>(vIn, "v", 4);
    auto keyMask = contiguous<uint8_t>(keyMaskIn, "key_mask", 2);
    auto visualStart = contiguous<int64_t>(visualStartIn, "visual_start", 1);
    auto queryIdx = contiguous<int64_t>(queryIdxIn, "query_idx", 2);
    auto queryMask = contiguous<uint8_t>(queryMaskIn, "query_mask", 2);
    auto lastIdx = contiguous<int64_t>(lastIdxIn, "last_idx", 1);
    auto visualXy = contiguous<float>(visualXyIn, "visual_xy", 3);
    auto ttv = contiguous<float>(ttvIn, "ttv", 2);
    int64_t const batch = q.shape(0), hq = q.shape(1), t = q.shape(2), d = q.shape(3), hkv = k.shape(1);
    int64_t const n = visualXy.shape(1), width = hidden.shape(2), nq = queryIdx.shape(1);
    if (keep < 1 || keep > n || hq % hkv != 0)
    {
        throw std::invalid_argument("select: need 1 <= keep <= N and query heads a multiple of KV heads");
    }
    Heads const qh{q.data(), hq, t, d}, kh{k.data(), hkv, t, d}, qr{qRot.data(), hq, t, d};
    Heads const kr{kRot.data(), hkv, t, d}, vh{v.data(), hkv, t, d};
    py::array_t<int64_t> out({batch, keep});
    auto result = out.mutable_unchecked<2>();
    for (int64_t b = 0; b < batch; ++b)
    {
        int64_t const start = visualStart.data()[b];
        std::vector<int64_t> const instruction(queryIdx.data() + b * nq, queryIdx.data() + (b + 1) * nq);
        std::vector<uint8_t> const instructionOk(queryMask.data() + b * nq, queryMask.data() + (b + 1) * nq);
        std::vector<int64_t> const last{lastIdx.data()[b]};
        std::vector<uint8_t> const lastOk{1};
        auto attention = [&](Heads const& qs, Heads const& ks, std::vector<double> const* logVnorm, bool useLast) {
            return attentionMean(qs, ks, logVnorm, keyMask.data(), b, start, n, useLast ? last : instruction,
                useLast ? lastOk : instructionOk);
        };
        std::vector<int64_t> chosen;
        if (method == "iwp")
        {
            std::vector<double> logVnorm(hkv * n);
            for (int64_t g = 0; g < hkv; ++g)
            {
                for (int64_t i = 0; i < n; ++i)
                {
                    float const* val = vh.at(b, g, start + i);
                    logVnorm[g * n + i] = std::log(std::max(std::sqrt(dot(val, val, d)), kEps));
                }
            }
            std::string const queries = option<std::string>(options, "queries");
            auto const mag = attention(qh, kh, &logVnorm, queries == "last");
            chosen = pcmmr(mag, UpdateCosine(kr, vh, b, start, n), keep, option<double>(options, "lam"),
                option<int64_t>(options, "chunk"), option<double>(options, "growth"));
        }
        else if (method == "fastv")
        {
            chosen = topKSorted(attention(qr, kr, nullptr, true), keep);
        }
        else if (method == "random")
        {
            std::vector<float> score(n);
            int64_t const seed = option<int64_t>(options, "seed");
            for (int64_t i = 0; i < n; ++i)
            {
                score[i] = hashScore(i, seed);
            }
            chosen = topKSorted(score, keep);
        }
        else if (method == "dart")
        {
            std::vector<float> keyNorm(n, 0.0F);
            for (int64_t i = 0; i < n; ++i)
            {
                double total = 0;
                for (int64_t g = 0; g < hkv; ++g)
                {
                    float const* key = kh.at(b, g, start + i);
                    total += std::sqrt(dot(key, key, d));
                }
                keyNorm[i] = static_cast<float>(total / hkv);
            }
            auto const pivots = topKSorted(keyNorm, std::min(option<int64_t>(options, "pivots"), keep));
            HiddenCosine const cosine(hidden.data(), t, width, b, start, n);
            std::vector<float> score(n);
            for (int64_t i = 0; i < n; ++i)
            {
                float dup = kNegInf;
                bool nan = false;
                for (int64_t p : pivots)
                {
                    float const c = cosine(i, p);
                    nan = nan || std::isnan(c);
                    dup = std::max(dup, c);
                }
                score[i] = rankable(nan ? std::nanf("") : -dup);
            }
            for (int64_t p : pivots)
            {
                score[p] = kMax;  // pivots always stay
            }
            chosen = topKSorted(score, keep);
        }
        else if (method == "divprune")
        {
            HiddenCosine const cosine(hidden.data(), t, width, b, start, n);
            std::vector<double> mean(width, 0.0);
            for (int64_t i = 0; i < n; ++i)
            {
                float const* row = hidden.data() + (b * t + start + i) * width;
                for (int64_t e = 0; e < width; ++e)
                {
                    mean[e] += static_cast<double>(row[e]) / n;
                }
            }
            double const meanNorm = std::sqrt(std::inner_product(mean.begin(), mean.end(), mean.begin(), 0.0));
            std::vector<float> atypical(n);
            for (int64_t i = 0; i < n; ++i)
            {
                double c = 0;
                for (int64_t e = 0; e < width; ++e)
                {
                    c += cosine.unit()[i * width + e] * mean[e];
                }
                atypical[i] = static_cast<float>(1.0 - c / std::max(meanNorm, 1e-8));
            }
            chosen = pcmmr(atypical, cosine, keep, 0.0, 1, 1.0);
        }
        else if (method == "transprune")
        {
            double const alpha = option<double>(options, "alpha");
            auto const iga = sumNormalized(attention(qr, kr, nullptr, false));
            auto const accumulated = sumNormalized(std::vector<float>(ttv.data() + b * n, ttv.data() + (b + 1) * n));
            std::vector<float> score(n);
            float const a = static_cast<float>(alpha), rest = static_cast<float>(1.0 - alpha);
            for (int64_t i = 0; i < n; ++i)
            {
                score[i] = a * accumulated[i] + rest * iga[i];
            }
            chosen = topKSorted(score, keep);
        }
        else if (method == "btp")
        {
            auto attn = attention(qr, kr, nullptr, false);
            if (option<bool>(options, "rebalance"))
            {
                attn = rebalanced(attn);
            }
            std::transform(attn.begin(), attn.end(), attn.begin(), rankable);
            IwpVtsParams plan{};
            plan.keep = keep;
            plan.stage = stage;
            plan.nStages = nStages;
            plan.seedFraction = option<double>(options, "seed_fraction");
            plan.attentionFirst = option<double>(options, "attention_first");
            plan.attentionLast = option<double>(options, "attention_last");
            int64_t const nSeed = vts::btpSeedCount(plan);
            float const* xy = visualXy.data() + b * n * 2;
            auto negDistance = [&](int64_t i, int64_t c) {
                // in float, step by step as the reference computes it: grid distances tie exactly, and
                // double arithmetic would round some of those ties apart
                float const dy = xy[2 * i] - xy[2 * c], dx = xy[2 * i + 1] - xy[2 * c + 1];
                float const dy2 = dy * dy, dx2 = dx * dx;
                return -(dy2 + dx2); // squared: the distance's order, no sqrt (see btp.spatial_spread)
            };
            auto const seed = pcmmr(attn, negDistance, nSeed, 0.0, 1, 1.0);
            if (nSeed == keep)
            {
                chosen = seed;
            }
            else
            {
                chosen = pcmmr(attn, HiddenCosine(hidden.data(), t, width, b, start, n), keep, vts::btpLambda(plan),
                    option<int64_t>(options, "chunk"), option<double>(options, "growth"), &seed);
            }
        }
        else
        {
            throw std::invalid_argument("select: unknown method '" + method + "'");
        }
        for (int64_t j = 0; j < keep; ++j)
        {
            result(b, j) = chosen[j];
        }
    }
    return out;
}

} // namespace iwp

PYBIND11_MODULE(_cpu, m)
{
    m.doc() = "iwp's compiled CPU kernels for VisualTokenSelect";
    m.def("select", &iwp::select, py::arg("method"), py::arg("hidden"), py::arg("q"), py::arg("k"), py::arg("q_rot"),
        py::arg("k_rot"), py::arg("v"), py::arg("key_mask"), py::arg("visual_start"), py::arg("query_idx"),
        py::arg("query_mask"), py::arg("last_idx"), py::arg("visual_xy"), py::arg("ttv"), py::arg("keep"),
        py::arg("stage"), py::arg("n_stages"), py::arg("options"),
        "VisualTokenSelect on the CPU: [B, keep] int64 indices into the visual tokens, ascending.");
}
