// The format-4 manifest reader. It follows iwp/engine_format.py step for step, so that both readers refuse
// the same documents with the same line: first every field it reads is converted to its type (in the
// dataclasses' field order), then _check's ranges and vocabularies, then _check_graphs, then the io section.
// Fields a C++ app never needs (inputs_hash, flops, tools, spec, tensorrt, ...) are not read.
#include "manifest.h"
#include "manifest_json.h"

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
using namespace manifest_json;

std::vector<std::string> const kKinds{kind::kEmbed, kind::kVision, kind::kSegment, kind::kSelect};
std::vector<std::string> const kDtypes{"float32", "float16", "bfloat16", "int64", "int32", "bool"};
std::vector<std::string> const kCacheRoles{role::kKey, role::kValue, role::kValid};

bool isCacheRole(std::string const& r)
{
    return std::find(kCacheRoles.begin(), kCacheRoles.end(), r) != kCacheRoles.end();
}

bool contains(std::vector<std::string> const& words, std::string const& word)
{
    return std::find(words.begin(), words.end(), word) != words.end();
}

// A tensor as read (its checks need the graph's kind and come later, as in Python). A layer or stage that is
// set may still be negative here; the checks refuse it, so a manifest read holds -1 only where unset.
struct TensorRead
{
    TensorSpec spec;
    bool layerSet = false;
    bool stageSet = false;
    std::vector<std::string> dims; // each dimension as the file holds it, for the message (an empty name is "")
};

TensorRead readTensor(Field const& field)
{
    TensorRead read;
    TensorSpec& t = read.spec;
    t.name = field["name"].string();
    for (Field const& dim : field["shape"].elements())
    {
        Dim d;
        read.dims.push_back(shown(dim.json()));
        if (dim.json().is_string())
        {
            d.symbol = dim.string();
        }
        else if (dim.json().is_number_integer())
        {
            d.size = dim.integer();
        }
        else
        {
            dim.wrongType("an integer or a string");
        }
        t.shape.push_back(d);
    }
    t.dtype = field["dtype"].string();
    t.role = field["role"].string();
    read.layerSet = field.isSet("layer");
    read.stageSet = field.isSet("stage");
    t.layer = field.optionalInteger("layer");
    t.stage = field.optionalInteger("stage");
    return read;
}

// Where each graph's tensors were read from, for the checks' paths.
struct IoRead
{
    std::string graph;
    std::string path; // io.embed, io["segment.0"]
    std::vector<TensorRead> inputs;
    std::vector<TensorRead> outputs;
};

// The document as read: the manifest, and what its checks need to word their line as Python does.
struct Read
{
    EngineManifest m;
    std::vector<std::string> files; // in the document's order
    std::vector<bool> layersSet;    // per graph: a segment's [first, end) may be set and negative until checked
    std::vector<IoRead> io;         // in the document's order
};

std::string ioPath(std::string const& graph)
{
    return isIdentifier(graph) ? "io." + graph : "io[" + shown(graph) + "]";
}

void positive(std::string const& path, int64_t value)
{
    if (value < 1)
    {
        bad(path + " is " + std::to_string(value) + ", not an integer >= 1");
    }
}

// _check_graphs: embed and vision, then segments covering every layer in order with a select at each stage
// layer (before the first segment when the stage is at layer 0), segments and selects alternating.
void checkGraphs(EngineManifest const& m, std::vector<bool> const& layersSet)
{
    auto const& graphs = m.graphs;
    for (size_t i = 0; i < graphs.size(); ++i)
    {
        GraphInfo const& g = graphs[i];
        std::string const where = "graphs[" + std::to_string(i) + "]";
        if (!contains(kKinds, g.kind))
        {
            bad(where + ".kind is " + shown(g.kind) + ", not one of " + list(kKinds));
        }
        auto const same = std::count_if(graphs.begin(), graphs.end(), [&](GraphInfo const& o) { return o.name == g.name; });
        if (same > 1 || g.name.empty() || g.name.find('/') != std::string::npos)
        {
            bad(where + ".name " + shown(g.name) + " is repeated or not a file stem");
        }
        if (m.files.count(g.name + ".onnx") == 0)
        {
            bad("files records no " + g.name + ".onnx");
        }
        if (m.io.count(g.name) == 0)
        {
            bad(ioPath(g.name) + " is missing");
        }
    }
    if (graphs.size() < 2 || graphs[0].kind != kind::kEmbed || graphs[1].kind != kind::kVision)
    {
        bad("graphs does not start with the embed and vision graphs");
    }
    int64_t end = 0;
    size_t stage = 0;
    std::string previous;
    for (size_t i = 2; i < graphs.size(); ++i)
    {
        GraphInfo const& g = graphs[i];
        std::string const where = "graphs[" + std::to_string(i) + "]";
        if ((g.kind != kind::kSegment && g.kind != kind::kSelect) || g.kind == previous)
        {
            bad(where + " is a " + g.kind + " after a " + (previous.empty() ? "vision" : previous)
                + ": segments and selects alternate after embed and vision");
        }
        if (g.kind == kind::kSegment)
        {
            if (!layersSet[i] || g.first != end || !(g.first < g.end && g.end <= m.nLayers))
            {
                std::string const layers = layersSet[i] ? shown(Json::array({g.first, g.end})) : "null";
                bad(where + ".layers is " + layers + ", not a range of layers from " + std::to_string(end));
            }
            end = g.end;
        }
        else
        {
            if (stage >= m.stages.size() || g.stage != static_cast<int64_t>(stage) || g.layer != end
                || g.layer != m.stages[stage].layer)
            {
                bad(where + " is not stage " + std::to_string(stage) + " at layer " + std::to_string(end));
            }
            ++stage;
        }
        previous = g.kind;
    }
    if (end != m.nLayers || previous != kind::kSegment)
    {
        bad("graphs' segments end at layer " + std::to_string(end) + ", not model.n_layers "
            + std::to_string(m.nLayers));
    }
    if (stage != m.stages.size())
    {
        bad("graphs has " + std::to_string(stage) + " selects, not one per method stage ("
            + std::to_string(m.stages.size()) + ")");
    }
}

// _check_tensor
void checkTensor(EngineManifest const& m, TensorRead const& read, std::string const& path,
    std::vector<std::string> const& roles)
{
    TensorSpec const& t = read.spec;
    if (t.name.empty())
    {
        bad(path + ".name is empty");
    }
    if (!contains(kDtypes, t.dtype))
    {
        bad(path + ".dtype is " + shown(t.dtype) + ", not one of " + list(kDtypes));
    }
    if (!contains(roles, t.role))
    {
        bad(path + ".role is " + shown(t.role) + ", not one of " + list(roles));
    }
    for (size_t i = 0; i < t.shape.size(); ++i)
    {
        Dim const& d = t.shape[i];
        if (d.isStatic() ? d.size < 0 : d.symbol.empty())
        {
            bad(path + ".shape[" + std::to_string(i) + "] is " + read.dims[i] + ", not a size or a dimension name");
        }
    }
    struct Index
    {
        char const* key;
        int64_t value;
        bool set;
        int64_t count;
        bool wanted;
    };
    for (Index const& index : {Index{"layer", t.layer, read.layerSet, m.nLayers, isCacheRole(t.role)},
             Index{"stage", t.stage, read.stageSet, static_cast<int64_t>(m.stages.size()), t.role == role::kKept}})
    {
        std::string const key = index.key;
        if (index.wanted && !index.set)
        {
            bad(path + "." + key + " is missing (role " + t.role + " takes one)");
        }
        if (!index.wanted && index.set)
        {
            bad(path + "." + key + " is set, but role " + t.role + " takes no " + key);
        }
        if (index.wanted && !(0 <= index.value && index.value < index.count))
        {
            bad(path + "." + key + " is " + std::to_string(index.value) + ", not in [0, "
                + std::to_string(index.count - 1) + "]");
        }
    }
}

// Every field this reader reads converted to its type, in engine_format's field order.
Read readFields(Json const& doc, std::string const& directory)
{
    if (!doc.is_object())
    {
        throw ShapeError(std::string("manifest.json is ") + kindOf(doc) + ", not an object");
    }
    auto const format = doc.find("format");
    Json const formatValue = format == doc.end() ? Json() : *format;
    bool const four = (formatValue.is_number_integer() && formatValue == kManifestFormat)
        || (formatValue.is_number_float() && formatValue.get<double>() == kManifestFormat);
    if (!four)
    {
        throw ShapeError("manifest format " + shown(formatValue) + " is not this iwp's format "
            + std::to_string(kManifestFormat));
    }
    Field const root(doc, "");
    root["format"].integer(); // 4.0 equals 4 above, and is still not an integer

    Read read;
    EngineManifest& m = read.m;
    m.directory = directory;
    Field const model = root["model"];
    m.model = model["name"].string();
    std::vector<Field> const resolution = model["resolution"].elements(2);
    m.height = resolution[0].integer();
    m.width = resolution[1].integer();
    m.nVisual = model["n_visual"].integer();
    m.nLayers = model["n_layers"].integer();
    m.hiddenSize = model["hidden_size"].integer();
    m.nKvHeads = model["n_kv_heads"].integer();
    m.headDim = model["head_dim"].integer();
    m.vocabSize = model["vocab_size"].integer();
    Field const method = root["method"];
    m.method = method["name"].string();
    m.budget = method["budget"].integer();
    for (Field const& stage : method["stages"].elements()) // [layer, tokens kept] per stage
    {
        std::vector<Field> const pair = stage.elements(2);
        m.stages.push_back(Stage{pair[0].integer(), pair[1].integer()});
    }
    for (Field const& tokens : method["tokens_per_layer"].elements())
    {
        m.tokensPerLayer.push_back(tokens.integer());
    }
    Field const shapes = root["shapes"];
    m.batch = shapes["batch"].integer();
    m.maxPrompt = shapes["max_prompt"].integer();
    m.maxTextTokens = shapes["max_text_tokens"].integer();
    m.maxNewTokens = shapes["max_new_tokens"].integer();
    for (Field const& capacity : shapes["cache_len"].elements())
    {
        m.cacheLen.push_back(capacity.integer());
    }
    m.dtype = root["dtype"].string();
    m.select = root["select"].string();
    m.backend = root["backend"].string();
    Field const tokens = root["tokens"];
    for (auto const& [key, id] : {std::pair<char const*, int32_t*>{"image", &m.imageToken}, {"eos", &m.eosToken},
             {"pad", &m.padToken}})
    {
        // token ids are int32 in the runtime core (the Python reader takes any int: the one range it lacks)
        int64_t const value = tokens[key].integer();
        if (value < std::numeric_limits<int32_t>::min() || value > std::numeric_limits<int32_t>::max())
        {
            tokens[key].fail("is " + std::to_string(value) + ", not an integer in [-2147483648, 2147483647]");
        }
        *id = static_cast<int32_t>(value);
    }
    for (auto const& [name, digest] : root["files"].entries())
    {
        m.files[name] = digest.string();
        read.files.push_back(name);
    }
    for (Field const& graph : root["graphs"].elements())
    {
        GraphInfo g;
        g.name = graph["name"].string();
        g.kind = graph["kind"].string();
        read.layersSet.push_back(graph.isSet("layers"));
        if (read.layersSet.back())
        {
            std::vector<Field> const layers = graph["layers"].elements(2);
            g.first = layers[0].integer();
            g.end = layers[1].integer();
        }
        g.stage = graph.optionalInteger("stage");
        g.layer = graph.optionalInteger("layer");
        m.graphs.push_back(g);
    }
    Field const table = root["token_table"];
    m.tokenTable.file = table["file"].string();
    std::vector<Field> const tableShape = table["shape"].elements(2);
    m.tokenTable.vocab = tableShape[0].integer();
    m.tokenTable.hidden = tableShape[1].integer();
    m.tokenTable.dtype = table["dtype"].string();
    m.tokenTable.tied = table["tied"].boolean();
    Field const weights = root["weights"];
    m.weights.distinctBytes = weights["distinct_bytes"].integer();
    m.weights.storedBytes = weights["stored_bytes"].integer();
    for (Field const& copy : weights["copies"].elements())
    {
        m.weights.copies.push_back(WeightCopy{copy["graph"].string(), copy["what"].string(), copy["bytes"].integer()});
    }
    for (auto const& [graph, sides] : root["io"].entries())
    {
        IoRead tensors{graph, ioPath(graph), {}, {}};
        GraphIO& specs = m.io[graph];
        for (bool output : {false, true})
        {
            for (Field const& t : sides[output ? "outputs" : "inputs"].elements())
            {
                (output ? tensors.outputs : tensors.inputs).push_back(readTensor(t));
                (output ? specs.outputs : specs.inputs).push_back((output ? tensors.outputs : tensors.inputs).back().spec);
            }
        }
        read.io.push_back(std::move(tensors));
    }
    return read;
}

// _check: what types alone do not say, in its order.
void check(Read const& read)
{
    EngineManifest const& m = read.m;
    for (auto const& [name, value] : {std::pair<char const*, int64_t>{"n_visual", m.nVisual}, {"n_layers", m.nLayers},
             {"hidden_size", m.hiddenSize}, {"n_kv_heads", m.nKvHeads}, {"head_dim", m.headDim},
             {"vocab_size", m.vocabSize}})
    {
        positive(std::string("model.") + name, value);
    }
    for (auto const& [name, value] : {std::pair<char const*, int64_t>{"batch", m.batch}, {"max_prompt", m.maxPrompt},
             {"max_text_tokens", m.maxTextTokens}, {"max_new_tokens", m.maxNewTokens}})
    {
        positive(std::string("shapes.") + name, value);
    }
    if (static_cast<int64_t>(m.cacheLen.size()) != m.nLayers)
    {
        bad("shapes.cache_len has " + std::to_string(m.cacheLen.size()) + " layers, not model.n_layers "
            + std::to_string(m.nLayers));
    }
    for (size_t i = 0; i < m.cacheLen.size(); ++i)
    {
        positive("shapes.cache_len[" + std::to_string(i) + "]", m.cacheLen[i]);
    }
    if (static_cast<int64_t>(m.tokensPerLayer.size()) != m.nLayers)
    {
        bad("method.tokens_per_layer has " + std::to_string(m.tokensPerLayer.size()) + " layers, not model.n_layers "
            + std::to_string(m.nLayers));
    }
    for (auto const& [path, value, allowed] :
        {std::tuple<char const*, std::string const*, std::vector<std::string>>{"dtype", &m.dtype, {"fp32", "fp16"}},
            {"select", &m.select, {"plugin", "native"}}, {"backend", &m.backend, {"onnxruntime", "tensorrt"}}})
    {
        if (!contains(allowed, *value))
        {
            bad(std::string(path) + " is " + shown(*value) + ", not one of " + list(allowed));
        }
    }
    for (std::string const& name : read.files)
    {
        if (name.empty() || name == "." || name == ".." || name.find_first_of(std::string("/\\\0", 3)) != std::string::npos)
        {
            bad("files holds " + shown(name) + ", not a file name in the engine directory");
        }
    }
    checkGraphs(m, read.layersSet);
    if (m.files.count(m.tokenTable.file) == 0)
    {
        bad("files records no token table " + shown(m.tokenTable.file));
    }
    if (m.tokenTable.vocab != m.vocabSize || m.tokenTable.hidden != m.hiddenSize)
    {
        bad("token_table.shape is [" + std::to_string(m.tokenTable.vocab) + ", " + std::to_string(m.tokenTable.hidden)
            + "], not [model.vocab_size, model.hidden_size]");
    }
    if (m.tokenTable.dtype != "float32" && m.tokenTable.dtype != "float16")
    {
        bad("token_table.dtype is " + shown(m.tokenTable.dtype) + ", not float32 or float16");
    }
    for (IoRead const& tensors : read.io)
    {
        auto const graph = std::find_if(
            m.graphs.begin(), m.graphs.end(), [&](GraphInfo const& g) { return g.name == tensors.graph; });
        if (graph == m.graphs.end())
        {
            bad("io holds " + shown(tensors.graph) + ", which is not in graphs");
        }
        RoleSet const& roles = *std::find_if(
            roleTable().begin(), roleTable().end(), [&](RoleSet const& r) { return r.kind == graph->kind; });
        for (bool output : {false, true})
        {
            std::set<std::tuple<std::string, int64_t, int64_t>> seen;
            std::set<std::string> names;
            std::vector<TensorRead> const& specs = output ? tensors.outputs : tensors.inputs;
            for (size_t i = 0; i < specs.size(); ++i)
            {
                TensorSpec const& t = specs[i].spec;
                std::string const path = tensors.path + (output ? ".outputs[" : ".inputs[") + std::to_string(i) + "]";
                checkTensor(m, specs[i], path, output ? roles.outputs : roles.inputs);
                // find() must have one answer, and a side's tensor names are unique (ONNX and TensorRT need it)
                if (!seen.emplace(t.role, t.layer, t.stage).second)
                {
                    bad(path + ".role repeats role " + t.role);
                }
                if (!names.insert(t.name).second)
                {
                    bad(path + ".name repeats the name " + shown(t.name));
                }
            }
        }
    }
}

EngineManifest read(Json const& doc, std::string const& directory)
{
    Read read = readFields(doc, directory);
    check(read);
    return std::move(read.m);
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
} // namespace

std::vector<RoleSet> const& roleTable()
{
    using namespace role;
    static std::vector<RoleSet> const table{
        {kind::kEmbed, {kTokenIds, kTokenTable}, {kEmbeddings}},
        {kind::kVision, {kPixels}, {kFeatures}},
        {kind::kSegment, {kHidden, kPositions, kOffset, kTokenTable, kKey, kValue, kValid},
            {kHidden, kLogits, kTransitions, kKey, kValue, kValid}},
        {kind::kSelect, {kHidden, kPositions, kVisualStart, kQueryIdx, kQueryMask, kLastIdx, kAlive, kTtv, kTransitions},
            {kKept, kHidden, kPositions, kQueryIdx, kLastIdx, kTtv}},
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

GraphInfo const& EngineManifest::graph(std::string const& name) const
{
    for (GraphInfo const& g : graphs)
    {
        if (g.name == name)
        {
            return g;
        }
    }
    throw std::runtime_error("engine " + directory + ": has no graph " + name + kRebuild);
}

std::vector<GraphInfo> EngineManifest::segments() const
{
    std::vector<GraphInfo> out;
    std::copy_if(graphs.begin(), graphs.end(), std::back_inserter(out),
        [](GraphInfo const& g) { return g.kind == kind::kSegment; });
    return out;
}

std::vector<GraphInfo> EngineManifest::selects() const
{
    std::vector<GraphInfo> out;
    std::copy_if(graphs.begin(), graphs.end(), std::back_inserter(out),
        [](GraphInfo const& g) { return g.kind == kind::kSelect; });
    return out;
}

int64_t EngineManifest::segmentPrefillLen(GraphInfo const& segment, int64_t promptLen) const
{
    if (segment.kind != kind::kSegment || segment.first < 0 || segment.first >= nLayers)
    {
        throw std::invalid_argument("segmentPrefillLen: " + segment.name + " is not a segment of this engine");
    }
    return promptLen - nVisual + tokensPerLayer.at(static_cast<size_t>(segment.first));
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

std::vector<TensorSpec> EngineManifest::caches(std::string const& graphName, bool output) const
{
    auto const it = io.find(graphName);
    if (it == io.end())
    {
        graph(graphName); // throws the one line
    }
    std::vector<TensorSpec> out;
    for (TensorSpec const& t : output ? it->second.outputs : it->second.inputs)
    {
        if (isCacheRole(t.role))
        {
            out.push_back(t);
        }
    }
    auto const order = [](TensorSpec const& t) {
        return std::make_pair(t.layer, std::find(kCacheRoles.begin(), kCacheRoles.end(), t.role) - kCacheRoles.begin());
    };
    std::stable_sort(out.begin(), out.end(), [&](TensorSpec const& a, TensorSpec const& b) { return order(a) < order(b); });
    return out;
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
        throw std::runtime_error(
            prefix + "manifest.json is corrupt (not JSON, at " + position(text, error.byte) + ")" + kRebuild);
    }
    catch (Json::exception const& error) // a number past a double, say: still not JSON this reader takes
    {
        throw std::runtime_error(prefix + "manifest.json is corrupt (not JSON: json error " + std::to_string(error.id)
            + ")" + kRebuild);
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
