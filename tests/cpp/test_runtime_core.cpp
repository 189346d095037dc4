// C++ tests of the runtime core: the KV arena, the samplers, the decode loop, the engine manifest (format 4:
// its graphs, token table, weights and io section, and broken, foreign and wrong-shaped manifests) and the
// unpadded prefill inputs. Built by CMake (runtime/CMakeLists.txt) and run by `make test`; exits non-zero on
// the first failed check.
#include "generate.h"
#include "kv_arena.h"
#include "manifest.h"
#include "prompt.h"
#include "sampler.h"

#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
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

void seedsWrapAsPythonWrapsThem()
{
    CHECK(iwp::parseSeed("0") == 0 && iwp::parseSeed("42") == 42 && iwp::parseSeed("+7") == 7);
    CHECK(iwp::parseSeed("-1") == UINT64_MAX && iwp::parseSeed("-0") == 0);
    CHECK(iwp::parseSeed("18446744073709551621") == 5);                 // 2**64 + 5
    CHECK(iwp::parseSeed("1180591620717411303424") == 0);               // 2**70
    CHECK(iwp::parseSeed("-18446744073709551617") == UINT64_MAX);       // -(2**64 + 1)
    for (char const* bad : {"", "-", "1.5", "1e3", "0x10", " 1", "seven"})
    {
        CHECK(throws([&] { iwp::parseSeed(bad); }));
    }
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


// ----------------------------------------------------------------------------------------- the manifest

using nlohmann::json;

json tensor(std::string name, json shape, std::string dtype, std::string role, int64_t layer = -1,
    int64_t stage = -1)
{
    json t = {{"name", name}, {"shape", shape}, {"dtype", dtype}, {"role", role}};
    if (layer >= 0)
    {
        t["layer"] = layer;
    }
    if (stage >= 0)
    {
        t["stage"] = stage;
    }
    return t;
}

// A format-4 manifest of a 3-layer fp16 engine: embed, vision, segment.0 (layer 0), a selection at layer 1,
// segment.1 (layers 1 and 2), with only the fields this reader reads. The tensor names are not the exporter's,
// on purpose: the reader and find() go by role and never by name.
json fixture()
{
    json segment0In = json::array({tensor("h", {1, "tokens", 32}, "float16", "hidden"),
        tensor("p", {1, "tokens"}, "int64", "positions"), tensor("o", json::array(), "int64", "offset")});
    json segment1In = segment0In;
    segment1In.push_back(tensor("table", {50, 32}, "float16", "token_table"));
    json segment0Out = json::array({tensor("h_out", {1, "tokens", 32}, "float16", "hidden")});
    json segment1Out = json::array({tensor("out_logits", {1, 50}, "float16", "logits")});
    int64_t const capacity[] = {15, 13, 13};
    for (int64_t l = 0; l < 3; ++l)
    {
        std::string const n = std::to_string(l);
        json& in = l == 0 ? segment0In : segment1In;
        json& out = l == 0 ? segment0Out : segment1Out;
        // values before keys on purpose: caches() orders them key, value, valid
        in.push_back(tensor("in" + n + "v", {1, 2, capacity[l], 8}, "float16", "value", l));
        in.push_back(tensor("in" + n + "k", {1, 2, capacity[l], 8}, "float16", "key", l));
        in.push_back(tensor("in" + n + "m", {1, capacity[l]}, "bool", "valid", l));
        out.push_back(tensor("out" + n + "k", {1, 2, capacity[l], 8}, "float16", "key", l));
        out.push_back(tensor("out" + n + "v", {1, 2, capacity[l], 8}, "float16", "value", l));
        out.push_back(tensor("out" + n + "m", {1, capacity[l]}, "bool", "valid", l));
    }
    json const selectIn = json::array({tensor("sh", {1, "tokens", 32}, "float16", "hidden"),
        tensor("sp", {1, "tokens"}, "int64", "positions"), tensor("vs", {1}, "int64", "visual_start"),
        tensor("qi", {1, 6}, "int64", "query_idx"), tensor("qm", {1, 6}, "bool", "query_mask"),
        tensor("li", {1}, "int64", "last_idx")});
    json const selectOut = json::array({tensor("sel0", {1, 2}, "int64", "kept", -1, 0),
        tensor("kh", {1, "tokens - 2", 32}, "float16", "hidden"), tensor("kp", {1, "tokens - 2"}, "int64", "positions")});
    json const digest = std::string(64, '0');
    return {{"format", 4}, {"dtype", "fp16"}, {"select", "plugin"}, {"backend", "tensorrt"},
        {"model",
            {{"name", "m"}, {"resolution", {16, 24}}, {"n_visual", 4}, {"n_layers", 3}, {"hidden_size", 32},
                {"n_kv_heads", 2}, {"head_dim", 8}, {"vocab_size", 50}}},
        {"method", {{"name", "iwp"}, {"budget", 2}, {"stages", {{1, 2}}}, {"tokens_per_layer", {4, 2, 2}}}},
        {"shapes",
            {{"batch", 1}, {"max_prompt", 10}, {"max_text_tokens", 6}, {"max_new_tokens", 5},
                {"cache_len", {15, 13, 13}}}},
        {"tokens", {{"image", 7}, {"eos", 3}, {"pad", 0}}},
        {"files",
            {{"embed.onnx", digest}, {"vision.onnx", digest}, {"segment.0.onnx", digest}, {"select.0.onnx", digest},
                {"segment.1.onnx", digest}, {"tokens.bin", digest}}},
        {"graphs",
            json::array({{{"name", "embed"}, {"kind", "embed"}}, {{"name", "vision"}, {"kind", "vision"}},
                {{"name", "segment.0"}, {"kind", "segment"}, {"layers", {0, 1}}},
                {{"name", "select.0"}, {"kind", "select"}, {"stage", 0}, {"layer", 1}},
                {{"name", "segment.1"}, {"kind", "segment"}, {"layers", {1, 3}}}})},
        {"token_table", {{"file", "tokens.bin"}, {"shape", {50, 32}}, {"dtype", "float16"}, {"tied", true}}},
        {"weights",
            {{"distinct_bytes", 1000}, {"stored_bytes", 1100},
                {"copies", json::array({{{"graph", "select.0"}, {"what", "layer 1 q/k/v"}, {"bytes", 100}}})}}},
        {"io",
            {{"embed",
                 {{"inputs",
                      {tensor("ids", {1, "tokens"}, "int64", "token_ids"),
                          tensor("table", {50, 32}, "float16", "token_table")}},
                     {"outputs", {tensor("emb", {1, "tokens", 32}, "float16", "embeddings")}}}},
                {"vision",
                    {{"inputs", {tensor("px", {1, 4, 3, 8, 8}, "float16", "pixels")}},
                        {"outputs", {tensor("feat", {1, 4, 32}, "float16", "features")}}}},
                {"segment.0", {{"inputs", segment0In}, {"outputs", segment0Out}}},
                {"select.0", {{"inputs", selectIn}, {"outputs", selectOut}}},
                {"segment.1", {{"inputs", segment1In}, {"outputs", segment1Out}}}}}};
}

// The fixture with its stage at layer 0 (DivPrune, random): the select runs first, on the embeddings.
json stageAtLayerZero()
{
    json doc = fixture();
    doc["method"]["stages"] = {{0, 2}};
    doc["method"]["tokens_per_layer"] = {2, 2, 2};
    json segment = doc["io"]["segment.1"];
    for (json const& t : doc["io"]["segment.0"]["inputs"])
    {
        if (t.contains("layer"))
        {
            segment["inputs"].push_back(t);
        }
    }
    for (json const& t : doc["io"]["segment.0"]["outputs"])
    {
        if (t.contains("layer"))
        {
            segment["outputs"].push_back(t);
        }
    }
    doc["io"].erase("segment.1");
    doc["io"]["segment.0"] = segment;
    doc["files"].erase("segment.1.onnx");
    doc["graphs"] = json::array({doc["graphs"][0], doc["graphs"][1],
        {{"name", "select.0"}, {"kind", "select"}, {"stage", 0}, {"layer", 0}},
        {{"name", "segment.0"}, {"kind", "segment"}, {"layers", {0, 3}}}});
    return doc;
}

std::string writeManifest(std::string const& body)
{
    char directory[] = "/tmp/iwp_manifest_XXXXXX";
    CHECK(mkdtemp(directory) != nullptr);
    std::ofstream(std::string(directory) + "/manifest.json", std::ios::binary) << body;
    return directory;
}

std::string const kManifest = fixture().dump(1);

// The reader's refusal of `body`: one line naming the engine and saying to rebuild it (empty if it reads).
std::string refusal(std::string const& body)
{
    std::string const directory = "/engines/e";
    try
    {
        iwp::parseManifest(body, directory);
    }
    catch (std::runtime_error const& error)
    {
        std::string const what = error.what();
        std::string const tail = "; rebuild it with `make engine`";
        CHECK(what.rfind("engine " + directory + ": ", 0) == 0);
        CHECK(what.size() > tail.size() && what.compare(what.size() - tail.size(), tail.size(), tail) == 0);
        CHECK(what.find('\n') == std::string::npos && what.find("json.exception") == std::string::npos);
        for (unsigned char c : what)
        {
            CHECK(c >= 0x20 && c < 0x7F); // printable ASCII whatever bytes the file held
        }
        return what;
    }
    catch (...)
    {
        CHECK(false); // anything but std::runtime_error is a defect
    }
    return "";
}

bool mentions(std::string const& text, std::string const& part)
{
    return text.find(part) != std::string::npos;
}

std::vector<std::string> names(std::vector<iwp::TensorSpec> const& specs)
{
    std::vector<std::string> out;
    for (iwp::TensorSpec const& t : specs)
    {
        out.push_back(t.name);
    }
    return out;
}

void manifestGivesTheGraphsTheArenaLayoutAndTheIo()
{
    iwp::EngineManifest const m = iwp::readManifest(writeManifest(kManifest));
    CHECK(m.nLayers == 3 && m.nVisual == 4 && m.maxPrompt == 10 && m.maxTextTokens == 6 && m.eosToken == 3);
    CHECK(m.model == "m" && m.method == "iwp" && m.hiddenSize == 32 && m.vocabSize == 50 && m.maxNewTokens == 5);
    CHECK(m.height == 16 && m.width == 24 && m.select == "plugin" && m.backend == "tensorrt" && m.batch == 1);
    CHECK(m.stages.size() == 1 && m.stages[0].layer == 1 && m.stages[0].tokens == 2 && m.budget == 2);
    CHECK((m.tokensPerLayer == std::vector<int64_t>{4, 2, 2}));
    KvLayout const layout = m.kvLayout();
    CHECK((layout.capacities == std::vector<int64_t>{15, 13, 13}) && layout.elementBytes == 2 && layout.kvHeads == 2);
    // the graphs in run order, by kind
    CHECK(m.graphs.size() == 5 && m.graphs[2].name == "segment.0" && m.graphs[2].first == 0 && m.graphs[2].end == 1);
    CHECK(m.graphs[0].first == -1 && m.graphs[0].stage == -1 && m.graphs[3].stage == 0 && m.graphs[3].layer == 1);
    std::vector<iwp::GraphInfo> const segments = m.segments();
    CHECK(segments.size() == 2 && segments[1].name == "segment.1" && segments[1].first == 1 && segments[1].end == 3);
    CHECK(m.selects().size() == 1 && m.selects()[0].name == "select.0" && m.graph("select.0").layer == 1);
    // a prompt of 9 tokens: segment.0 holds all 9, segment.1 the 5 text tokens and the 2 kept
    CHECK(m.segmentPrefillLen(segments[0], 9) == 9 && m.segmentPrefillLen(segments[1], 9) == 7);
    CHECK(throws([&] { m.segmentPrefillLen(m.graph("select.0"), 9); }));
    CHECK(m.tokenTable.file == "tokens.bin" && m.tokenTable.vocab == 50 && m.tokenTable.hidden == 32
        && m.tokenTable.dtype == "float16" && m.tokenTable.tied);
    CHECK(m.weights.distinctBytes == 1000 && m.weights.storedBytes == 1100 && m.weights.copies.size() == 1
        && m.weights.copies[0].graph == "select.0" && m.weights.copies[0].bytes == 100);
    CHECK(m.files.size() == 6 && m.files.count("segment.1.onnx") == 1);
    // the io section: order kept, found by role
    CHECK(m.io.size() == 5 && m.io.at("segment.1").inputs.size() == 4 + 6 && m.io.at("select.0").outputs.size() == 3);
    CHECK(m.io.at("segment.0").inputs[2].role == "offset" && m.io.at("segment.0").inputs[2].shape.empty());
    iwp::TensorSpec const& ids = m.find("embed", false, iwp::role::kTokenIds);
    CHECK(ids.name == "ids" && ids.dtype == "int64" && ids.shape.size() == 2 && ids.shape[0].isStatic()
        && ids.shape[0].size == 1 && !ids.shape[1].isStatic() && ids.shape[1].symbol == "tokens");
    CHECK(m.find("segment.1", false, iwp::role::kKey, 2).name == "in2k");
    CHECK(m.find("segment.0", true, iwp::role::kValid, 0).name == "out0m");
    CHECK(m.find("select.0", true, iwp::role::kKept, -1, 0).name == "sel0");
    CHECK(m.find("select.0", true, iwp::role::kHidden).shape[1].symbol == "tokens - 2");
    CHECK(m.find("segment.1", true, iwp::role::kKey, 1).shape[2].size == 13);
    CHECK(m.find("segment.1", false, iwp::role::kTokenTable).name == "table"); // the tied LM head
    CHECK((names(m.caches("segment.1", false))
        == std::vector<std::string>{"in1k", "in1v", "in1m", "in2k", "in2v", "in2m"}));
    CHECK((names(m.caches("segment.0", true)) == std::vector<std::string>{"out0k", "out0v", "out0m"}));
    CHECK(m.caches("select.0", false).empty() && throws([&] { m.caches("decode", false); }));
    // absent: one line naming the graph, the role and the side
    for (auto const& [graph, output, r, layer, stage, said] :
        {std::tuple<char const*, bool, char const*, int64_t, int64_t, char const*>{
             "segment.0", false, "key", 1, -1, "segment.0 has no key (layer 1) input"},
            {"select.0", true, "kept", -1, 1, "select.0 has no kept (stage 1) output"},
            {"segment.0", true, "logits", -1, -1, "segment.0 has no logits output"},
            {"segment.1", false, "key", -1, -1, "segment.1 has no key input"},
            {"decode", true, "logits", -1, -1, "decode has no"}})
    {
        try
        {
            m.find(graph, output, r, layer, stage);
            CHECK(false);
        }
        catch (std::runtime_error const& e)
        {
            std::string const what = e.what();
            CHECK(mentions(what, said) && mentions(what, "rebuild it with `make engine`") && !mentions(what, "\n"));
        }
    }
    try
    {
        m.graph("prefill");
        CHECK(false);
    }
    catch (std::runtime_error const& e)
    {
        CHECK(mentions(e.what(), ": has no graph prefill; rebuild it with `make engine`"));
    }
    // the role table is the schema's, by kind in KINDS order
    CHECK(iwp::roleTable().size() == 4 && iwp::roleTable()[2].kind == "segment"
        && iwp::roleTable()[2].inputs.size() == 7 && iwp::roleTable()[3].outputs[0] == "kept");
}

void manifestReadsAStageAtLayerZero()
{
    iwp::EngineManifest const m = iwp::parseManifest(stageAtLayerZero().dump(), "E");
    CHECK(m.graphs.size() == 4 && m.graphs[2].name == "select.0" && m.graphs[3].name == "segment.0");
    CHECK(m.segments().size() == 1 && m.segmentPrefillLen(m.segments()[0], 9) == 7); // pruned from layer 0
    CHECK(names(m.caches("segment.0", false)).size() == 9 && m.caches("segment.0", false)[3].layer == 1);
    json doc = stageAtLayerZero(); // the select must stand at its stage's layer
    doc["method"]["stages"] = {{1, 2}};
    CHECK(mentions(refusal(doc.dump()), "field graphs[2] is not stage 0 at layer 0"));
    doc = fixture(); // and a segment may not follow a segment
    doc["graphs"].erase(3);
    CHECK(mentions(refusal(doc.dump()), "field graphs[3] is a segment after a segment: segments and selects alternate"));
}

void manifestRefusesBrokenAndForeignFiles()
{
    CHECK(throws([] { iwp::readManifest("/nonexistent/engine"); }));
    char directory[] = "/tmp/iwp_manifest_XXXXXX";
    CHECK(mkdtemp(directory) != nullptr);
    CHECK(mkdir((std::string(directory) + "/manifest.json").c_str(), 0755) == 0); // a directory, not a file
    try
    {
        iwp::readManifest(directory);
        CHECK(false);
    }
    catch (std::runtime_error const& e)
    {
        CHECK(mentions(e.what(), "no readable manifest.json") && mentions(e.what(), "make engine"));
    }
    CHECK(mentions(refusal(""), "corrupt (not JSON, at line 1, column 1)"));
    CHECK(mentions(refusal("{\n  \"format\": 4,\n  x"), "not JSON, at line 3, column 3"));
    CHECK(mentions(refusal("{\"format\": 4, \"dtype\": \"\xff\xfe\"}"), "not JSON"));        // not UTF-8
    CHECK(mentions(refusal(kManifest + " {}"), "not JSON"));                                  // trailing value
    CHECK(mentions(refusal(std::string(100000, '[') + std::string(100000, ']')), "is an array, not an object"));
    CHECK(mentions(refusal("[1, 2]"), "manifest.json is an array, not an object"));
    CHECK(mentions(refusal("3"), "manifest.json is an integer, not an object"));
    CHECK(mentions(refusal("\"x\""), "is a string, not an object"));
    CHECK(mentions(refusal("null"), "is null, not an object"));
    CHECK(mentions(refusal("{}"), "manifest format null is not this iwp's format 4"));
    CHECK(mentions(refusal(R"({"format": "4"})"), "manifest format \"4\" is not this iwp's format 4"));
    CHECK(mentions(refusal(R"({"format": 4.0})"), "field format is a number, not an integer"));
    CHECK(mentions(refusal(R"({"format": true})"), "manifest format true is not"));
    CHECK(mentions(refusal(R"({"format": 4, "files": {}})"), "field model is missing"));
    for (int old : {1, 2, 3, 5})
    {
        json doc = fixture();
        doc["format"] = old;
        CHECK(mentions(refusal(doc.dump()), "manifest format " + std::to_string(old) + " is not this iwp's format 4"));
    }
    CHECK(mentions(refusal(R"({"format": 18446744073709551615})"), "manifest format 18446744073709551615 is not"));
}

// Every member of every object in the fixture is read: removing each in turn, or giving it a value of another
// JSON type, is refused with one line that names the field.
void manifestRefusesEveryMissingFieldAndWrongType()
{
    json const good = fixture();
    json const flat = good.flatten(); // leaves only; their parents are walked below
    std::set<std::string> pointers;
    for (auto const& [pointer, value] : flat.items())
    {
        (void)value;
        for (size_t cut = pointer.size(); cut != std::string::npos && cut > 0; cut = pointer.rfind('/', cut - 1))
        {
            pointers.insert(pointer.substr(0, cut));
        }
    }
    std::set<std::string> const optional{"layers", "stage", "layer"}; // null or absent: checked as unset
    json const others[] = {nullptr, true, 1.5, 7, "s", json::array(), json::object()};
    int removed = 0, retyped = 0;
    for (std::string const& pointer : pointers)
    {
        json::json_pointer const at(pointer);
        json::json_pointer const parent = at.parent_pointer();
        // the message spells the path with dots and [i]: check the last named member it mentions
        std::string const last = at.back();
        bool const inArray = good.at(parent).is_array();
        if (!inArray)
        {
            json doc = good;
            doc.at(parent).erase(last);
            std::string const what = refusal(doc.dump());
            // members of a dataclass are missing; a dict's entries, the optional fields and the format are not
            bool const member = pointer.rfind("/files/", 0) != 0 && optional.count(last) == 0 && pointer != "/format";
            if (what.empty() || (member && !(mentions(what, last) && mentions(what, " is missing"))))
            {
                std::fprintf(stderr, "without %s: %s\n", pointer.c_str(), what.c_str());
            }
            CHECK(!what.empty() && mentions(what, "manifest") && (!member || (mentions(what, last) && mentions(what, " is missing"))));
            ++removed;
        }
        json const& original = good.at(at);
        bool const isDim = pointer.find("/shape/") != std::string::npos;
        for (json const& other : others)
        {
            bool const sameKind = other.type() == original.type()
                || (other.is_number_integer() && original.is_number_integer());
            bool const alsoADim = isDim && (other.is_string() || other.is_number_integer());
            if (sameKind || alsoADim)
            {
                continue;
            }
            json doc = good;
            doc.at(at) = other;
            std::string const what = refusal(doc.dump());
            if (what.empty())
            {
                std::fprintf(stderr, "read with %s = %s\n", pointer.c_str(), other.dump().c_str());
            }
            CHECK(!what.empty() && mentions(what, "manifest"));
            ++retyped;
        }
    }
    CHECK(removed > 150 && retyped > 1000); // the walk covered the whole document
}

// Values of the right type that are still wrong: each refused with one line naming the field and the value,
// worded as iwp/engine_format.py words it.
void manifestRefusesBadValues()
{
    auto with = [](std::string const& pointer, json value) {
        json doc = fixture();
        doc[json::json_pointer(pointer)] = std::move(value);
        return refusal(doc.dump());
    };
    CHECK(mentions(with("/dtype", "fp8"), "field dtype is \"fp8\", not one of fp32, fp16"));
    CHECK(mentions(with("/backend", "tvm"), "field backend is \"tvm\", not one of onnxruntime, tensorrt"));
    CHECK(mentions(with("/model/n_layers", 0), "field model.n_layers is 0, not an integer >= 1"));
    CHECK(mentions(with("/model/n_layers", 2), "field shapes.cache_len has 3 layers, not model.n_layers 2"));
    CHECK(mentions(with("/method/tokens_per_layer", {4}), "method.tokens_per_layer has 1 layers, not model.n_layers 3"));
    CHECK(mentions(with("/model/resolution", {16}), "field model.resolution has 1 elements, not 2"));
    CHECK(mentions(with("/shapes/cache_len/0", -1), "field shapes.cache_len[0] is -1, not an integer >= 1"));
    CHECK(mentions(with("/tokens/eos", 1LL << 40), "field tokens.eos is 1099511627776, not an integer in [-2147483648, "));
    CHECK(mentions(with("/method/stages/0", {1, 2, 3}), "field method.stages[0] has 3 elements, not 2"));
    CHECK(mentions(with("/method/stages", json::array()), "field graphs[3] is not stage 0 at layer 1"));
    CHECK(mentions(with("/files/a\\b", "0"), "field files holds \"a\\\\b\", not a file name in the engine directory"));
    CHECK(mentions(with("/files/..", "0"), "field files holds \"..\", not a file name"));
    CHECK(mentions(with("/graphs/2/kind", "encoder"), "field graphs[2].kind is \"encoder\", not one of embed, vision"));
    CHECK(mentions(with("/graphs/3/name", "segment.0"), "field graphs[2].name \"segment.0\" is repeated or not a file"));
    CHECK(mentions(with("/graphs/4/layers", {1, 4}), "field graphs[4].layers is [1, 4], not a range of layers from 1"));
    CHECK(mentions(with("/graphs/4/layers", {2, 3}), "field graphs[4].layers is [2, 3], not a range of layers from 1"));
    CHECK(mentions(with("/graphs/3/stage", 1), "field graphs[3] is not stage 0 at layer 1"));
    CHECK(mentions(with("/graphs/1/kind", "segment"), "field graphs does not start with the embed and vision graphs"));
    CHECK(mentions(with("/graphs/4/layers", {1, 2}), "field graphs' segments end at layer 2, not model.n_layers 3"));
    CHECK(mentions(with("/graphs/5", {{"name", "select.1"}, {"kind", "select"}}), "files records no select.1.onnx"));
    CHECK(mentions(with("/io/audio", {{"inputs", json::array()}, {"outputs", json::array()}}), "field io holds \"audio\", which is not in graphs"));
    CHECK(mentions(with("/token_table/shape", {32, 50}), "token_table.shape is [32, 50], not [model.vocab_size"));
    CHECK(mentions(with("/token_table/file", "t.bin"), "field files records no token table \"t.bin\""));
    CHECK(mentions(with("/token_table/dtype", "int8"), "field token_table.dtype is \"int8\", not float32 or float16"));
    CHECK(mentions(with("/token_table/tied", 1), "field token_table.tied is an integer, not a boolean"));
    CHECK(mentions(with("/io/vision/inputs/0/dtype", "float64"), "io.vision.inputs[0].dtype is \"float64\", not one of"));
    CHECK(mentions(with("/io/vision/inputs/0/role", "features"), "io.vision.inputs[0].role is \"features\", not one"));
    CHECK(mentions(with("/io/segment.0/inputs/0/role", "token_ids"),
        "io[\"segment.0\"].inputs[0].role is \"token_ids\", not one of hidden, positions, offset, token_table, key"));
    CHECK(mentions(with("/io/embed/inputs/0/name", ""), "io.embed.inputs[0].name is empty"));
    CHECK(mentions(with("/io/embed/inputs/0/shape/1", ""), "io.embed.inputs[0].shape[1] is \"\", not a size or a"));
    CHECK(mentions(with("/io/embed/inputs/0/shape/0", -2), "io.embed.inputs[0].shape[0] is -2, not a size or a"));
    CHECK(mentions(with("/io/embed/inputs/0/shape/0", true), "shape[0] is a boolean, not an integer or a string"));
    CHECK(mentions(with("/io/segment.1/inputs/4/layer", 3), "io[\"segment.1\"].inputs[4].layer is 3, not in [0, 2]"));
    CHECK(mentions(with("/io/segment.1/inputs/4/layer", -1), "io[\"segment.1\"].inputs[4].layer is -1, not in [0, 2]"));
    CHECK(mentions(with("/io/segment.1/inputs/4/layer", nullptr), "inputs[4].layer is missing (role value takes one)"));
    CHECK(mentions(with("/io/segment.1/inputs/7/layer", 1), "io[\"segment.1\"].inputs[7].role repeats role value"));
    CHECK(mentions(with("/io/segment.0/inputs/2/name", "p"), "io[\"segment.0\"].inputs[2].name repeats the name \"p\""));
    CHECK(mentions(with("/io/select.0/outputs/0/stage", 1), "io[\"select.0\"].outputs[0].stage is 1, not in [0, 0]"));
    CHECK(mentions(with("/io/select.0/outputs/1/layer", 0), "outputs[1].layer is set, but role hidden takes no layer"));
    CHECK(mentions(with("/io/select.0/outputs/1/stage", 0), "outputs[1].stage is set, but role hidden takes no stage"));
    json doc = fixture();
    doc["io"]["embed"]["inputs"][0]["name"] = "\x01\n\xc3\xa9"; // names are opaque: any string reads back
    CHECK(iwp::parseManifest(doc.dump(), "E").find("embed", false, "token_ids").name == "\x01\n\xc3\xa9");
    doc = fixture();
    doc["io"]["embed"]["outputs"][0]["name"] = "ids"; // names are unique per side, as the Python reader has it
    doc["io"]["embed"]["inputs"][0]["layer"] = nullptr;   // null stands for absent, as Python's None
    doc["extra"] = {{"future", 1}};                        // unknown members are ignored
    CHECK(iwp::readManifest(writeManifest(doc.dump())).find("embed", false, "token_ids").name == "ids");
}

void prefillInputsAreTheUnpaddedPrompt()
{
    iwp::EngineManifest const m = iwp::readManifest(writeManifest(kManifest));
    // 2 text tokens, the 4 image tokens, 1 text token: T = 7 of the capacity of 10, not padded
    iwp::PrefillInputs const in = iwp::makePrefillInputs({11, 12, 7, 7, 7, 7, 13}, m);
    CHECK((in.tokenIds == std::vector<int64_t>{11, 12, 7, 7, 7, 7, 13}));
    CHECK((in.positions == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6}));
    CHECK(in.visualStart == 2 && in.lastIdx == 6 && in.offset == 0 && in.promptLen == 7 && in.nextPosition == 7);
    CHECK((in.queryIdx == std::vector<int64_t>{6, 6, 6, 6, 6, 6}));           // 10 - 4 slots, clamped to the last
    CHECK((in.queryMask == std::vector<uint8_t>{1, 0, 0, 0, 0, 0}));
    iwp::PrefillInputs const full = iwp::makePrefillInputs({7, 7, 7, 7, 1, 2, 3, 4, 5, 6}, m); // at capacity
    CHECK((full.queryIdx == std::vector<int64_t>{4, 5, 6, 7, 8, 9}) && full.lastIdx == 9);
    CHECK((full.queryMask == std::vector<uint8_t>{1, 1, 1, 1, 1, 1}));
    CHECK(m.segmentPrefillLen(m.segments()[1], in.promptLen) == 7 - 4 + 2);
    CHECK(throws([&] { iwp::makePrefillInputs(std::vector<int32_t>(11, 7), m); }));        // past capacity
    CHECK(throws([&] { iwp::makePrefillInputs({11, 7, 7, 7, 13}, m); }));                  // 3 image tokens
    CHECK(throws([&] { iwp::makePrefillInputs({7, 7, 11, 7, 7, 13}, m); }));               // not contiguous
    CHECK(throws([&] { iwp::makePrefillInputs({11, 7, 7, 7, 7}, m); }));                   // no text after the image
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
    seedsWrapAsPythonWrapsThem();
    decodeLoopStopsAndSwaps();
    manifestGivesTheGraphsTheArenaLayoutAndTheIo();
    manifestReadsAStageAtLayerZero();
    manifestRefusesBrokenAndForeignFiles();
    manifestRefusesEveryMissingFieldAndWrongType();
    manifestRefusesBadValues();
    prefillInputsAreTheUnpaddedPrompt();
    std::printf("runtime core: %d checks passed\n", gChecks);
    return 0;
}
