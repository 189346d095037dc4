// An engine directory's manifest.json (format 4), read in C++ with nlohmann/json: what a C++ app needs to run
// the engine's graphs and size its KV arena. The schema is iwp/engine_format.py's (authoritative); this reader
// checks what it reads exactly as that one does, with the same one-line errors, and
// tests/test_manifest_cpp.py holds the two equal. It reads no more than a runtime needs (not inputs_hash,
// flops, tools, spec or tensorrt), and refuses one thing the Python reader takes: token ids past int32.
//
// The API a backend uses:
//   graphs                 every graph in run order: embed, vision, then segments and selects alternating
//                          (a select first when a stage is at layer 0). GraphInfo: name ("segment.0"), kind,
//                          a segment's layers [first, end), a select's stage and layer.
//   segments(), selects()  the graphs of one kind, in run order; graph(name) one by name.
//   find(graph, output, role, layer, stage)
//                          a graph's input (output = false) or output tensor by role (roleTable() by kind;
//                          layer for the cache roles, stage for kept). No tensor name is spelled in any runtime
//                          source: export/graphs.py names them, the manifest's io section records them.
//   caches(graph, output)  a segment's cache tensors, layer by layer: key, value, valid.
//   tokenTable             token_table.bin: [vocab, hidden] in the engine's float dtype, fed to embed (and to
//                          the last segment when the LM head is tied).
//   tokensPerLayer         per decoder layer, the visual tokens it holds: nVisual before the first stage,
//                          then each stage's kept count.
//   segmentPrefillLen(segment, promptLen)
//                          the tokens a segment runs in the prefill (its caches' fill): promptLen - nVisual +
//                          tokensPerLayer[segment.first]. Decode step s feeds the segment offset = that + s.
//   cacheLen, kvLayout()   per layer cache capacity (the arena's).
#pragma once

#include "kv_arena.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace iwp
{

// The engine format this runtime reads (iwp/engine_format.py FORMAT; a test holds the two equal).
constexpr int kManifestFormat = 4;

// The graph kinds (iwp/engine_format.py KINDS).
namespace kind
{
constexpr char kEmbed[] = "embed";
constexpr char kVision[] = "vision";
constexpr char kSegment[] = "segment";
constexpr char kSelect[] = "select";
} // namespace kind

// The role vocabulary: the only words a runtime uses to find a tensor (iwp/engine_format.py ROLES; the
// binding exposes roleTable() and a test holds the two equal).
namespace role
{
constexpr char kTokenIds[] = "token_ids";
constexpr char kTokenTable[] = "token_table";
constexpr char kEmbeddings[] = "embeddings";
constexpr char kPixels[] = "pixels";
constexpr char kFeatures[] = "features";
constexpr char kHidden[] = "hidden";
constexpr char kPositions[] = "positions";
constexpr char kOffset[] = "offset";   // a segment's cache fill before this run: 0 in prefill
constexpr char kLogits[] = "logits";
constexpr char kTransitions[] = "transitions";
constexpr char kVisualStart[] = "visual_start";
constexpr char kQueryIdx[] = "query_idx";
constexpr char kQueryMask[] = "query_mask";
constexpr char kLastIdx[] = "last_idx";
constexpr char kAlive[] = "alive";
constexpr char kTtv[] = "ttv";
constexpr char kKept[] = "kept";   // one per selection stage (TensorSpec::stage)
constexpr char kKey[] = "key";     // the caches: one per layer (TensorSpec::layer)
constexpr char kValue[] = "value";
constexpr char kValid[] = "valid";
} // namespace role

struct RoleSet
{
    std::string kind;
    std::vector<std::string> inputs;
    std::vector<std::string> outputs;
};

// Every graph kind's allowed input and output roles, in KINDS order (embed, vision, segment, select).
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

struct GraphInfo
{
    std::string name; // <name>.onnx (and <name>.plan)
    std::string kind; // one of kind::*
    int64_t first = -1; // a segment's decoder layers [first, end); -1 otherwise
    int64_t end = -1;
    int64_t stage = -1; // a select's stage and layer (the next segment's first); -1 otherwise
    int64_t layer = -1;
};

struct Stage
{
    int64_t layer = 0;  // the decoder layer the selection runs before
    int64_t tokens = 0; // visual tokens kept
};

struct TokenTable
{
    std::string file; // raw, C order [vocab, hidden], little-endian
    int64_t vocab = 0;
    int64_t hidden = 0;
    std::string dtype; // float32 or float16
    bool tied = false; // the last segment's LM head reads it (an input there too)
};

struct WeightCopy
{
    std::string graph;
    std::string what;
    int64_t bytes = 0;
};

struct Weights
{
    int64_t distinctBytes = 0; // the model's distinct parameter bytes (tied ones once)
    int64_t storedBytes = 0;   // every graph's initializers and the token table
    std::vector<WeightCopy> copies; // the named exceptions stored twice
};

struct EngineManifest
{
    std::string directory;
    std::string model;
    std::string method;
    std::string dtype;   // fp32 or fp16
    std::string select;  // plugin or native
    std::string backend; // onnxruntime or tensorrt
    int64_t height = 0;  // the image's resized resolution (model.resolution)
    int64_t width = 0;
    int64_t nLayers = 0;
    int64_t nKvHeads = 0;
    int64_t headDim = 0;
    int64_t hiddenSize = 0;
    int64_t vocabSize = 0;
    int64_t nVisual = 0;
    int64_t budget = 0;
    std::vector<Stage> stages;          // per selection stage, in order
    std::vector<int64_t> tokensPerLayer; // per layer: visual tokens it holds
    int64_t batch = 0;
    int64_t maxPrompt = 0;    // the longest prompt (nVisual + maxTextTokens); prompts are not padded
    int64_t maxTextTokens = 0;
    int64_t maxNewTokens = 0;
    std::vector<int64_t> cacheLen; // per layer: maxPrompt - nVisual + its visual tokens + maxNewTokens
    int32_t imageToken = 0;
    int32_t eosToken = 0;
    int32_t padToken = 0;
    std::map<std::string, std::string> files; // file name -> sha256
    std::vector<GraphInfo> graphs;            // in run order
    TokenTable tokenTable;
    Weights weights;
    std::map<std::string, GraphIO> io; // by graph name

    KvLayout kvLayout() const;

    // The graph named `name`; throws one line "engine DIR: has no graph NAME; rebuild it ..." if none.
    GraphInfo const& graph(std::string const& name) const;
    std::vector<GraphInfo> segments() const;
    std::vector<GraphInfo> selects() const;

    // The tokens `segment` runs in the prefill of a prompt of `promptLen` tokens (its caches' fill).
    int64_t segmentPrefillLen(GraphInfo const& segment, int64_t promptLen) const;

    // The tensor of `graph` with this role (and layer for the caches, stage for kept). Throws
    // std::runtime_error with one line, "engine DIR: <graph> has no <role> <input/output>; rebuild it ...",
    // when the manifest records none.
    TensorSpec const& find(std::string const& graph, bool output, std::string const& role, int64_t layer = -1,
        int64_t stage = -1) const;

    // The cache tensors of `graph` (a segment's layers), layer by layer: key, value, valid.
    std::vector<TensorSpec> caches(std::string const& graph, bool output) const;
};

// Reads DIR/manifest.json. Throws std::runtime_error with one line saying what is wrong and to rebuild the
// engine: missing, not JSON, another format, or JSON of the wrong shape (the field, its value, what is allowed).
EngineManifest readManifest(std::string const& directory);

// The same from the file's text (the tests' and fuzzers' entry); `directory` only names the engine in errors.
EngineManifest parseManifest(std::string const& text, std::string const& directory);

} // namespace iwp
