// The CPU kernel's arithmetic core (cpu_ops.h): the thread split, the packed double panels, the dot-product
// loops (portable vector code, or AVX2 fused multiply-adds where the CPU has FMA, chosen once at load) and the
// vectorized exp. Everything that decides the selection's numbers is here.
#include "cpu_ops.h"

#include <algorithm>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <exception>
#include <thread>

namespace iwp
{
namespace cpu
{

int64_t grainFor(int64_t workPerItem)
{
    constexpr int64_t kWorkPerWorker = int64_t{1} << 18; // ~0.1 ms of multiply-adds: several thread starts
    return std::max<int64_t>(1, (kWorkPerWorker + workPerItem - 1) / std::max<int64_t>(1, workPerItem));
}

void parallelFor(int64_t n, int64_t grain, std::function<void(int64_t, int64_t)> const& body)
{
    static int64_t const workers = std::max<int64_t>(1, std::thread::hardware_concurrency());
    int64_t const parts = std::min<int64_t>(workers, n / std::max<int64_t>(1, grain));
    if (parts <= 1)
    {
        if (n > 0)
        {
            body(0, n);
        }
        return;
    }
    // a worker's exception is rethrown here, on the caller's thread
    std::vector<std::exception_ptr> errors(parts);
    auto run = [&](int64_t w) {
        try
        {
            body(w * n / parts, (w + 1) * n / parts);
        }
        catch (...)
        {
            errors[w] = std::current_exception();
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(parts - 1);
    for (int64_t w = 1; w < parts; ++w)
    {
        threads.emplace_back(run, w);
    }
    run(0);
    for (std::thread& t : threads)
    {
        t.join();
    }
    for (std::exception_ptr const& e : errors)
    {
        if (e)
        {
            std::rethrow_exception(e);
        }
    }
}

Panels::Panels(int64_t rows, int64_t dim)
    : mRows(rows)
    , mDim(dim)
    , mData(((rows + kLanes - 1) / kLanes) * dim * kLanes, 0.0)
{
}

std::vector<double> Panels::row(int64_t r) const
{
    std::vector<double> out(mDim);
    for (int64_t e = 0; e < mDim; ++e)
    {
        out[e] = at(r, e);
    }
    return out;
}

// The one hot loop: four (panel, vector) pairs at a time, eight independent sums per pair, each over e in
// order. panelDot4 shares one panel between four vectors (a PCMMR step's columns, the attention's queries);
// panelsDot4 shares one vector between four panels (a column asked for alone). GCC and Clang's vector
// extension spells the eight lanes as two 4-double vectors, lowered to SSE2 (or NEON) pairs; on x86-64 GCC also
// builds an AVX2 clone. Where the CPU has FMA, the intrinsics versions below run instead.
#if defined(__GNUC__)
typedef double Double4 __attribute__((vector_size(32)));

void store4(Double4 const* lo, Double4 const* hi, double* const* out)
{
    for (int r = 0; r < 4; ++r)
    {
        std::memcpy(out[r], &lo[r], sizeof(lo[r]));
        std::memcpy(out[r] + 4, &hi[r], sizeof(hi[r]));
    }
}

#if defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void panelDot4Portable(double const* panel, double const* const* x, int64_t dim, double* const* out)
{
    Double4 lo[4] = {}, hi[4] = {};
    for (int64_t e = 0; e < dim; ++e)
    {
        Double4 p0, p1;
        std::memcpy(&p0, panel + e * kLanes, sizeof(p0));
        std::memcpy(&p1, panel + e * kLanes + 4, sizeof(p1));
        for (int r = 0; r < 4; ++r)
        {
            Double4 const xe = {x[r][e], x[r][e], x[r][e], x[r][e]};
            lo[r] += xe * p0;
            hi[r] += xe * p1;
        }
    }
    store4(lo, hi, out);
}

#if defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void panelsDot4Portable(double const* const* panel, double const* x, int64_t dim, double* const* out)
{
    Double4 lo[4] = {}, hi[4] = {};
    for (int64_t e = 0; e < dim; ++e)
    {
        Double4 const xe = {x[e], x[e], x[e], x[e]};
        for (int r = 0; r < 4; ++r)
        {
            Double4 p0, p1;
            std::memcpy(&p0, panel[r] + e * kLanes, sizeof(p0));
            std::memcpy(&p1, panel[r] + e * kLanes + 4, sizeof(p1));
            lo[r] += xe * p0;
            hi[r] += xe * p1;
        }
    }
    store4(lo, hi, out);
}
#else
// Any other compiler: the same sums, one pair at a time.
void dot4(double const* const* panel, double const* const* x, int64_t dim, double* const* out)
{
    for (int r = 0; r < 4; ++r)
    {
        double acc[kLanes] = {};
        for (int64_t e = 0; e < dim; ++e)
        {
            for (int64_t l = 0; l < kLanes; ++l)
            {
                acc[l] += x[r][e] * panel[r][e * kLanes + l];
            }
        }
        std::copy(acc, acc + kLanes, out[r]);
    }
}

void panelDot4Portable(double const* panel, double const* const* x, int64_t dim, double* const* out)
{
    double const* panels[4] = {panel, panel, panel, panel};
    dot4(panels, x, dim, out);
}

void panelsDot4Portable(double const* const* panel, double const* x, int64_t dim, double* const* out)
{
    double const* xs[4] = {x, x, x, x};
    dot4(panel, xs, dim, out);
}
#endif

// x[i] <- exp(x[i]) for x <= 709, vectorized (the libm call is a third of the kernel's time otherwise).
// Cody-Waite reduction x = k·ln2 + r, |r| <= ln2/2, then the degree-13 Taylor polynomial of e^r (truncation
// below 1e-17) and 2^k from the exponent bits: within a couple of ulps of libm, and bitwise the same in the
// vector and scalar lanes. Results below the smallest normal double flush to 0 (they are 0 as floats too).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void expInPlace(double* x, int64_t n)
{
    constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 6.93147180369123816490e-01;
    constexpr double kLn2Lo = 1.90821492927058770002e-10, kShifter = 6755399441055744.0; // 1.5·2^52
    constexpr double kLow = -708.39, kHigh = 709.0;
    uint64_t shifterBits;
    std::memcpy(&shifterBits, &kShifter, sizeof(shifterBits));
    for (int64_t i = 0; i < n; ++i)
    {
        double const v = x[i];
        double xc = v < kLow ? kLow : v; // NaN passes both clamps and stays NaN
        xc = xc > kHigh ? kHigh : xc;
        double const t = xc * kLog2e + kShifter; // k = round(x·log2 e) in the low mantissa bits
        double const kd = t - kShifter;
        double const r = (xc - kd * kLn2Hi) - kd * kLn2Lo;
        double p = 1.0 / 6227020800.0; // 1/13!
        p = p * r + 1.0 / 479001600.0;
        p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;
        p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        uint64_t tBits;
        std::memcpy(&tBits, &t, sizeof(tBits));
        uint64_t const scaleBits = (tBits - shifterBits + 1023U) << 52; // 2^k
        double scale;
        std::memcpy(&scale, &scaleBits, sizeof(scale));
        double const e = p * scale;
        x[i] = v < kLow ? 0.0 : (v > kHigh ? std::numeric_limits<double>::infinity() : e);
    }
}

// With FMA (x86-64 since Haswell), the same loops as fused multiply-adds: twice the throughput. A fused
// multiply-add rounds once where the portable loop rounds twice, so on such a CPU a dot product can differ in
// its last bit from one without FMA; every path of one machine uses the same loop, so the results stay
// deterministic there, and a block and a column still agree.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void panelDot4Fma(
    double const* panel, double const* const* x, int64_t dim, double* const* out)
{
    __m256d lo[4], hi[4];
    for (int r = 0; r < 4; ++r)
    {
        lo[r] = _mm256_setzero_pd();
        hi[r] = _mm256_setzero_pd();
    }
    for (int64_t e = 0; e < dim; ++e)
    {
        __m256d const p0 = _mm256_loadu_pd(panel + e * kLanes), p1 = _mm256_loadu_pd(panel + e * kLanes + 4);
        for (int r = 0; r < 4; ++r)
        {
            __m256d const xe = _mm256_broadcast_sd(x[r] + e);
            lo[r] = _mm256_fmadd_pd(xe, p0, lo[r]);
            hi[r] = _mm256_fmadd_pd(xe, p1, hi[r]);
        }
    }
    for (int r = 0; r < 4; ++r)
    {
        _mm256_storeu_pd(out[r], lo[r]);
        _mm256_storeu_pd(out[r] + 4, hi[r]);
    }
}

__attribute__((target("avx2,fma"))) void panelsDot4Fma(
    double const* const* panel, double const* x, int64_t dim, double* const* out)
{
    __m256d lo[4], hi[4];
    for (int r = 0; r < 4; ++r)
    {
        lo[r] = _mm256_setzero_pd();
        hi[r] = _mm256_setzero_pd();
    }
    for (int64_t e = 0; e < dim; ++e)
    {
        __m256d const xe = _mm256_broadcast_sd(x + e);
        for (int r = 0; r < 4; ++r)
        {
            lo[r] = _mm256_fmadd_pd(xe, _mm256_loadu_pd(panel[r] + e * kLanes), lo[r]);
            hi[r] = _mm256_fmadd_pd(xe, _mm256_loadu_pd(panel[r] + e * kLanes + 4), hi[r]);
        }
    }
    for (int r = 0; r < 4; ++r)
    {
        _mm256_storeu_pd(out[r], lo[r]);
        _mm256_storeu_pd(out[r] + 4, hi[r]);
    }
}

bool hasFma()
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool hasFma()
{
    return false;
}
#endif

// Chosen once, at load.
using PanelDot4 = void (*)(double const*, double const* const*, int64_t, double* const*);
using PanelsDot4 = void (*)(double const* const*, double const*, int64_t, double* const*);
#if defined(__x86_64__) && defined(__GNUC__)
PanelDot4 const kPanelDot4 = hasFma() ? panelDot4Fma : panelDot4Portable;
PanelsDot4 const kPanelsDot4 = hasFma() ? panelsDot4Fma : panelsDot4Portable;
#else
PanelDot4 const kPanelDot4 = panelDot4Portable;
PanelsDot4 const kPanelsDot4 = panelsDot4Portable;
#endif

void panelsDot4(double const* const* panel, double const* x, int64_t dim, double* const* out)
{
    kPanelsDot4(panel, x, dim, out);
}

void panelDots(double const* panel, double const* const* x, int64_t count, int64_t dim, double* const* out)
{
    double spare[4][kLanes];
    for (int64_t r = 0; r < count; r += 4)
    {
        double const* xs[4];
        double* outs[4];
        for (int64_t j = 0; j < 4; ++j) // a short last group repeats its first vector into spare outputs
        {
            xs[j] = r + j < count ? x[r + j] : x[r];
            outs[j] = r + j < count ? out[r + j] : spare[j];
        }
        kPanelDot4(panel, xs, dim, outs);
    }
}

} // namespace cpu
} // namespace iwp
