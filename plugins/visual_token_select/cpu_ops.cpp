// The CPU kernel's building blocks (cpu_ops.h): top-K, the attention means, the update cosines, the hidden
// cosines. Their arithmetic core (threads, panels, dot loops, exp) is cpu_panels.cpp.
#include "cpu_ops.h"

#include <algorithm>
#include <numeric>

namespace iwp
{
namespace cpu
{

std::vector<int64_t> topIndices(std::vector<float> const& score, int64_t k)
{
    std::vector<int64_t> idx(score.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
    idx.resize(k);
    return idx;
}

std::vector<int64_t> topKSorted(std::vector<float> score, int64_t k)
{
    std::transform(score.begin(), score.end(), score.begin(), rankable);
    auto out = topIndices(score, k);
    std::sort(out.begin(), out.end());
    return out;
}


namespace
{

double dot(float const* x, float const* y, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; ++i)
    {
        s += static_cast<double>(x[i]) * y[i];
    }
    return s;
}

} // namespace

std::vector<float> attentionMean(Heads const& q, Heads const& k, double const* vnorm, uint8_t const* keyMask,
    int64_t b, int64_t start, int64_t n, std::vector<int64_t> const& queryPos, std::vector<uint8_t> const& queryOk)
{
    int64_t const groups = q.heads / k.heads, t = k.tokens, d = q.dim;
    double const scale = 1.0 / std::sqrt(static_cast<double>(d));
    std::vector<int64_t> rows; // positions of the valid queries, in order
    for (size_t r = 0; r < queryPos.size(); ++r)
    {
        if (queryOk[r])
        {
            rows.push_back(queryPos[r]);
        }
    }
    int64_t const nRows = static_cast<int64_t>(rows.size());
    // Packing the keys pays off from four query rows on; below (FastV's last token) dot the inputs directly.
    // Both paths sum each logit's products in the same order, so they give the same doubles.
    bool const packed = nRows >= 4;
    std::vector<Panels> keys(packed ? k.heads : 0);
    for (int64_t g = 0; g < static_cast<int64_t>(keys.size()); ++g)
    {
        keys[g] = Panels(t, d);
        for (int64_t j = 0; j < t; ++j)
        {
            float const* key = k.at(b, g, j);
            for (int64_t e = 0; e < d; ++e)
            {
                keys[g].at(j, e) = key[e];
            }
        }
    }
    int64_t const tPad = (t + kLanes - 1) / kLanes * kLanes;
    std::vector<double> partial(q.heads * n, 0.0); // per query head, summed over heads in order below
    parallelFor(q.heads, grainFor(nRows * t * d), [&](int64_t h0, int64_t h1) {
        std::vector<double> logits(nRows * tPad), query(nRows * d);
        std::vector<double const*> xs(nRows);
        std::vector<double*> outs(nRows);
        for (int64_t r = 0; r < nRows; ++r)
        {
            xs[r] = &query[r * d];
        }
        for (int64_t h = h0; h < h1; ++h)
        {
            int64_t const g = h / groups;
            for (int64_t r = 0; r < nRows; ++r)
            {
                float const* row = q.at(b, h, rows[r]);
                std::copy(row, row + d, query.begin() + r * d);
            }
            for (int64_t r = 0; !packed && r < nRows; ++r)
            {
                for (int64_t j = 0; j < t; ++j)
                {
                    logits[r * tPad + j] = dot(q.at(b, h, rows[r]), k.at(b, g, j), d);
                }
            }
            for (int64_t jb = 0; packed && jb < keys[g].panels(); ++jb) // a key panel stays in L1 over every query
            {
                for (int64_t r = 0; r < nRows; ++r)
                {
                    outs[r] = &logits[r * tPad + jb * kLanes];
                }
                panelDots(keys[g].panel(jb), xs.data(), nRows, d, outs.data());
            }
            double* out = &partial[h * n];
            for (int64_t r = 0; r < nRows; ++r)
            {
                double* row = &logits[r * tPad];
                double top = -std::numeric_limits<double>::infinity();
                bool nan = false;
                for (int64_t j = 0; j < t; ++j)
                {
                    bool const visible = j <= rows[r] && keyMask[b * t + j];
                    row[j] = visible ? row[j] * scale : -std::numeric_limits<double>::infinity();
                    nan = nan || std::isnan(row[j]);
                    top = std::max(top, row[j]);
                }
                for (int64_t j = 0; j < t; ++j)
                {
                    row[j] -= top;
                }
                expInPlace(row, t); // softmax numerators, reused for the visual tokens
                double total = 0;
                for (int64_t j = 0; j < t; ++j)
                {
                    total += row[j];
                }
                for (int64_t i = 0; i < n; ++i)
                {
                    double const p = row[start + i] / total;
                    out[i] += nan ? std::nan("") : (vnorm ? p * vnorm[g * n + i] : p);
                }
            }
        }
    });
    double const denom = std::max<double>(1.0, static_cast<double>(nRows * q.heads));
    std::vector<float> mean(n);
    for (int64_t i = 0; i < n; ++i)
    {
        double sum = 0;
        for (int64_t h = 0; h < q.heads; ++h)
        {
            sum += partial[h * n + i];
        }
        mean[i] = static_cast<float>(sum / denom);
    }
    return mean;
}

UpdateCosine::UpdateCosine(Heads const& kRot, Heads const& v, int64_t b, int64_t start, int64_t n)
    : mHeads(kRot.heads)
    , mN(n)
    , mDim(kRot.dim)
    , mA(mHeads)
    , mVUnit(mHeads)
    , mLogW(mHeads * n)
    , mSq(mHeads * n)
{
    double const quarter = std::pow(static_cast<double>(mDim), 0.25);
    std::vector<double> logSelf(mHeads * n);
    parallelFor(mHeads, grainFor(8 * n * mDim), [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h) // heads are independent
        {
            Panels& a = mA[h] = Panels(n, mDim);
            Panels& unit = mVUnit[h] = Panels(n, mDim);
            std::vector<double> mean(mDim, 0.0);
            for (int64_t i = 0; i < n; ++i)
            {
                float const* key = kRot.at(b, h, start + i);
                float const* val = v.at(b, h, start + i);
                double const vnorm = std::max(std::sqrt(dot(val, val, mDim)), kEps);
                double a2 = 0;
                for (int64_t e = 0; e < mDim; ++e)
                {
                    double const x = key[e] / quarter;
                    a2 += x * x;
                    a.at(i, e) = x;
                    unit.at(i, e) = val[e] / vnorm;
                    mean[e] += x / n;
                }
                logSelf[h * n + i] = a2 + 2 * std::log(vnorm);
            }
            for (int64_t i = 0; i < n; ++i) // centred keys: distances unchanged, cancellation removed
            {
                double sq = 0;
                for (int64_t e = 0; e < mDim; ++e)
                {
                    double& x = a.at(i, e);
                    x -= mean[e];
                    sq += x * x;
                }
                mSq[h * n + i] = sq;
            }
        }
    });
    for (int64_t i = 0; i < n; ++i) // log w = ½ log_softmax over heads
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

double UpdateCosine::exponent(int64_t h, int64_t i, int64_t c, double cross) const
{
    double const dist2 = i == c ? 0.0 : std::max(mSq[h * mN + i] + mSq[h * mN + c] - 2 * cross, 0.0);
    return -0.5 * dist2 + mLogW[h * mN + i] + mLogW[h * mN + c]; // <= 0
}

namespace
{

// The rows `tokens` of `from`, packed into panels of their own (the pool of a PCMMR step).
Panels packRows(Panels const& from, std::vector<int64_t> const& tokens)
{
    Panels packed(static_cast<int64_t>(tokens.size()), from.dim());
    for (size_t r = 0; r < tokens.size(); ++r)
    {
        for (int64_t e = 0; e < from.dim(); ++e)
        {
            packed.at(static_cast<int64_t>(r), e) = from.at(tokens[r], e);
        }
    }
    return packed;
}

std::vector<Panels> packRows(std::vector<Panels> const& from, std::vector<int64_t> const& tokens)
{
    std::vector<Panels> out;
    for (Panels const& heads : from)
    {
        out.push_back(packRows(heads, tokens));
    }
    return out;
}

} // namespace

void UpdateCosine::evaluate(std::vector<Panels> const& a, std::vector<Panels> const& v, int64_t const* tokens,
    std::vector<int64_t> const& cols, bool byRow, std::vector<float>& out) const
{
    int64_t const nc = static_cast<int64_t>(cols.size()), rows = a[0].rows();
    out.assign(nc * rows, 0.0F);
    std::vector<std::vector<double>> colA(mHeads * nc), colV(mHeads * nc); // [h][j]: the columns' rows
    std::vector<double const*> aRows(mHeads * nc), vRows(mHeads * nc);
    for (int64_t h = 0; h < mHeads; ++h)
    {
        for (int64_t j = 0; j < nc; ++j)
        {
            colA[h * nc + j] = mA[h].row(cols[j]);
            colV[h * nc + j] = mVUnit[h].row(cols[j]);
            aRows[h * nc + j] = colA[h * nc + j].data();
            vRows[h * nc + j] = colV[h * nc + j].data();
        }
    }
    parallelFor(a[0].panels(), grainFor(2 * kLanes * nc * mHeads * mDim), [&](int64_t p0, int64_t p1) {
        std::vector<double> cross(nc * kLanes), vcos(nc * kLanes), s(nc * kLanes), e(nc * kLanes);
        std::vector<double*> crossOut(nc), vcosOut(nc);
        for (int64_t j = 0; j < nc; ++j)
        {
            crossOut[j] = &cross[j * kLanes];
            vcosOut[j] = &vcos[j * kLanes];
        }
        for (int64_t pb = p0; pb < p1; ++pb)
        {
            int64_t const lanes = std::min(kLanes, rows - pb * kLanes);
            std::fill(s.begin(), s.end(), 0.0);
            for (int64_t h = 0; h < mHeads; ++h) // heads in order, as the pair path sums them
            {
                panelDots(a[h].panel(pb), &aRows[h * nc], nc, mDim, crossOut.data());
                panelDots(v[h].panel(pb), &vRows[h * nc], nc, mDim, vcosOut.data());
                for (int64_t j = 0; j < nc; ++j)
                {
                    for (int64_t l = 0; l < kLanes; ++l) // padding lanes compute a harmless exp(0)
                    {
                        int64_t const r = pb * kLanes + l, i = tokens ? tokens[std::min(r, rows - 1)] : r;
                        e[j * kLanes + l] = l < lanes ? exponent(h, i, cols[j], cross[j * kLanes + l]) : 0.0;
                    }
                }
                expInPlace(e.data(), nc * kLanes);
                for (int64_t q = 0; q < nc * kLanes; ++q)
                {
                    s[q] += vcos[q] * e[q];
                }
            }
            for (int64_t j = 0; j < nc; ++j)
            {
                for (int64_t l = 0; l < lanes; ++l)
                {
                    int64_t const r = pb * kLanes + l;
                    out[byRow ? r * nc + j : j * rows + r] = cleanSimilarity(static_cast<float>(s[j * kLanes + l]));
                }
            }
        }
    });
}

void UpdateCosine::columns(std::vector<int64_t> const& cols, std::vector<float>& out) const
{
    evaluate(mA, mVUnit, nullptr, cols, false, out);
}

void UpdateCosine::block(std::vector<int64_t> const& rows, std::vector<int64_t> const& cols, std::vector<float>& out) const
{
    evaluate(packRows(mA, rows), packRows(mVUnit, rows), rows.data(), cols, true, out);
}

HiddenCosine::HiddenCosine(float const* hidden, int64_t tokens, int64_t width, int64_t b, int64_t start, int64_t n)
    : mUnit(n, width)
{
    // rows write disjoint lanes of the panels
    parallelFor(n, grainFor(3 * width), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
        {
            float const* row = hidden + (b * tokens + start + i) * width;
            double const norm = std::max(std::sqrt(dot(row, row, width)), kEps);
            for (int64_t e = 0; e < width; ++e)
            {
                mUnit.at(i, e) = row[e] / norm;
            }
        }
    });
}

void HiddenCosine::evaluate(Panels const& unit, std::vector<int64_t> const& cols, bool byRow, std::vector<float>& out) const
{
    int64_t const nc = static_cast<int64_t>(cols.size()), rows = unit.rows(), width = unit.dim();
    out.assign(nc * rows, 0.0F);
    std::vector<std::vector<double>> colRows(nc);
    std::vector<double const*> xs(nc);
    for (int64_t j = 0; j < nc; ++j)
    {
        colRows[j] = mUnit.row(cols[j]);
        xs[j] = colRows[j].data();
    }
    auto store = [&](int64_t pb, int64_t j, double const* acc) {
        for (int64_t l = 0; l < kLanes && pb * kLanes + l < rows; ++l)
        {
            int64_t const r = pb * kLanes + l;
            out[byRow ? r * nc + j : j * rows + r] = static_cast<float>(acc[l]);
        }
    };
    if (nc < 4) // DivPrune's one column a step: four panels at a time against it instead
    {
        int64_t const groups = (unit.panels() + 3) / 4;
        parallelFor(groups, grainFor(4 * kLanes * nc * width), [&](int64_t g0, int64_t g1) {
            double acc[4][kLanes];
            double* outs[4] = {acc[0], acc[1], acc[2], acc[3]};
            for (int64_t g = g0; g < g1; ++g)
            {
                double const* panels[4];
                for (int64_t q = 0; q < 4; ++q) // a short last group repeats its first panel
                {
                    panels[q] = unit.panel(std::min(4 * g + q, unit.panels() - 1));
                }
                for (int64_t j = 0; j < nc; ++j)
                {
                    panelsDot4(panels, xs[j], width, outs);
                    for (int64_t q = 0; q < 4 && 4 * g + q < unit.panels(); ++q)
                    {
                        store(4 * g + q, j, acc[q]);
                    }
                }
            }
        });
        return;
    }
    parallelFor(unit.panels(), grainFor(kLanes * nc * width), [&](int64_t p0, int64_t p1) {
        std::vector<double> acc(nc * kLanes);
        std::vector<double*> outs(nc);
        for (int64_t j = 0; j < nc; ++j)
        {
            outs[j] = &acc[j * kLanes];
        }
        for (int64_t pb = p0; pb < p1; ++pb)
        {
            panelDots(unit.panel(pb), xs.data(), nc, width, outs.data());
            for (int64_t j = 0; j < nc; ++j)
            {
                store(pb, j, &acc[j * kLanes]);
            }
        }
    });
}

void HiddenCosine::columns(std::vector<int64_t> const& cols, std::vector<float>& out) const
{
    evaluate(mUnit, cols, false, out);
}

void HiddenCosine::block(std::vector<int64_t> const& rows, std::vector<int64_t> const& cols, std::vector<float>& out) const
{
    evaluate(packRows(mUnit, rows), cols, true, out);
}

std::vector<double> HiddenCosine::dotAll(std::vector<double> const& x) const
{
    int64_t const n = mUnit.rows();
    std::vector<double> out(n);
    double acc[kLanes];
    double const* xs[1] = {x.data()};
    double* outs[1] = {acc};
    for (int64_t pb = 0; pb < mUnit.panels(); ++pb)
    {
        panelDots(mUnit.panel(pb), xs, 1, mUnit.dim(), outs);
        for (int64_t l = 0; l < kLanes && pb * kLanes + l < n; ++l)
        {
            out[pb * kLanes + l] = acc[l];
        }
    }
    return out;
}

void GridDistance::block(std::vector<int64_t> const& rows, std::vector<int64_t> const& cols, std::vector<float>& out) const
{
    out.assign(rows.size() * cols.size(), 0.0F);
    for (size_t r = 0; r < rows.size(); ++r)
    {
        for (size_t j = 0; j < cols.size(); ++j)
        {
            out[r * cols.size() + j] = (*this)(rows[r], cols[j]);
        }
    }
}

void GridDistance::columns(std::vector<int64_t> const& cols, std::vector<float>& out) const
{
    out.assign(cols.size() * mN, 0.0F);
    for (size_t j = 0; j < cols.size(); ++j)
    {
        for (int64_t i = 0; i < mN; ++i)
        {
            out[j * mN + i] = (*this)(i, cols[j]);
        }
    }
}

} // namespace cpu
} // namespace iwp
