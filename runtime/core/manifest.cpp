#include "manifest.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <set>
#include <stdexcept>
#include <tuple>

namespace iwp
{
namespace
{
using Json = nlohmann::json;

std::string const kRebuild = "; rebuild it with `make engine`";

// What is wrong with the document, without the engine's name and the rebuild hint (parseManifest adds both).
class ShapeError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

char const* kindOf(Json const& value)
{
    switch (value.type())
    {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "an integer";
    case Json::value_t::number_float: return "a number";
    case Json::value_t::string: return "a string";
    case Json::value_t::array: return "an array";
    case Json::value_t::object: return "an object";
    default: return "not a JSON value";
    }
}

// A value as compact ASCII JSON, shortened: safe to put on the error's one line whatever the file holds.
std::string shown(Json const& value)
{
    std::string text = value.dump(-1, ' ', true, Json::error_handler_t::replace);
    return text.size() > 40 ? text.substr(0, 37) + "..." : text;
}

// A value in the document and its path (e.g. io.prefill.outputs[3].layer), so every error names the field.
class Field
{
public:
    Field(Json const& value, std::string path)
        : mValue(value)
        , mPath(std::move(path))
    {
    }

    [[noreturn]] void fail(std::string const& what) const
    {
        throw ShapeError(mPath.empty() ? "manifest.json " + what : "manifest.json field " + mPath + " " + what);
    }

    [[noreturn]] void wrongType(char const* wanted) const
    {
        fail(std::string("is ") + kindOf(mValue) + ", not " + wanted);
    }

    Json const& json() const { return mValue; }

    bool has(std::string const& key) const
    {
        return mValue.is_object() && mValue.contains(key) && !mValue.at(key).is_null();
    }

    Field operator[](std::string const& key) const
    {
        if (!mValue.is_object())
        {
            wrongType("an object");
        }
        auto const it = mValue.find(key);
        std::string const path = mPath.empty() ? key : mPath + "." + key;
        if (it == mValue.end())
        {
            throw ShapeError("manifest.json field " + path + " is missing");
        }
        return Field(*it, path);
    }

    std::vector<Field> elements() const
    {
        if (!mValue.is_array())
        {
            wrongType("an array");
        }
        std::vector<Field> out;
        for (size_t i = 0; i < mValue.size(); ++i)
        {
            out.emplace_back(mValue[i], mPath + "[" + std::to_string(i) + "]");
        }
        return out;
    }

    // A whole number in [least, most]: JSON integers only (not 2.0, not true), as the Python reader takes them.
    int64_t integer(int64_t least = std::numeric_limits<int64_t>::min(),
        int64_t most = std::numeric_limits<int64_t>::max()) const
    {
        if (!mValue.is_number_integer())
        {
            wrongType("an integer");
        }
        bool const tooLarge = mValue.is_number_unsigned()
            && mValue.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
        int64_t const value = tooLarge ? 0 : mValue.get<int64_t>();
        if (tooLarge || value < least || value > most)
        {
            std::string range = most == std::numeric_limits<int64_t>::max()
                ? ">= " + std::to_string(least)
                : "in [" + std::to_string(least) + ", " + std::to_string(most) + "]";
            fail("is " + shown(mValue) + ", not an integer " + range);
        }
        return value;
    }

    std::string const& string() const
    {
        if (!mValue.is_string())
        {
            wrongType("a string");
        }
        return mValue.get_ref<std::string const&>();
    }

    std::string const& oneOf(std::vector<std::string> const& allowed) const
    {
        std::string const& value = string();
        if (std::find(allowed.begin(), allowed.end(), value) == allowed.end())
        {
            std::string list;
            for (std::string const& a : allowed)
            {
                list += (list.empty() ? "" : ", ") + a;
            }
            fail("is " + shown(mValue) + ", not one of " + list);
        }
        return value;
    }

    std::vector<int64_t> integers(int64_t least) const
    {
        std::vector<int64_t> out;
        for (Field const& item : elements())
        {
            out.push_back(item.integer(least));
        }
        return out;
    }

private:
    Json const& mValue;
    std::string mPath;
};

std::vector<std::string> const kDtypes{"float32", "float16", "bfloat16", "int64", "int32", "bool"};

bool isCacheRole(std::string const& r)
{
    return r == role::kKey || r == role::kValue || r == role::kValid;
}

// A recorded dimension: a size, or a dynamic dimension's name.
Dim readDim(Field const& field)
{
    Dim dim;
    if (field.json().is_string())
    {
        dim.symbol = field.string();
        if (dim.symbol.empty())
        {
            field.fail("is an empty dimension name");
        }
        return dim;
    }
    if (!field.json().is_number_integer())
    {
        field.wrongType("an integer or a dimension name");
    }
    dim.size = field.integer(0);
    return dim;
}

TensorSpec readTensor(Field const& field, std::vector<std::string> const& roles, EngineManifest const& m)
{
    TensorSpec t;
    t.name = field["name"].string();
    if (t.name.empty())
    {
        field["name"].fail("is empty");
    }
    for (Field const& dim : field["shape"].elements())
    {
        t.shape.push_back(readDim(dim));
    }
    t.dtype = field["dtype"].oneOf(kDtypes);
    t.role = field["role"].oneOf(roles);
    // layer on the caches, stage on kept; on any other role they are absent (or null)
    if (isCacheRole(t.role))
    {
        t.layer = field["layer"].integer(0, m.nLayers - 1);
    }
    else if (field.has("layer"))
    {
        field["layer"].fail("is set, but role " + t.role + " takes no layer");
    }
    if (t.role == role::kKept)
    {
        if (m.stages == 0)
        {
            field["role"].fail("is kept, but method.stages records no selection stage");
        }
        t.stage = field["stage"].integer(0, m.stages - 1);
    }
    else if (field.has("stage"))
    {
        field["stage"].fail("is set, but role " + t.role + " takes no stage");
    }
    return t;
}

GraphIO readGraph(Field const& field, RoleSet const& roles, EngineManifest const& m)
{
    GraphIO io;
    for (bool output : {false, true})
    {
        std::set<std::string> names;
        std::vector<Field> const items = field[output ? "outputs" : "inputs"].elements();
        std::vector<TensorSpec>& specs = output ? io.outputs : io.inputs;
        std::set<std::tuple<std::string, int64_t, int64_t>> seen;
        for (size_t i = 0; i < items.size(); ++i)
        {
            specs.push_back(readTensor(items[i], output ? roles.outputs : roles.inputs, m));
            TensorSpec const& t = specs.back();
            // find() must have one answer, and a side's tensor names are unique (ONNX and TensorRT need it)
            if (!seen.emplace(t.role, t.layer, t.stage).second)
            {
                items[i]["role"].fail("repeats role " + t.role + " (layer " + std::to_string(t.layer) + ", stage "
                    + std::to_string(t.stage) + ")");
            }
            if (!names.insert(t.name).second)
            {
                items[i]["name"].fail("repeats the name " + shown(items[i]["name"].json()));
            }
        }
    }
    return io;
}

// Where the parser stopped, as line and column (nlohmann reports a byte offset, 1-based).
std::string position(std::string const& text, size_t byte)
{
    size_t const end = std::min(byte > 0 ? byte - 1 : 0, text.size());
    size_t const line = 1 + static_cast<size_t>(std::count(text.begin(), text.begin() + end, '\n'));
    size_t const lineStart = text.rfind('\n', end == 0 ? 0 : end - 1);
    size_t const column = lineStart == std::string::npos || end == 0 ? end + 1 : end - lineStart;
    return "line " + std::to_string(line) + ", column " + std::to_string(column);
}

EngineManifest read(Json const& doc, std::string const& directory)
{
    Field const root(doc, "");
    if (!doc.is_object())
    {
        root.wrongType("an object");
    }
    int64_t const format = root["format"].integer();
    if (format != kManifestFormat)
    {
        throw ShapeError("manifest format " + std::to_string(format) + " is not this runtime's format "
            + std::to_string(kManifestFormat));
    }
    EngineManifest m;
    m.directory = directory;
    Field const model = root["model"];
    Field const shapes = root["shapes"];
    Field const tokens = root["tokens"];
    m.model = model["name"].string();
    m.method = root["method"]["name"].string();
    m.dtype = root["dtype"].oneOf({"fp32", "fp16"});
    m.nLayers = model["n_layers"].integer(1);
    m.nKvHeads = model["n_kv_heads"].integer(1);
    m.headDim = model["head_dim"].integer(1);
    m.hiddenSize = model["hidden_size"].integer(1);
    m.vocabSize = model["vocab_size"].integer(1);
    m.maxPrompt = shapes["max_prompt"].integer(1);
    m.nVisual = model["n_visual"].integer(1);
    m.maxNewTokens = shapes["max_new_tokens"].integer(1);
    m.prefillLen = shapes["prefill_len"].integers(1);
    m.cacheLen = shapes["cache_len"].integers(1);
    for (Field const& stage : root["method"]["stages"].elements()) // [layer, tokens kept] per stage
    {
        std::vector<int64_t> const pair = stage.integers(std::numeric_limits<int64_t>::min());
        if (pair.size() != 2)
        {
            stage.fail("has " + std::to_string(pair.size()) + " numbers, not [layer, tokens]");
        }
        ++m.stages;
    }
    // token ids are int32 in the runtime core (the Python reader takes any int: the one range it lacks)
    int64_t const least = std::numeric_limits<int32_t>::min(), most = std::numeric_limits<int32_t>::max();
    m.imageToken = static_cast<int32_t>(tokens["image"].integer(least, most));
    m.eosToken = static_cast<int32_t>(tokens["eos"].integer(least, most));
    m.padToken = static_cast<int32_t>(tokens["pad"].integer(least, most));
    for (auto const* lengths : {&m.prefillLen, &m.cacheLen})
    {
        if (static_cast<int64_t>(lengths->size()) != m.nLayers)
        {
            shapes[lengths == &m.cacheLen ? "cache_len" : "prefill_len"].fail("has "
                + std::to_string(lengths->size()) + " layers, not model.n_layers = " + std::to_string(m.nLayers));
        }
    }
    Field const io = root["io"];
    if (io.json().is_object()) // as the Python reader: no graph the format lacks
    {
        auto const& table = roleTable();
        for (auto const& item : io.json().items())
        {
            if (std::none_of(table.begin(), table.end(), [&](RoleSet const& r) { return r.graph == item.key(); }))
            {
                io.fail("holds " + shown(Json(item.key())) + ", not one of embed, vision, prefill, decode");
            }
        }
    }
    for (RoleSet const& roles : roleTable())
    {
        m.io[roles.graph] = readGraph(io[roles.graph], roles, m);
    }
    return m;
}
} // namespace

std::vector<RoleSet> const& roleTable()
{
    using namespace role;
    static std::vector<RoleSet> const table{
        {"embed", {kTokenIds}, {kEmbeddings}},
        {"vision", {kPixels}, {kFeatures}},
        {"prefill", {kEmbeddings, kAttentionMask, kPositions, kVisualStart, kQueryIdx, kQueryMask, kLastIdx},
            {kLogits, kKept, kKey, kValue, kValid}},
        {"decode", {kEmbeddings, kPosition, kStep, kKey, kValue, kValid}, {kLogits, kKey, kValue, kValid}},
    };
    return table;
}

KvLayout EngineManifest::kvLayout() const
{
    KvLayout layout;
    layout.capacities = cacheLen;
    layout.kvHeads = nKvHeads;
    layout.headDim = headDim;
    layout.elementBytes = dtype == "fp16" ? 2 : 4;
    return layout;
}

TensorSpec const& EngineManifest::find(std::string const& graph, bool output, std::string const& role,
    int64_t layer, int64_t stage) const
{
    auto const it = io.find(graph);
    if (it != io.end())
    {
        for (TensorSpec const& t : output ? it->second.outputs : it->second.inputs)
        {
            if (t.role == role && t.layer == layer && t.stage == stage)
            {
                return t;
            }
        }
    }
    std::string const which = role + (layer >= 0 ? " (layer " + std::to_string(layer) + ")" : "")
        + (stage >= 0 ? " (stage " + std::to_string(stage) + ")" : "");
    throw std::runtime_error(
        "engine " + directory + ": " + graph + " has no " + which + (output ? " output" : " input") + kRebuild);
}

EngineManifest parseManifest(std::string const& text, std::string const& directory)
{
    std::string const prefix = "engine " + directory + ": ";
    Json doc;
    try
    {
        doc = Json::parse(text);
    }
    catch (Json::parse_error const& error)
    {
        throw std::runtime_error(prefix + "manifest.json is not JSON (at " + position(text, error.byte) + ")" + kRebuild);
    }
    try
    {
        return read(doc, directory);
    }
    catch (ShapeError const& error)
    {
        throw std::runtime_error(prefix + error.what() + kRebuild);
    }
    catch (Json::exception const& error) // a check above missed a case: still one line, never a crash
    {
        throw std::runtime_error(prefix + "manifest.json is unusable (json error " + std::to_string(error.id) + ")"
            + kRebuild);
    }
}

EngineManifest readManifest(std::string const& directory)
{
    std::string const path = directory + "/manifest.json";
    std::error_code ignored;
    std::ifstream file(path, std::ios::binary);
    // a directory opens as a stream on Linux and reads as nothing: refuse it as unreadable, not as bad JSON
    if (!file || !std::filesystem::is_regular_file(path, ignored))
    {
        throw std::runtime_error("engine " + directory + ": has no readable manifest.json" + kRebuild);
    }
    std::string const text(std::istreambuf_iterator<char>(file), {});
    if (file.bad())
    {
        throw std::runtime_error("engine " + directory + ": manifest.json does not read (I/O error)" + kRebuild);
    }
    return parseManifest(text, directory);
}

} // namespace iwp
