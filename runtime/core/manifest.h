// An engine directory's manifest.json (format 3), read in C++ with nlohmann/json: the shapes, token ids and
// per-layer cache capacities a C++ app needs to size the KV arena, and the `io` section, which records every
// graph's inputs and outputs (name, shape, dtype, role). A runtime binds tensors by role through find(); no
// tensor name is spelled here or in any runtime source (export/graphs.py names them, the manifest records
// them). The schema is iwp/engine_format.py's; tests/test_manifest_cpp.py holds the two readers equal.
#pragma once

#include "kv_arena.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace iwp
{

// The engine format this runtime reads (iwp/engine_format.py FORMAT; a test holds the two equal).
constexpr int kManifestFormat = 3;

// The role vocabulary: the only words a runtime uses to find a tensor (iwp/engine_format.py ROLES; the
// binding exposes roleTable() and a test holds the two equal).
namespace role
{
constexpr char kTokenIds[] = "token_ids";
constexpr char kEmbeddings[] = "embeddings";
constexpr char kPixels[] = "pixels";
constexpr char kFeatures[] = "features";
constexpr char kAttentionMask[] = "attention_mask";
constexpr char kPositions[] = "positions";
constexpr char kVisualStart[] = "visual_start";
constexpr char kQueryIdx[] = "query_idx";
constexpr char kQueryMask[] = "query_mask";
constexpr char kLastIdx[] = "last_idx";
constexpr char kPosition[] = "position";
constexpr char kStep[] = "step";
constexpr char kLogits[] = "logits";
constexpr char kKept[] = "kept";   // one per selection stage (TensorSpec::stage)
constexpr char kKey[] = "key";     // the caches: one per layer (TensorSpec::layer)
constexpr char kValue[] = "value";
constexpr char kValid[] = "valid";
} // namespace role

struct RoleSet
{
    std::string graph;
    std::vector<std::string> inputs;
    std::vector<std::string> outputs;
};

// Every graph's allowed input and output roles, in the format's graph order (embed, vision, prefill, decode).
std::vector<RoleSet> const& roleTable();

// One dimension of a recorded shape: a static size, or the name of a dynamic dimension (e.g. "tokens").
struct Dim
{
    int64_t size = -1;  // -1 when symbolic
    std::string symbol; // empty when static

    bool isStatic() const { return symbol.empty(); }
};

struct TensorSpec
{
    std::string name;
    std::vector<Dim> shape;
    std::string dtype; // float32, float16, bfloat16, int64, int32 or bool
    std::string role;
    int64_t layer = -1; // the cache roles (key, value, valid); -1 otherwise
    int64_t stage = -1; // the kept role; -1 otherwise
};

struct GraphIO
{
    std::vector<TensorSpec> inputs;  // in the graph's own input order
    std::vector<TensorSpec> outputs; // in its output order
};

struct EngineManifest
{
    std::string directory;
    std::string model;
    std::string method;
    std::string dtype; // fp32 or fp16
    int64_t nLayers = 0;
    int64_t nKvHeads = 0;
    int64_t headDim = 0;
    int64_t hiddenSize = 0;
    int64_t vocabSize = 0;
    int64_t nVisual = 0;
    int64_t maxPrompt = 0;    // the prefill's fixed length: prompts are left-padded to it
    int64_t maxNewTokens = 0;
    std::vector<int64_t> prefillLen; // per layer: tokens the prefill leaves in the cache
    std::vector<int64_t> cacheLen;   // per layer: prefill + max new tokens (the arena's capacities)
    int64_t stages = 0;              // selection stages (the prefill's kept outputs)
    int32_t imageToken = 0;
    int32_t eosToken = 0;
    int32_t padToken = 0;
    std::map<std::string, GraphIO> io; // by graph name: embed, vision, prefill, decode

    KvLayout kvLayout() const;

    // The tensor of `graph` with this role (and layer for the caches, stage for kept). Throws
    // std::runtime_error with one line, "engine DIR: <graph> has no <role> <input/output>; rebuild it ...",
    // when the manifest records none.
    TensorSpec const& find(std::string const& graph, bool output, std::string const& role, int64_t layer = -1,
        int64_t stage = -1) const;
};

// Reads DIR/manifest.json. Throws std::runtime_error with one line saying what is wrong and to rebuild the
// engine: missing, not JSON, another format, or JSON of the wrong shape (a field missing or of the wrong type).
EngineManifest readManifest(std::string const& directory);

// The same from the file's text (the tests' and fuzzers' entry); `directory` only names the engine in errors.
EngineManifest parseManifest(std::string const& text, std::string const& directory);

} // namespace iwp
