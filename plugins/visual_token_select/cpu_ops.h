// The CPU kernel's building blocks (cpu.cpp composes them into the methods): ranking, the worker threads,
// packed panels, the vector exp, attention means and the similarities PCMMR runs over.
//
// Speed without giving up the reference's numbers: every dot product is in double and sums over the vector in
// ascending order, from 0, whichever code path asks for it. The fast paths only change *which* dot products
// run together: eight rows at a time from a packed panel [rows/8][dim][8], against four vectors at once,
// vectorized across the rows (SSE2 by default, AVX2 fused multiply-adds where the CPU has FMA, chosen at
// load). A similarity computed in a pool block and in a whole column is therefore the same double. Products
// of two floats (the attention logits) are exact in double, so there FMA changes nothing at all.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace iwp
{
namespace cpu
{

constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr float kMax = std::numeric_limits<float>::max();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kEps = 1e-12;
constexpr int64_t kLanes = 8; // rows per panel: one 64-byte line of doubles

// The ranking rule: NaN and -inf rank last (as the lowest finite float), +inf as the largest finite float.
inline float rankable(float x)
{
    if (std::isnan(x) || x == kNegInf)
    {
        return kLowest;
    }
    return x == kPosInf ? kMax : x;
}

// A NaN similarity counts as 0 (no evidence of duplication).
inline float cleanSimilarity(float x)
{
    return std::isnan(x) ? 0.0F : x;
}

// Indices of the k largest scores, ties to the lower index, in rank order.
std::vector<int64_t> topIndices(std::vector<float> const& score, int64_t k);

// The selection output of a plain top-K method: the k best of rankable(score), ascending.
std::vector<int64_t> topKSorted(std::vector<float> score, int64_t k);

// body(begin, end) over a static split of [0, n) into contiguous ranges, one per worker
// (std::thread::hardware_concurrency), the calling thread taking the first. Inline when n < 2·grain.
void parallelFor(int64_t n, int64_t grain, std::function<void(int64_t, int64_t)> const& body);

// The items a worker must get before another thread is worth starting, for items of this many operations.
int64_t grainFor(int64_t workPerItem);

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

// `rows` vectors of `dim` doubles packed as panels [ceil(rows/8)][dim][8]; padding rows are 0.
class Panels
{
public:
    Panels() = default;
    Panels(int64_t rows, int64_t dim);
    double& at(int64_t row, int64_t e)
    {
        return mData[((row / kLanes) * mDim + e) * kLanes + row % kLanes];
    }
    double at(int64_t row, int64_t e) const
    {
        return mData[((row / kLanes) * mDim + e) * kLanes + row % kLanes];
    }
    double const* panel(int64_t index) const
    {
        return mData.data() + index * mDim * kLanes;
    }
    int64_t panels() const
    {
        return (mRows + kLanes - 1) / kLanes;
    }
    int64_t rows() const
    {
        return mRows;
    }
    int64_t dim() const
    {
        return mDim;
    }
    std::vector<double> row(int64_t r) const;

private:
    int64_t mRows = 0, mDim = 0;
    std::vector<double> mData;
};

// x[i] <- e^x[i] (x <= 709; below the smallest normal result, 0), the same double in every lane.
void expInPlace(double* x, int64_t n);

// out[r][l] = Σ_e x[r][e]·panel[e][l], e ascending from 0, for the panel's 8 rows and `count` vectors x[r].
void panelDots(double const* panel, double const* const* x, int64_t count, int64_t dim, double* const* out);

// out[j][l] = Σ_e x[e]·panel[j][e][l] for four panels against one vector (a column asked for alone).
void panelsDot4(double const* const* panel, double const* x, int64_t dim, double* const* out);

// Mean over query heads and valid queries of the attention probability of each visual token, times its value
// norm when `vnorm` ([Hkv, n], or null) is given: [n]. With q, k without RoPE and value norms this is IWP's
// magnitude; with RoPE and no norms, the attention FastV, TransPrune and BTP rank.
std::vector<float> attentionMean(Heads const& q, Heads const& k, double const* vnorm, uint8_t const* keyMask,
    int64_t b, int64_t start, int64_t n, std::vector<int64_t> const& queryPos, std::vector<uint8_t> const& queryOk);

// S[i, c] of IWP's rank-1 updates: a head-weighted RBF kernel on centred keys times the value cosine.
class UpdateCosine
{
public:
    UpdateCosine(Heads const& kRot, Heads const& v, int64_t b, int64_t start, int64_t n);
    // out[j·n + i] = S[i, cols[j]] for every token i
    void columns(std::vector<int64_t> const& cols, std::vector<float>& out) const;
    // out[r·|cols| + j] = S[rows[r], cols[j]]
    void block(std::vector<int64_t> const& rows, std::vector<int64_t> const& cols, std::vector<float>& out) const;

private:
    double exponent(int64_t h, int64_t i, int64_t c, double cross) const;
    // S[token(r), cols[j]] for the rows r of the panels `a`, `v` (token(r) = tokens[r], or r when null)
    void evaluate(std::vector<Panels> const& a, std::vector<Panels> const& v, int64_t const* tokens,
        std::vector<int64_t> const& cols, bool byRow, std::vector<float>& out) const;
    int64_t mHeads, mN, mDim;
    std::vector<Panels> mA, mVUnit; // per KV head
    std::vector<double> mLogW, mSq; // [Hkv, n]
};

// Cosine of the visual hidden states (rows normalized as F.normalize does).
class HiddenCosine
{
public:
    HiddenCosine(float const* hidden, int64_t tokens, int64_t width, int64_t b, int64_t start, int64_t n);
    void columns(std::vector<int64_t> const& cols, std::vector<float>& out) const;
    void block(std::vector<int64_t> const& rows, std::vector<int64_t> const& cols, std::vector<float>& out) const;
    // Σ_e unit[i][e]·x[e] for every row i, in the same order as a pair's cosine
    std::vector<double> dotAll(std::vector<double> const& x) const;

private:
    void evaluate(Panels const& unit, std::vector<int64_t> const& cols, bool byRow, std::vector<float>& out) const;
    Panels mUnit;
};

// Minus the squared distance on the patch grid, in float step by step as the reference computes it: grid
// distances tie exactly, and double arithmetic would round some of those ties apart.
class GridDistance
{
public:
    explicit GridDistance(float const* xy, int64_t n)
        : mXy(xy)
        , mN(n)
    {
    }
    float operator()(int64_t i, int64_t c) const
    {
        float const dy = mXy[2 * i] - mXy[2 * c], dx = mXy[2 * i + 1] - mXy[2 * c + 1];
        float const dy2 = dy * dy, dx2 = dx * dx;
        return -(dy2 + dx2); // squared: the distance's order, no sqrt (see btp.spatial_spread)
    }
    void columns(std::vector<int64_t> const& cols, std::vector<float>& out) const;
    void block(std::vector<int64_t> const& rows, std::vector<int64_t> const& cols, std::vector<float>& out) const;

private:
    float const* mXy;
    int64_t mN;
};

} // namespace cpu
} // namespace iwp
