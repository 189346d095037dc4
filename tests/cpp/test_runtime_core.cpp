// C++ tests of the runtime core: the KV arena, the samplers and the decode loop. Built by CMake
// (runtime/CMakeLists.txt) and run by `make test`; exits non-zero on the first failed check.
#include "generate.h"
#include "kv_arena.h"
#include "sampler.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace
{
int gChecks = 0;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        ++gChecks;                                                                                                     \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                              \
            std::exit(1);                                                                                              \
        }                                                                                                              \
    } while (0)

template <typename F>
bool throws(F f)
{
    try
    {
        f();
    }
    catch (std::exception const&)
    {
        return true;
    }
    return false;
}

using iwp::KvArena;
using iwp::KvLayout;
using iwp::Sampler;

void arenaSizesFollowTheLayout()
{
    KvLayout const layout{{10, 10, 4}, 2, 8, 4};
    CHECK(layout.keyBytes(0) == 2 * 10 * 8 * 4);
    CHECK(layout.keyBytes(2) == 2 * 4 * 8 * 4);
    CHECK(layout.validBytes(2) == 4);
    // each buffer rounded up to 256 bytes: (768 + 768 + 256) * 2 layers + (256 + 256 + 256)
    CHECK(layout.setBytes() == 2 * (768 + 768 + 256) + 3 * 256);
    CHECK(layout.unprunedSetBytes(10) == 3 * (768 + 768 + 256));
    CHECK(layout.unprunedSetBytes(10) > layout.setBytes());
    KvArena arena(layout);
    CHECK(arena.bytes() == 2 * layout.setBytes());
}

void arenaBuffersAreDistinctAlignedAndPingPong()
{
    KvArena arena(KvLayout{{6, 3}, 2, 4, 2});
    std::set<void const*> seen;
    for (int set = 0; set < 2; ++set)
    {
        for (size_t layer = 0; layer < 2; ++layer)
        {
            void const* buffers[] = {arena.key(set, layer), arena.value(set, layer), arena.valid(set, layer)};
            for (void const* p : buffers)
            {
                CHECK(reinterpret_cast<uintptr_t>(p) % 256 == 0);
                CHECK(seen.insert(p).second);
            }
        }
    }
    CHECK(arena.past() == 0 && arena.present() == 1);
    arena.swap();
    CHECK(arena.past() == 1 && arena.present() == 0);
    // writing one set leaves the other alone; reset zeroes everything and makes set 0 the past
    std::memset(arena.key(0, 1), 0x7F, arena.layout().keyBytes(1));
    arena.valid(1, 0)[5] = 1;
    CHECK(static_cast<unsigned char*>(arena.key(1, 1))[0] == 0);
    arena.reset();
    CHECK(arena.past() == 0 && arena.valid(1, 0)[5] == 0 && static_cast<unsigned char*>(arena.key(0, 1))[3] == 0);
    CHECK(throws([&] { arena.key(2, 0); }));
    CHECK(throws([&] { arena.valid(0, 2); }));
}

void arenaRefusesBadLayouts()
{
    CHECK(throws([] { KvArena(KvLayout{{}, 2, 4, 4}); }));
    CHECK(throws([] { KvArena(KvLayout{{4, 0}, 2, 4, 4}); }));
    CHECK(throws([] { KvArena(KvLayout{{4}, 0, 4, 4}); }));
    CHECK(throws([] { KvArena(KvLayout{{4}, 2, 4, 3}); }));
}

std::vector<float> logProbs(std::vector<double> const& p)
{
    std::vector<float> out;
    for (double x : p)
    {
        out.push_back(static_cast<float>(std::log(x)));
    }
    return out;
}

void greedyTakesTheFirstMaximum()
{
    Sampler greedy;
    std::vector<float> const logits{0.1F, 3.0F, -1.0F, 3.0F};
    CHECK(greedy.sample(logits.data(), logits.size()) == 1);
}

void samplingIsSeededAndFollowsTheDistribution()
{
    auto const logits = logProbs({0.5, 0.3, 0.2});
    Sampler a(1.0, 1.0, 42), b(1.0, 1.0, 42), c(1.0, 1.0, 43);
    std::vector<int> counts(3, 0);
    bool differs = false;
    int const draws = 20000;
    for (int i = 0; i < draws; ++i)
    {
        int const x = a.sample(logits.data(), 3);
        CHECK(x == b.sample(logits.data(), 3));
        differs = differs || x != c.sample(logits.data(), 3);
        ++counts[x];
    }
    CHECK(differs);
    CHECK(std::fabs(counts[0] / double(draws) - 0.5) < 0.02);
    CHECK(std::fabs(counts[1] / double(draws) - 0.3) < 0.02);
    CHECK(std::fabs(counts[2] / double(draws) - 0.2) < 0.02);
}

void topPKeepsTheSmallestPrefix()
{
    auto const logits = logProbs({0.5, 0.3, 0.2});
    Sampler nucleus(1.0, 0.6, 7); // keeps {0, 1}: the mass before 1 is 0.5 < 0.6, before 2 it is 0.8
    std::vector<int> counts(3, 0);
    for (int i = 0; i < 10000; ++i)
    {
        ++counts[nucleus.sample(logits.data(), 3)];
    }
    CHECK(counts[2] == 0);
    CHECK(std::fabs(counts[0] / 10000.0 - 0.5 / 0.8) < 0.03);
    Sampler tiny(1.0, 1e-9, 7); // only the most likely token
    for (int i = 0; i < 100; ++i)
    {
        CHECK(tiny.sample(logits.data(), 3) == 0);
    }
    Sampler hot(100.0, 1.0, 1), cold(0.01, 1.0, 1); // temperature flattens or sharpens
    std::set<int> spread;
    for (int i = 0; i < 200; ++i)
    {
        spread.insert(hot.sample(logits.data(), 3));
        CHECK(cold.sample(logits.data(), 3) == 0);
    }
    CHECK(spread.size() == 3);
}

void samplerRefusesBadParameters()
{
    CHECK(throws([] { Sampler(-0.1, 1.0, 0); }));
    CHECK(throws([] { Sampler(1.0, 0.0, 0); }));
    CHECK(throws([] { Sampler(1.0, 1.5, 0); }));
    CHECK(throws([] { Sampler(std::nan(""), 1.0, 0); }));
    Sampler s;
    CHECK(throws([&] { s.sample(nullptr, 0); }));
}

// A scripted backend: logits peaked at a chosen token per step; records what the loop fed it.
class ScriptedBackend : public iwp::Backend
{
public:
    explicit ScriptedBackend(std::vector<int32_t> script)
        : mScript(std::move(script))
        , mLogits(8, 0.0F)
    {
    }
    float const* decode(int32_t token, int64_t position, int64_t step, KvArena& arena) override
    {
        fed.push_back({token, position, step, arena.past()});
        std::fill(mLogits.begin(), mLogits.end(), 0.0F);
        mLogits[mScript.at(static_cast<size_t>(step))] = 10.0F;
        return mLogits.data();
    }
    size_t vocab() const override
    {
        return mLogits.size();
    }
    struct Call
    {
        int32_t token;
        int64_t position, step;
        int past;
    };
    std::vector<Call> fed;

private:
    std::vector<int32_t> mScript;
    std::vector<float> mLogits;
};

void decodeLoopStopsAndSwaps()
{
    KvArena arena(KvLayout{{4}, 1, 2, 4});
    std::vector<float> first(8, 0.0F);
    first[3] = 5.0F;
    Sampler greedy;
    {
        ScriptedBackend backend({4, 5, 6, 7, 1, 2});
        auto tokens = iwp::generate(backend, arena, first.data(), 100, greedy, {5, {}});
        CHECK((tokens == std::vector<int32_t>{3, 4, 5, 6, 7}));          // max_new_tokens
        CHECK(backend.fed.size() == 4);
        CHECK(backend.fed[0].token == 3 && backend.fed[0].position == 100 && backend.fed[0].step == 0);
        CHECK(backend.fed[3].token == 6 && backend.fed[3].position == 103);
        CHECK(backend.fed[0].past == 0 && backend.fed[1].past == 1 && backend.fed[2].past == 0); // ping-pong
    }
    {
        ScriptedBackend backend({4, 5, 6, 7});
        auto tokens = iwp::generate(backend, arena, first.data(), 0, greedy, {10, {5}});
        CHECK((tokens == std::vector<int32_t>{3, 4, 5}));                // the stop token is emitted, then stop
    }
    {
        ScriptedBackend backend({4, 5, 6, 7});
        int seen = 0;
        auto tokens = iwp::generate(backend, arena, first.data(), 0, greedy, {10, {}},
            [&](int32_t) { return ++seen < 2; });
        CHECK(tokens.size() == 2 && backend.fed.size() == 1);           // the callback stops it
    }
    ScriptedBackend backend({1});
    CHECK(throws([&] { iwp::generate(backend, arena, first.data(), 0, greedy, {0, {}}); }));
}

} // namespace

int main()
{
    arenaSizesFollowTheLayout();
    arenaBuffersAreDistinctAlignedAndPingPong();
    arenaRefusesBadLayouts();
    greedyTakesTheFirstMaximum();
    samplingIsSeededAndFollowsTheDistribution();
    topPKeepsTheSmallestPrefix();
    samplerRefusesBadParameters();
    decodeLoopStopsAndSwaps();
    std::printf("runtime core: %d checks passed\n", gChecks);
    return 0;
}
