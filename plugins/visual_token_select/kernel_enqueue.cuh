// The host side of the kernels: the workspace layout (it depends on the parameters only) and Run<T>, which
// enqueues each method's launch sequence on the caller's stream, with no allocation and no host sync.
#pragma once

#include "kernel_attention.cuh"
#include "kernel_features.cuh"
#include "kernel_pcmmr.cuh"
#include "kernel_scores.cuh"
#include "kernel_similarity.cuh"
#include "kernel_topk.cuh"
#include <algorithm>
#include <cmath>
#include <vector>

namespace iwp
{
namespace vts
{

// ------------------------------------------------------------------------------------------- planning

inline int64_t blocksFor(int64_t work, int64_t threads)
{
    return (work + threads - 1) / threads;
}

// The largest pool any PCMMR run of this method uses (2c capped by the tokens left).
inline int64_t maxPool(IwpVtsParams const& p)
{
    auto poolOf = [&](int64_t keep, int64_t chunk, double growth, int64_t seeded) {
        int64_t best = 1, done = seeded;
        for (int64_t c : chunkSchedule(keep - seeded, chunk, growth))
        {
            best = std::max(best, std::min(2 * c, p.visual - done));
            done += c;
        }
        return best;
    };
    switch (p.method)
    {
    case kIwpVtsIwp: return poolOf(p.keep, p.chunk, p.growth, 0);
    case kIwpVtsDivPrune: return 2;
    case kIwpVtsBtp: return std::max<int64_t>(2, poolOf(p.keep, p.chunk, p.growth, btpSeedCount(p)));
    default: return 1;
    }
}

inline int64_t queryRows(IwpVtsParams const& p)
{
    bool const last = p.method == kIwpVtsFastV || (p.method == kIwpVtsIwp && p.queriesLast);
    return last ? 1 : p.queries;
}

inline bool usesAttention(IwpVtsParams const& p)
{
    return p.method == kIwpVtsIwp || p.method == kIwpVtsFastV || p.method == kIwpVtsTransPrune || p.method == kIwpVtsBtp;
}

inline bool usesHidden(IwpVtsParams const& p)
{
    return p.method == kIwpVtsDart || p.method == kIwpVtsDivPrune || p.method == kIwpVtsBtp;
}

inline bool usesPcmmr(IwpVtsParams const& p)
{
    return p.method == kIwpVtsIwp || p.method == kIwpVtsDivPrune || p.method == kIwpVtsBtp;
}

// Byte offsets of every scratch buffer in the workspace; absent buffers have size 0.
struct Layout
{
    size_t logits, lse, scoreA, scoreB, keys, mag, finite, taken, maxSim, chosen, cand, intra, aux;
    size_t featA, featV, sq, logW, logVnorm, partial, mean, inverse, unit;
    size_t total;

    explicit Layout(IwpVtsParams const& p)
    {
        size_t offset = 0;
        auto take = [&](size_t bytes) {
            size_t const at = offset;
            offset += (bytes + 255) / 256 * 256;
            return at;
        };
        int64_t const b = p.batch, n = p.visual, rows = queryRows(p);
        int64_t const attention = usesAttention(p) ? 1 : 0, hidden = usesHidden(p) ? 1 : 0;
        int64_t const pcmmr = usesPcmmr(p) ? 1 : 0, update = p.method == kIwpVtsIwp ? 1 : 0;
        int64_t const pool = maxPool(p);
        logits = take(sizeof(float) * attention * b * p.queryHeads * rows * p.tokens);
        lse = take(sizeof(float) * attention * b * p.queryHeads * rows);
        scoreA = take(sizeof(float) * b * n);
        scoreB = take(sizeof(float) * b * n);
        keys = take(sizeof(uint32_t) * b * n);
        mag = take(sizeof(float) * pcmmr * b * n);
        finite = take(pcmmr * b * n);
        taken = take(pcmmr * b * n);
        maxSim = take(sizeof(float) * pcmmr * b * n);
        chosen = take(sizeof(int32_t) * b * p.keep);
        cand = take(sizeof(int32_t) * b * pool);
        intra = take(sizeof(float) * pcmmr * b * pool * pool);
        aux = take(sizeof(int32_t) * b * p.keep); // DART's pivots, BTP's seeds
        featA = take(sizeof(float) * update * b * p.kvHeads * p.headDim * n);
        featV = take(sizeof(float) * update * b * p.kvHeads * p.headDim * n);
        sq = take(sizeof(float) * update * b * p.kvHeads * n);
        logW = take(sizeof(float) * update * b * p.kvHeads * n);
        logVnorm = take(sizeof(float) * update * b * p.kvHeads * n);
        int64_t const meanCols = std::max(update * p.kvHeads * p.headDim, hidden * p.width);
        partial = take(sizeof(float) * b * kColumnSlices * meanCols);
        mean = take(sizeof(float) * b * meanCols);
        inverse = take(sizeof(float) * hidden * b * n);
        unit = take(sizeof(float) * hidden * b * p.width * n);
        total = offset;
    }
};

template <typename T>
inline T* at(void* workspace, size_t offset)
{
    return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

// ----------------------------------------------------------------------------------- host: enqueueing

template <typename T>
class Run
{
public:
    Run(IwpVtsParams const& p, void const* const* inputs, void* workspace, cudaStream_t stream)
        : p(p)
        , layout(p)
        , ws(workspace)
        , stream(stream)
        , hidden(static_cast<T const*>(inputs[kIwpVtsHidden]))
        , q(static_cast<T const*>(inputs[kIwpVtsQ]))
        , k(static_cast<T const*>(inputs[kIwpVtsK]))
        , qRot(static_cast<T const*>(inputs[kIwpVtsQRot]))
        , kRot(static_cast<T const*>(inputs[kIwpVtsKRot]))
        , v(static_cast<T const*>(inputs[kIwpVtsV]))
        , keyMask(static_cast<int32_t const*>(inputs[kIwpVtsKeyMask]))
        , visualStart(static_cast<int64_t const*>(inputs[kIwpVtsVisualStart]))
        , queryIdx(static_cast<int64_t const*>(inputs[kIwpVtsQueryIdx]))
        , queryMask(static_cast<int32_t const*>(inputs[kIwpVtsQueryMask]))
        , lastIdx(static_cast<int64_t const*>(inputs[kIwpVtsLastIdx]))
        , visualXy(static_cast<float const*>(inputs[kIwpVtsVisualXy]))
        , ttv(static_cast<float const*>(inputs[kIwpVtsTtv]))
    {
    }

    void select(int64_t* out)
    {
        int64_t const n = p.visual, bn = p.batch * n;
        float* scoreA = at<float>(ws, layout.scoreA);
        float* scoreB = at<float>(ws, layout.scoreB);
        switch (p.method)
        {
        case kIwpVtsIwp:
        {
            updateFeatures();
            bool const last = p.queriesLast != 0;
            attentionMass(q, k, last, at<float>(ws, layout.logVnorm), scoreA);
            SimData const sim{kSimUpdate, p.kvHeads, p.headDim, n, at<float>(ws, layout.featA),
                at<float>(ws, layout.featV), at<float>(ws, layout.sq), at<float>(ws, layout.logW), nullptr};
            pcmmr(scoreA, sim, p.keep, p.lam, p.chunk, p.growth, nullptr, 0, out, nullptr);
            break;
        }
        case kIwpVtsFastV:
            attentionMass(qRot, kRot, true, nullptr, scoreA);
            topSorted(scoreA, p.keep, out);
            break;
        case kIwpVtsRandom:
            IWP_LAUNCH(hashScoreKernel, blocksFor(bn, 256), 256, 0, stream, scoreA, p.batch, n, p.seed);
            topSorted(scoreA, p.keep, out);
            break;
        case kIwpVtsDart:
        {
            int64_t const nPivots = std::min(p.pivots, p.keep);
            int32_t* pivots = at<int32_t>(ws, layout.aux);
            IWP_LAUNCH(keyNormKernel<T>, blocksFor(bn * 32, 256), 256, 0, stream, k, visualStart, scoreA, p.batch, p.kvHeads,
                p.tokens, p.headDim, n);
            IWP_LAUNCH(topSortedKernel<int32_t>, p.batch, kSelectThreads, 0, stream, scoreA, at<uint32_t>(ws, layout.keys),
                pivots, n, nPivots);
            unitRows();
            IWP_LAUNCH(dartScoreKernel, blocksFor(bn, 256), 256, 0, stream, at<float>(ws, layout.unit), pivots, nPivots,
                scoreB, p.batch, p.width, n);
            topSorted(scoreB, p.keep, out);
            break;
        }
        case kIwpVtsDivPrune:
        {
            unitRows();
            columnMean(hidden, 1, p.tokens, p.width, 1.0F);
            IWP_LAUNCH(atypicalKernel, blocksFor(bn, 256), 256, 0, stream, at<float>(ws, layout.unit),
                at<float>(ws, layout.mean), scoreA, p.batch, p.width, n);
            pcmmr(scoreA, hiddenSim(), p.keep, 0.0, 1, 1.0, nullptr, 0, out, nullptr);
            break;
        }
        case kIwpVtsTransPrune:
        {
            attentionMass(qRot, kRot, false, nullptr, scoreA);
            IWP_LAUNCH(sumNormalizeKernel, p.batch, 256, 0, stream, scoreA, scoreA, n);
            IWP_LAUNCH(sumNormalizeKernel, p.batch, 256, 0, stream, ttv, scoreB, n);
            IWP_LAUNCH(mixKernel, blocksFor(bn, 256), 256, 0, stream, scoreB, scoreA, scoreA, bn, static_cast<float>(p.alpha),
                static_cast<float>(1.0 - p.alpha));
            topSorted(scoreA, p.keep, out);
            break;
        }
        case kIwpVtsBtp:
        {
            attentionMass(qRot, kRot, false, nullptr, scoreA);
            if (p.rebalance)
            {
                IWP_LAUNCH(rebalanceKernel, p.batch, 256, 0, stream, scoreA, n); // ends rankable
            }
            else
            {
                IWP_LAUNCH(rankableKernel, blocksFor(bn, 256), 256, 0, stream, scoreA, bn);
            }
            int64_t const nSeed = btpSeedCount(p);
            int32_t* seed = at<int32_t>(ws, layout.aux);
            SimData const xy{kSimXy, 1, 2, n, nullptr, nullptr, nullptr, nullptr, visualXy};
            if (nSeed == p.keep)
            {
                pcmmr(scoreA, xy, nSeed, 0.0, 1, 1.0, nullptr, 0, out, nullptr);
                break;
            }
            pcmmr(scoreA, xy, nSeed, 0.0, 1, 1.0, nullptr, 0, nullptr, seed);
            unitRows();
            pcmmr(scoreA, hiddenSim(), p.keep, btpLambda(p), p.chunk, p.growth, seed, nSeed, out, nullptr);
            break;
        }
        default: break;
        }
    }

private:
    SimData hiddenSim() const
    {
        return SimData{kSimHidden, 1, p.width, p.visual, at<float>(ws, layout.unit), nullptr, nullptr, nullptr, nullptr};
    }

    // Column means of the visual rows: key means per (sample, KV head) or hidden means per sample.
    void columnMean(T const* matrices, int64_t perSample, int64_t rows, int64_t cols, float scale)
    {
        int64_t const m = p.batch * perSample;
        float* partial = at<float>(ws, layout.partial);
        dim3 const grid(static_cast<unsigned>(m), static_cast<unsigned>(blocksFor(cols, 32)), kColumnSlices);
        IWP_LAUNCH(columnSumKernel<T>, grid, dim3(32, 8), 0, stream, matrices, visualStart, partial, perSample, rows, cols,
            p.visual);
        IWP_LAUNCH(columnMeanKernel, blocksFor(m * cols, 256), 256, 0, stream, partial, at<float>(ws, layout.mean), m, cols,
            p.visual, scale);
    }

    void updateFeatures()
    {
        int64_t const n = p.visual;
        float const quarter = std::pow(static_cast<float>(p.headDim), 0.25F);
        columnMean(kRot, p.kvHeads, p.tokens, p.headDim, 1.0F / quarter);
        dim3 const grid(static_cast<unsigned>(blocksFor(n, 16)), static_cast<unsigned>(p.kvHeads),
            static_cast<unsigned>(p.batch));
        IWP_LAUNCH(updateFeaturesKernel<T>, grid, dim3(32, 8), 0, stream, kRot, v, visualStart, at<float>(ws, layout.mean),
            at<float>(ws, layout.featA), at<float>(ws, layout.featV), at<float>(ws, layout.sq),
            at<float>(ws, layout.logW), at<float>(ws, layout.logVnorm), p.kvHeads, p.tokens, p.headDim, n);
        IWP_LAUNCH(headWeightsKernel, blocksFor(p.batch * n, 256), 256, 0, stream, at<float>(ws, layout.logW), p.batch,
            p.kvHeads, n);
    }

    void unitRows()
    {
        int64_t const n = p.visual;
        float* inverse = at<float>(ws, layout.inverse);
        IWP_LAUNCH(inverseNormKernel<T>, blocksFor(p.batch * n * 32, 256), 256, 0, stream, hidden, visualStart, inverse,
            p.batch, p.tokens, p.width, n);
        dim3 const grid(static_cast<unsigned>(blocksFor(n, 32)), static_cast<unsigned>(blocksFor(p.width, 32)),
            static_cast<unsigned>(p.batch));
        IWP_LAUNCH(unitRowsKernel<T>, grid, dim3(32, 8), 0, stream, hidden, visualStart, inverse, at<float>(ws, layout.unit),
            p.tokens, p.width, n);
    }

    void attentionMass(T const* queries, T const* keys, bool last, float const* logVnorm, float* out)
    {
        QuerySet const set = last ? QuerySet{lastIdx, nullptr, 1} : QuerySet{queryIdx, queryMask, p.queries};
        float* logits = at<float>(ws, layout.logits);
        float* lse = at<float>(ws, layout.lse);
        dim3 const grid(static_cast<unsigned>(blocksFor(p.tokens, 128)), static_cast<unsigned>(p.queryHeads),
            static_cast<unsigned>(p.batch));
        // rows staged per pass: one for the last token, else 8 or 16 (a pointer: the name has a comma)
        auto const logitsKernel = set.count == 1 ? attentionLogitsKernel<T, 1>
            : set.count <= 8                     ? attentionLogitsKernel<T, 8>
                                                 : attentionLogitsKernel<T, 16>;
        IWP_LAUNCH(logitsKernel, grid, 128, 0, stream, queries, keys, keyMask, set, logits, p.queryHeads, p.kvHeads,
            p.tokens, p.headDim);
        IWP_LAUNCH(rowLogSumExpKernel, static_cast<unsigned>(p.batch * p.queryHeads * set.count), 256, 0, stream, logits, lse,
            p.tokens);
        dim3 const massGrid(static_cast<unsigned>(blocksFor(p.visual, 256)), static_cast<unsigned>(p.batch));
        IWP_LAUNCH(attentionMassKernel, massGrid, 256, 0, stream, logits, lse, set, visualStart, logVnorm, out, p.queryHeads,
            p.kvHeads, p.tokens, p.visual);
    }

    void topSorted(float const* scores, int64_t keep, int64_t* out)
    {
        IWP_LAUNCH(topSortedKernel<int64_t>, p.batch, kSelectThreads, 0, stream, scores, at<uint32_t>(ws, layout.keys), out,
            p.visual, keep);
    }

    // PCMMR of `raw` under similarity `sim`, with an optional seed taken as the first chunk. The result goes
    // to `out` (int64) or `out32` (int32), ascending.
    void pcmmr(float const* raw, SimData const& sim, int64_t keep, double lam, int64_t chunk, double growth,
        int32_t const* seed, int64_t seeded, int64_t* out, int32_t* out32)
    {
        int64_t const n = p.visual, pool = maxPool(p);
        if (lam == 1.0 && seed == nullptr)
        {
            if (out)
            {
                topSorted(raw, keep, out);
            }
            else
            {
                IWP_LAUNCH(topSortedKernel<int32_t>, p.batch, kSelectThreads, 0, stream, raw, at<uint32_t>(ws, layout.keys),
                    out32, n, keep);
            }
            return;
        }
        PcmmrState const st{at<float>(ws, layout.mag), at<uint8_t>(ws, layout.finite), at<uint8_t>(ws, layout.taken),
            at<float>(ws, layout.maxSim), at<uint32_t>(ws, layout.keys), at<int32_t>(ws, layout.chosen),
            at<int32_t>(ws, layout.cand), at<float>(ws, layout.intra)};
        float const lamF = static_cast<float>(lam), rest = static_cast<float>(1.0 - lam);
        IWP_LAUNCH(pcmmrInitKernel, p.batch, 256, 0, stream, raw, st, n);
        int64_t done = 0;
        dim3 const rowGrid(static_cast<unsigned>(blocksFor(n, 128)), static_cast<unsigned>(p.batch));
        if (seed)
        {
            IWP_LAUNCH(pcmmrSeedKernel, p.batch, 256, 0, stream, seed, seeded, st, keep, n);
            IWP_LAUNCH(similarityKernel<1>, rowGrid, 128, 0, stream, sim, nullptr, n, 0, st.chosen, 0, seeded, keep, st.maxSim, 0);
            done = seeded;
        }
        for (int64_t c : chunkSchedule(keep - seeded, chunk, growth))
        {
            bool const hasSim = done > 0;
            int64_t const poolSize = std::min(2 * c, n - done);
            IWP_LAUNCH(pcmmrPoolKernel, p.batch, kSelectThreads, 0, stream, st, n, poolSize, pool, hasSim, lamF, rest);
            dim3 const poolGrid(static_cast<unsigned>(blocksFor(poolSize, 128)), static_cast<unsigned>(p.batch));
            IWP_LAUNCH(similarityKernel<0>, poolGrid, 128, 0, stream, sim, st.cand, poolSize, pool, st.cand, 0, poolSize, pool,
                st.intra, pool * pool);
            size_t const shared = poolSize * (sizeof(float) + 1);
            IWP_LAUNCH(pcmmrGreedyKernel, p.batch, 256, shared, stream, st, n, keep, poolSize, pool, c, done, hasSim, lamF, rest);
            IWP_LAUNCH(similarityKernel<1>, rowGrid, 128, 0, stream, sim, nullptr, n, 0, st.chosen, done, c, keep, st.maxSim, 0);
            done += c;
        }
        if (out)
        {
            IWP_LAUNCH(takenToIndicesKernel<int64_t>, p.batch, kSelectThreads, 0, stream, st.taken, out, n, keep);
        }
        else
        {
            IWP_LAUNCH(takenToIndicesKernel<int32_t>, p.batch, kSelectThreads, 0, stream, st.taken, out32, n, keep);
        }
    }

    IwpVtsParams const& p;
    Layout const layout;
    void* ws;
    cudaStream_t stream;
    T const *hidden, *q, *k, *qRot, *kRot, *v;
    int32_t const* keyMask;
    int64_t const* visualStart;
    int64_t const* queryIdx;
    int32_t const* queryMask;
    int64_t const* lastIdx;
    float const* visualXy;
    float const* ttv;
};

} // namespace vts
} // namespace iwp
