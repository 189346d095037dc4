// An engine directory's manifest.json, read in C++: the shapes, token ids and per-layer cache capacities a
// C++ app needs to size the KV arena and feed the graphs. The JSON reader is a small recursive-descent
// parser of standard JSON (RFC 8259), enough for the manifests iwp writes; errors name the byte offset.
#pragma once

#include "kv_arena.h"

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace iwp
{

// The engine format this runtime reads (export/engine.py FORMAT; a test holds the two equal).
constexpr int kManifestFormat = 2;

class Json
{
public:
    enum class Type
    {
        kNull,
        kBool,
        kNumber,
        kString,
        kArray,
        kObject
    };

    static Json parse(std::string const& text);

    Type type() const { return mType; }
    bool isNull() const { return mType == Type::kNull; }
    // Typed access; each throws std::runtime_error naming the expected type when the value is another.
    bool asBool() const;
    double asNumber() const;
    int64_t asInt() const; // a number that is a whole value
    std::string const& asString() const;
    std::vector<Json> const& asArray() const;
    // Object member by key; throws naming the key when it is missing.
    Json const& operator[](std::string const& key) const;
    bool has(std::string const& key) const;

private:
    friend class JsonParser;
    Type mType = Type::kNull;
    bool mBool = false;
    double mNumber = 0.0;
    std::string mString;
    std::vector<Json> mArray;
    std::map<std::string, Json> mObject;
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
    int64_t stages = 0;              // selection stages (kept.* outputs of the prefill)
    int32_t imageToken = 0;
    int32_t eosToken = 0;
    int32_t padToken = 0;

    KvLayout kvLayout() const;
};

// Reads DIR/manifest.json. Throws std::runtime_error with one line saying what is wrong and to rebuild the
// engine (missing, corrupt, another format, missing fields).
EngineManifest readManifest(std::string const& directory);

} // namespace iwp
