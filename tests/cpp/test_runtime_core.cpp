// C++ tests of the runtime core: the KV arena, the samplers, the decode loop, the JSON reader, the engine
// manifest and the prefill inputs. Built by CMake
// (runtime/CMakeLists.txt) and run by `make test`; exits non-zero on the first failed check.
#include "generate.h"
#include "kv_arena.h"
#include "manifest.h"
#include "prompt.h"
#include "sampler.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
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


void jsonParsesStandardDocuments()
{
    using iwp::Json;
    Json const doc = Json::parse(R"( {"a": [1, -2.5e2, true, false, null], "s": "x\"\\\/\n\u00e9\ud83d\ude00",
        "o": {"k": 0}, "e": [], "eo": {}} )");
    auto const& a = doc["a"].asArray();
    CHECK(a.size() == 5 && a[0].asInt() == 1 && a[1].asNumber() == -250.0 && a[2].asBool() && !a[3].asBool());
    CHECK(a[4].isNull() && doc["o"]["k"].asInt() == 0 && doc["e"].asArray().empty() && !doc["eo"].has("k"));
    CHECK(doc["s"].asString() == "x\"\\/\n\xc3\xa9\xf0\x9f\x98\x80"); // escapes, a 2-byte and a 4-byte code point
    for (char const* bad : {"", "{", "[1,]", "{\"a\" 1}", "tru", "\"open", "1.", "-", "01x", "{} {}", "\"\\x\"",
             "\"\\ud800\"", "[\"a\nb\"]"})
    {
        CHECK(throws([&] { Json::parse(bad); }));
    }
    CHECK(throws([&] { Json::parse(std::string(1000, '[') + std::string(1000, ']')); })); // too deep, no crash
    CHECK(throws([&] { doc["missing"]; }));
    CHECK(throws([&] { doc["a"].asString(); }));
    CHECK(Json::parse("-250.0").asInt() == -250 && throws([] { Json::parse("2.5").asInt(); }));
}

std::string writeManifest(std::string const& body)
{
    char directory[] = "/tmp/iwp_manifest_XXXXXX";
    CHECK(mkdtemp(directory) != nullptr);
    std::ofstream(std::string(directory) + "/manifest.json") << body;
    return directory;
}

std::string const kManifest = R"({"format": 2, "dtype": "fp16",
  "model": {"name": "m", "n_layers": 3, "n_kv_heads": 2, "head_dim": 8, "hidden_size": 32, "vocab_size": 50,
            "n_visual": 4},
  "method": {"name": "iwp", "stages": [[1, 2]]},
  "shapes": {"max_prompt": 10, "max_new_tokens": 5, "prefill_len": [10, 8, 8], "cache_len": [15, 13, 13]},
  "tokens": {"image": 7, "eos": 3, "pad": 0}})";

void manifestGivesTheArenaLayout()
{
    iwp::EngineManifest const m = iwp::readManifest(writeManifest(kManifest));
    CHECK(m.nLayers == 3 && m.nVisual == 4 && m.maxPrompt == 10 && m.stages == 1 && m.eosToken == 3);
    KvLayout const layout = m.kvLayout();
    CHECK((layout.capacities == std::vector<int64_t>{15, 13, 13}) && layout.elementBytes == 2 && layout.kvHeads == 2);
    std::string const other = kManifest;
    CHECK(throws([&] { iwp::readManifest("/nonexistent/engine"); }));
    CHECK(throws([&] { iwp::readManifest(writeManifest("{not json")); }));
    CHECK(throws([&] { iwp::readManifest(writeManifest(std::string(other).replace(11, 1, "1"))); })); // format 1
    std::string wrongLayers = other;
    wrongLayers.replace(wrongLayers.find("[15, 13, 13]"), 12, "[15, 13]");
    CHECK(throws([&] { iwp::readManifest(writeManifest(wrongLayers)); }));
    try
    {
        iwp::readManifest(writeManifest("{\"format\": 2}"));
        CHECK(false);
    }
    catch (std::runtime_error const& e)
    {
        std::string const what = e.what();
        CHECK(what.find("missing key \"model\"") != std::string::npos && what.find("make engine") != std::string::npos);
    }
}

void prefillInputsArePaddedOnTheLeft()
{
    iwp::EngineManifest const m = iwp::readManifest(writeManifest(kManifest));
    // 2 text tokens, the 4 image tokens, 1 text token: padded by 3 to the capacity of 10
    iwp::PrefillInputs const in = iwp::makePrefillInputs({11, 12, 7, 7, 7, 7, 13}, m);
    CHECK((in.inputIds == std::vector<int64_t>{0, 0, 0, 11, 12, 7, 7, 7, 7, 13}));
    CHECK((in.attentionMask == std::vector<int64_t>{0, 0, 0, 1, 1, 1, 1, 1, 1, 1}));
    CHECK((in.positions == std::vector<int64_t>{0, 0, 0, 0, 1, 2, 3, 4, 5, 6}));
    CHECK(in.visualStart == 5 && in.lastIdx == 9 && in.nextPosition == 7);
    CHECK((in.queryIdx == std::vector<int64_t>{9, 9, 9, 9, 9, 9}));           // 10 - 4 slots, clamped
    CHECK((in.queryMask == std::vector<uint8_t>{1, 0, 0, 0, 0, 0}));
    CHECK(throws([&] { iwp::makePrefillInputs(std::vector<int32_t>(11, 7), m); }));        // past capacity
    CHECK(throws([&] { iwp::makePrefillInputs({11, 7, 7, 7, 13}, m); }));                  // 3 image tokens
    CHECK(throws([&] { iwp::makePrefillInputs({7, 7, 11, 7, 7, 13}, m); }));               // not contiguous
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
    jsonParsesStandardDocuments();
    manifestGivesTheArenaLayout();
    prefillInputsArePaddedOnTheLeft();
    std::printf("runtime core: %d checks passed\n", gChecks);
    return 0;
}
