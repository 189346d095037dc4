// iwp.runtime._core: the runtime core for Python. The ONNX Runtime backend is a Python class that
// implements Backend.decode, so the decode loop below is the same C++ loop a C++ app drives.
#include "generate.h"
#include "kv_arena.h"
#include "manifest.h"
#include "prompt.h"
#include "sampler.h"

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace iwp
{
namespace
{

// A Backend implemented in Python: decode() returns [vocab] (or [1, vocab]) float32 logits.
class PyBackend : public Backend
{
public:
    float const* decode(int32_t token, int64_t position, int64_t step, KvArena& arena) override
    {
        py::gil_scoped_acquire gil;
        py::function override = py::get_override(static_cast<Backend const*>(this), "decode");
        if (!override)
        {
            throw std::runtime_error("Backend.decode is not implemented");
        }
        py::object logits = override(token, position, step, py::cast(&arena, py::return_value_policy::reference));
        mLast = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(logits);
        if (!mLast || static_cast<size_t>(mLast.size()) != vocab())
        {
            throw std::runtime_error("Backend.decode must return " + std::to_string(vocab()) + " logits");
        }
        return mLast.data();
    }

    size_t vocab() const override
    {
        PYBIND11_OVERRIDE_PURE(size_t, Backend, vocab);
    }

private:
    py::array_t<float> mLast; // keeps the returned logits alive until the next step
};

// A numpy view of one arena buffer; the array keeps the arena alive.
py::array view(py::object owner, void* data, py::dtype dtype, std::vector<py::ssize_t> shape)
{
    return py::array(dtype, shape, data, owner);
}

py::dtype cacheDtype(KvArena const& arena)
{
    return arena.layout().elementBytes == 2 ? py::dtype("float16") : py::dtype("float32");
}

// A seed as Python takes it: any int (or object with __index__), wrapped to uint64 the way the pure-Python
// reference does (seed & (2**64 - 1)), so negative seeds and seeds past 64 bits draw the same tokens.
uint64_t wrapSeed(py::handle seed)
{
    py::object const index = py::reinterpret_steal<py::object>(PyNumber_Index(seed.ptr()));
    if (!index)
    {
        PyErr_Clear();
        throw py::type_error("seed must be an int, got " + std::string(py::str(py::type::of(seed).attr("__name__"))));
    }
    unsigned long long const wrapped = PyLong_AsUnsignedLongLongMask(index.ptr()); // modulo 2**64
    if (PyErr_Occurred())
    {
        throw py::error_already_set();
    }
    return static_cast<uint64_t>(wrapped);
}

py::object optionalIndex(int64_t value)
{
    return value < 0 ? py::none() : py::object(py::int_(value));
}

py::list shapeOf(TensorSpec const& t)
{
    py::list shape;
    for (Dim const& dim : t.shape)
    {
        shape.append(dim.isStatic() ? py::object(py::int_(dim.size)) : py::object(py::str(dim.symbol)));
    }
    return shape;
}

} // namespace
} // namespace iwp

PYBIND11_MODULE(_core, m)
{
    using namespace iwp;
    m.doc() = "iwp's runtime core: the KV arena, the samplers, the decode loop and the engine manifest (format 4)";
    m.attr("MANIFEST_FORMAT") = kManifestFormat;
    m.def(
        "role_table",
        [] {
            py::dict table;
            for (RoleSet const& roles : roleTable())
            {
                py::dict sides;
                sides["inputs"] = py::tuple(py::cast(roles.inputs));
                sides["outputs"] = py::tuple(py::cast(roles.outputs));
                table[py::str(roles.kind)] = sides;
            }
            return table;
        },
        "The C++ role vocabulary: {kind: {'inputs': roles, 'outputs': roles}} in KINDS order.");

    py::class_<TensorSpec>(m, "TensorSpec")
        .def_readonly("name", &TensorSpec::name)
        .def_property_readonly("shape", &shapeOf, "ints for static dimensions, names for dynamic ones")
        .def_readonly("dtype", &TensorSpec::dtype)
        .def_readonly("role", &TensorSpec::role)
        .def_property_readonly("layer", [](TensorSpec const& t) { return optionalIndex(t.layer); })
        .def_property_readonly("stage", [](TensorSpec const& t) { return optionalIndex(t.stage); })
        .def("__repr__", [](TensorSpec const& t) {
            return "TensorSpec(" + std::string(py::repr(py::str(t.name))) + ", " + std::string(py::repr(shapeOf(t)))
                + ", " + t.dtype + ", " + t.role + (t.layer >= 0 ? ", layer " + std::to_string(t.layer) : "")
                + (t.stage >= 0 ? ", stage " + std::to_string(t.stage) : "") + ")";
        });
    py::class_<GraphIO>(m, "GraphIO")
        .def_readonly("inputs", &GraphIO::inputs)
        .def_readonly("outputs", &GraphIO::outputs);
    // The attributes Python's GraphInfo, TokenTable and WeightCopy have, with the same values (None where unset).
    py::class_<GraphInfo>(m, "GraphInfo")
        .def_readonly("name", &GraphInfo::name)
        .def_readonly("kind", &GraphInfo::kind)
        .def_property_readonly("layers",
            [](GraphInfo const& g) { return g.first < 0 ? py::object(py::none()) : py::object(py::make_tuple(g.first, g.end)); })
        .def_property_readonly("stage", [](GraphInfo const& g) { return optionalIndex(g.stage); })
        .def_property_readonly("layer", [](GraphInfo const& g) { return optionalIndex(g.layer); })
        .def("__repr__", [](GraphInfo const& g) { return "GraphInfo(" + g.name + ", " + g.kind + ")"; });
    py::class_<TokenTable>(m, "TokenTable")
        .def_readonly("file", &TokenTable::file)
        .def_property_readonly("shape", [](TokenTable const& t) { return py::make_tuple(t.vocab, t.hidden); })
        .def_readonly("dtype", &TokenTable::dtype)
        .def_readonly("tied", &TokenTable::tied);
    py::class_<WeightCopy>(m, "WeightCopy")
        .def_readonly("graph", &WeightCopy::graph)
        .def_readonly("what", &WeightCopy::what)
        .def_readonly("bytes", &WeightCopy::bytes);
    py::class_<Weights>(m, "Weights")
        .def_readonly("distinct_bytes", &Weights::distinctBytes)
        .def_readonly("stored_bytes", &Weights::storedBytes)
        .def_readonly("copies", &Weights::copies);

    auto side = [](std::string const& kind) {
        if (kind != "inputs" && kind != "outputs")
        {
            throw py::value_error("side must be 'inputs' or 'outputs', got " + std::string(py::repr(py::str(kind))));
        }
        return kind == "outputs";
    };
    py::class_<EngineManifest>(m, "EngineManifest")
        .def_readonly("directory", &EngineManifest::directory)
        .def_readonly("model", &EngineManifest::model)
        .def_readonly("method", &EngineManifest::method)
        .def_readonly("dtype", &EngineManifest::dtype)
        .def_readonly("select", &EngineManifest::select)
        .def_readonly("backend", &EngineManifest::backend)
        .def_property_readonly("resolution", [](EngineManifest const& e) { return py::make_tuple(e.height, e.width); })
        .def_readonly("n_layers", &EngineManifest::nLayers)
        .def_readonly("n_kv_heads", &EngineManifest::nKvHeads)
        .def_readonly("head_dim", &EngineManifest::headDim)
        .def_readonly("hidden_size", &EngineManifest::hiddenSize)
        .def_readonly("vocab_size", &EngineManifest::vocabSize)
        .def_readonly("n_visual", &EngineManifest::nVisual)
        .def_readonly("budget", &EngineManifest::budget)
        .def_property_readonly("stages",
            [](EngineManifest const& e) {
                py::list stages; // ((layer, tokens kept), ...) as method.stages
                for (Stage const& s : e.stages)
                {
                    stages.append(py::make_tuple(s.layer, s.tokens));
                }
                return py::tuple(stages);
            })
        .def_property_readonly("tokens_per_layer", [](EngineManifest const& e) { return py::tuple(py::cast(e.tokensPerLayer)); })
        .def_readonly("batch", &EngineManifest::batch)
        .def_readonly("max_prompt", &EngineManifest::maxPrompt)
        .def_readonly("max_text_tokens", &EngineManifest::maxTextTokens)
        .def_readonly("max_new_tokens", &EngineManifest::maxNewTokens)
        .def_property_readonly("cache_len", [](EngineManifest const& e) { return py::tuple(py::cast(e.cacheLen)); })
        .def_readonly("image_token", &EngineManifest::imageToken)
        .def_readonly("eos_token", &EngineManifest::eosToken)
        .def_readonly("pad_token", &EngineManifest::padToken)
        .def_readonly("files", &EngineManifest::files)
        .def_property_readonly("graphs", [](EngineManifest const& e) { return py::tuple(py::cast(e.graphs)); })
        .def_readonly("token_table", &EngineManifest::tokenTable)
        .def_readonly("weights", &EngineManifest::weights)
        .def_property_readonly(
            "io",
            [](py::object self) {
                py::dict io; // in run order, as the exporter writes the section
                auto const& e = self.cast<EngineManifest const&>();
                for (GraphInfo const& g : e.graphs)
                {
                    io[py::str(g.name)] = py::cast(e.io.at(g.name), py::return_value_policy::reference_internal, self);
                }
                return io;
            },
            "{graph: GraphIO}: every graph's inputs and outputs, in the graph's own order")
        .def("graph", &EngineManifest::graph, py::arg("name"), py::return_value_policy::reference_internal)
        .def("segments", [](EngineManifest const& e) { return py::tuple(py::cast(e.segments())); })
        .def("selects", [](EngineManifest const& e) { return py::tuple(py::cast(e.selects())); })
        .def("segment_prefill_len", &EngineManifest::segmentPrefillLen, py::arg("segment"), py::arg("prompt_len"),
            "The tokens a segment runs in the prefill of a prompt of `prompt_len` tokens (its caches' fill).")
        .def(
            "find",
            [side](EngineManifest const& self, std::string const& graph, std::string const& kind,
                std::string const& role, std::optional<int64_t> layer,
                std::optional<int64_t> stage) -> TensorSpec const& {
                bool const output = side(kind);
                if (layer.value_or(0) < 0 || stage.value_or(0) < 0) // -1 is C++'s "none": not a layer to ask for
                {
                    throw py::value_error("layer and stage are None or >= 0");
                }
                return self.find(graph, output, role, layer.value_or(-1), stage.value_or(-1));
            },
            py::arg("graph"), py::arg("kind"), py::arg("role"), py::arg("layer") = py::none(),
            py::arg("stage") = py::none(), py::return_value_policy::reference_internal,
            "The tensor of `graph` with this role (layer for the caches, stage for kept); RuntimeError if absent.")
        .def(
            "caches",
            [side](EngineManifest const& self, std::string const& graph, std::string const& kind) {
                return self.caches(graph, side(kind));
            },
            py::arg("graph"), py::arg("kind"), "The cache tensors of `graph`, layer by layer: key, value, valid.");
    m.def("read_manifest", &readManifest, py::arg("directory"), "An engine directory's manifest.json, read in C++.");
    m.def("parse_manifest", &parseManifest, py::arg("text"), py::arg("directory"),
        "A manifest's text, read as read_manifest reads DIR/manifest.json (`directory` names it in errors).");
    m.def(
        "prefill_inputs",
        [](std::vector<int32_t> const& ids, EngineManifest const& manifest) {
            PrefillInputs in = makePrefillInputs(ids, manifest);
            auto row = [](auto const& values) {
                using T = typename std::decay_t<decltype(values)>::value_type;
                py::array_t<T> out({py::ssize_t(1), static_cast<py::ssize_t>(values.size())});
                std::copy(values.begin(), values.end(), out.mutable_data());
                return out;
            };
            py::dict d; // as runtime/prompt.py's prefill_arrays, less the hidden states
            d[role::kTokenIds] = row(in.tokenIds);
            d[role::kPositions] = row(in.positions);
            d[role::kOffset] = py::array_t<int64_t>(std::vector<py::ssize_t>{}, &in.offset);
            d[role::kVisualStart] = py::array_t<int64_t>(1, &in.visualStart);
            d[role::kQueryIdx] = row(in.queryIdx);
            d[role::kQueryMask] = row(in.queryMask).attr("astype")("bool");
            d[role::kLastIdx] = py::array_t<int64_t>(1, &in.lastIdx);
            d["prompt_len"] = in.promptLen;
            d["next_position"] = in.nextPosition;
            return d;
        },
        py::arg("ids"), py::arg("manifest"),
        "One prompt's token ids (image tokens expanded), unpadded, in C++: a dict by role (token_ids for the "
        "embed graph; positions, offset, visual_start, query_idx, query_mask, last_idx for the first segment "
        "and select), plus prompt_len and next_position.");

    py::class_<KvArena>(m, "KvArena")
        .def(py::init([](std::vector<int64_t> capacities, int64_t kvHeads, int64_t headDim, size_t elementBytes) {
            return new KvArena(KvLayout{std::move(capacities), kvHeads, headDim, elementBytes});
        }),
            py::arg("capacities"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("element_bytes") = 4)
        .def_property_readonly("bytes", &KvArena::bytes, "both sets, every layer")
        .def_property_readonly("set_bytes", [](KvArena const& a) { return a.layout().setBytes(); })
        .def("unpruned_set_bytes", [](KvArena const& a, int64_t tokens) { return a.layout().unprunedSetBytes(tokens); },
            py::arg("tokens"), "one set's bytes if every layer held `tokens` slots")
        .def_property_readonly("layers", &KvArena::layers)
        .def_property_readonly("capacities", [](KvArena const& a) { return a.layout().capacities; })
        .def_property_readonly("past", &KvArena::past)
        .def_property_readonly("present", &KvArena::present)
        .def("swap", &KvArena::swap)
        .def("reset", &KvArena::reset)
        .def("key", [](py::object self, int set, size_t layer) {
            auto& a = self.cast<KvArena&>();
            auto const& l = a.layout();
            return view(self, a.key(set, layer), cacheDtype(a), {1, l.kvHeads, l.capacities.at(layer), l.headDim});
        })
        .def("value", [](py::object self, int set, size_t layer) {
            auto& a = self.cast<KvArena&>();
            auto const& l = a.layout();
            return view(self, a.value(set, layer), cacheDtype(a), {1, l.kvHeads, l.capacities.at(layer), l.headDim});
        })
        .def("valid", [](py::object self, int set, size_t layer) {
            auto& a = self.cast<KvArena&>();
            return view(self, a.valid(set, layer), py::dtype("bool"), {1, a.layout().capacities.at(layer)});
        });

    py::class_<Sampler>(m, "Sampler")
        .def(py::init([](double temperature, double topP, py::object const& seed) {
            return new Sampler(temperature, topP, wrapSeed(seed));
        }),
            py::arg("temperature") = 0.0, py::arg("top_p") = 1.0, py::arg("seed") = 0,
            "seed: any int, wrapped to uint64 (seed & (2**64 - 1)) as the Python reference wraps it")
        .def("sample", [](Sampler& s, py::array_t<float, py::array::c_style | py::array::forcecast> logits) {
            return s.sample(logits.data(), static_cast<size_t>(logits.size()));
        })
        .def_property_readonly("temperature", &Sampler::temperature)
        .def_property_readonly("top_p", &Sampler::topP);

    py::class_<Backend, PyBackend>(m, "Backend")
        .def(py::init<>())
        .def("vocab", &Backend::vocab);

    m.def(
        "generate",
        [](Backend& backend, KvArena& arena, py::array_t<float, py::array::c_style | py::array::forcecast> firstLogits,
            int64_t nextPosition, Sampler& sampler, int64_t maxNewTokens, std::vector<int32_t> stopTokens,
            py::object onToken) {
            if (static_cast<size_t>(firstLogits.size()) != backend.vocab())
            {
                throw std::invalid_argument("generate: first_logits has " + std::to_string(firstLogits.size())
                    + " values, the backend's vocab is " + std::to_string(backend.vocab()));
            }
            TokenCallback callback;
            if (!onToken.is_none())
            {
                callback = [onToken](int32_t token) {
                    py::object keep = onToken(token);
                    return keep.is_none() || keep.cast<bool>();
                };
            }
            return generate(backend, arena, firstLogits.data(), nextPosition, sampler,
                StopConditions{maxNewTokens, std::move(stopTokens)}, callback);
        },
        py::arg("backend"), py::arg("arena"), py::arg("first_logits"), py::arg("next_position"), py::arg("sampler"),
        py::arg("max_new_tokens"), py::arg("stop_tokens"), py::arg("on_token") = py::none(),
        "The decode loop: tokens from the prefill's last logits, stopping at a stop token or max_new_tokens.");
}
