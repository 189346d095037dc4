#include "trt_engine.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace iwp
{
namespace
{
std::string const kRebuildPlans = "build it with `make engine BACKEND=tensorrt`";

using trt::check;
using trt::readFile;

float halfToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F;
    uint32_t mantissa = h & 0x3FF;
    uint32_t bits;
    if (exponent == 0x1F)
    {
        bits = sign | 0x7F800000 | (mantissa << 13); // inf or NaN
    }
    else if (exponent == 0)
    {
        if (mantissa == 0)
        {
            bits = sign;
        }
        else // subnormal: normalize
        {
            exponent = 127 - 15 + 1;
            while ((mantissa & 0x400) == 0)
            {
                mantissa <<= 1;
                --exponent;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
        }
    }
    else
    {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

// `out.size()` values of float32 or float16 `data` as float.
void toFloat(void const* data, bool half, std::vector<float>& out)
{
    if (!half)
    {
        std::memcpy(out.data(), data, out.size() * sizeof(float));
        return;
    }
    for (size_t i = 0; i < out.size(); ++i)
    {
        uint16_t bits;
        std::memcpy(&bits, static_cast<char const*>(data) + 2 * i, 2);
        out[i] = halfToFloat(bits);
    }
}

// The dtype this runtime writes for an input role it feeds from the host (PrefillInputs, the decode scalars),
// or nullptr for one a graph before it gives.
char const* hostDtype(std::string const& name)
{
    for (char const* fed : {role::kTokenIds, role::kPositions, role::kOffset, role::kVisualStart, role::kQueryIdx,
             role::kLastIdx})
    {
        if (name == fed)
        {
            return "int64";
        }
    }
    return name == role::kQueryMask ? "bool" : nullptr;
}

bool isCache(std::string const& name)
{
    return name == role::kKey || name == role::kValue || name == role::kValid;
}

// Loads the plugin library into the process: its creators register with TensorRT's global registry when it
// is loaded (REGISTER_TENSORRT_PLUGIN). Refuses a library built for another TensorRT major version.
void* loadPlugin(std::string const& path)
{
    std::string const rebuild = "; build it with `make plugins` (TENSORRT_ROOT=<this TensorRT>)";
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (handle == nullptr)
    {
        throw std::runtime_error("plugin " + path + " does not load (" + dlerror() + ")" + rebuild);
    }
    auto info = reinterpret_cast<char const* (*) ()>(dlsym(handle, "iwpPluginInfo"));
    if (info == nullptr)
    {
        throw std::runtime_error("plugin " + path + " is not iwp's (no iwpPluginInfo)" + rebuild);
    }
    std::string const description = info();
    std::string const wanted = "TensorRT " + std::to_string(getInferLibMajorVersion()) + ".";
    if (description.find(wanted) == std::string::npos)
    {
        throw std::runtime_error("plugin " + path + " was built for another TensorRT (" + description
            + ") than this process's " + std::to_string(getInferLibMajorVersion()) + ".x" + rebuild);
    }
    return handle;
}
} // namespace

class TrtEngine::Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* message) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::fprintf(stderr, "TensorRT: %s\n", message);
        }
    }
};

TrtEngine::TrtEngine(std::string const& directory, std::string const& pluginLibrary, bool cudaGraphs)
    : mManifest(readManifest(directory))
    , mCudaGraphs(cudaGraphs)
{
    EngineManifest const& m = mManifest;
    std::string const hint = "rebuild the plans with `make engine BACKEND=tensorrt` on this machine";
    for (GraphInfo const& graph : m.graphs)
    {
        if (!std::ifstream(directory + "/" + graph.name + ".plan"))
        {
            throw std::runtime_error("engine " + directory + " has no " + graph.name + ".plan (built for ONNX Runtime "
                + "only); " + kRebuildPlans);
        }
    }
    mPlugin = loadPlugin(pluginLibrary);
    mLogger = std::make_unique<Logger>();
    mRuntime.reset(nvinfer1::createInferRuntime(*mLogger));
    if (!mRuntime)
    {
        throw std::runtime_error("TensorRT: createInferRuntime failed");
    }
    check(cudaStreamCreateWithFlags(&mStream, cudaStreamNonBlocking), "cudaStreamCreate");
    mArena = std::make_unique<KvArena>(m.kvLayout(), deviceAllocator());
    loadTokenTable(directory);

    // embed: the prompt (its length set per prefill) and one token (decode), two contexts on its one profile
    mEmbedPrompt = std::make_unique<TrtGraph>(*mRuntime, directory + "/" + kind::kEmbed + ".plan", hint);
    mEmbedPrompt->matchManifest(m.io.at(kind::kEmbed), kind::kEmbed, directory);
    mEmbedToken = std::make_unique<TrtGraph>(*mEmbedPrompt);
    std::string const tokenIds = m.find(kind::kEmbed, false, role::kTokenIds).name;
    std::string const table = m.find(kind::kEmbed, false, role::kTokenTable).name;
    std::string const embeddings = m.find(kind::kEmbed, true, role::kEmbeddings).name;
    if (m.find(kind::kEmbed, false, role::kTokenIds).dtype != hostDtype(role::kTokenIds))
    {
        throw std::runtime_error("engine " + directory + ": embed's token ids are not the int64 this runtime feeds; "
            + kRebuildPlans);
    }
    mEmbedPrompt->setMaxShapes(kPrefillProfile);
    mPromptIds = DeviceBuffer(mEmbedPrompt->bytes(tokenIds));
    mPromptEmbeds = DeviceBuffer(mEmbedPrompt->bytes(embeddings));
    mRowBytes = static_cast<size_t>(m.hiddenSize) * trt::elementSize(mEmbedPrompt->dataType(embeddings));
    if (mPromptEmbeds.bytes() != static_cast<size_t>(m.maxPrompt) * mRowBytes)
    {
        throw std::runtime_error("engine " + directory + ": embed.plan's profile does not end at the prompt capacity "
            + std::to_string(m.maxPrompt) + "; " + hint);
    }
    for (TrtGraph* embed : {mEmbedPrompt.get(), mEmbedToken.get()})
    {
        embed->bind(table, mTokenTable.get());
    }
    mEmbedPrompt->bind(tokenIds, mPromptIds.get());
    mEmbedPrompt->bind(embeddings, mPromptEmbeds.get());

    mVision = std::make_unique<TrtGraph>(*mRuntime, directory + "/" + kind::kVision + ".plan", hint);
    mVision->matchManifest(m.io.at(kind::kVision), kind::kVision, directory);
    std::string const pixels = m.find(kind::kVision, false, role::kPixels).name;
    std::string const features = m.find(kind::kVision, true, role::kFeatures).name;
    mPixelBytes = mVision->bytes(pixels);
    mPixels = DeviceBuffer(mPixelBytes);
    mFeatures = DeviceBuffer(mVision->bytes(features));
    if (mFeatures.bytes() != static_cast<size_t>(m.nVisual) * mRowBytes)
    {
        throw std::runtime_error("engine " + directory + ": the vision plan's features are not nVisual embedding rows; "
            + hint);
    }
    mVision->bind(pixels, mPixels.get());
    mVision->bind(features, mFeatures.get());

    // the prefill's own inputs, at the prompt's capacity
    int64_t const queries = m.maxPrompt - m.nVisual;
    mPositions = DeviceBuffer(8 * m.maxPrompt);
    mVisualStart = DeviceBuffer(8);
    mQueryIdx = DeviceBuffer(8 * queries);
    mQueryMask = DeviceBuffer(queries);
    mLastIdx = DeviceBuffer(8);
    mZero = DeviceBuffer(8);
    check(cudaMemset(mZero.get(), 0, 8), "cudaMemset");

    for (size_t i = 2; i < m.graphs.size(); ++i)
    {
        mChain.push_back(Link{});
        mChain.back().info = m.graphs[i];
        prepareLink(mChain.back(), directory, hint);
        if (m.graphs[i].kind == kind::kSegment)
        {
            mSegments.push_back(mChain.size() - 1);
        }
    }
    if (mSegments.empty())
    {
        throw std::runtime_error("engine " + directory + " has no segment graph; " + kRebuildPlans);
    }

    // decode: the token's embedding, then each segment over it; token, position and offsets in one pinned buffer
    mEmbedToken->setShape(tokenIds, {1, 1});
    size_t const nScalars = 2 + mSegments.size();
    mScalars = DeviceBuffer(nScalars * sizeof(int64_t));
    check(cudaMallocHost(reinterpret_cast<void**>(&mHostScalars), nScalars * sizeof(int64_t)), "cudaMallocHost");
    std::fill(mHostScalars, mHostScalars + nScalars, 0);
    mTokenEmbed = DeviceBuffer(mEmbedToken->bytes(embeddings));
    mEmbedToken->bind(tokenIds, mScalars.get());
    mEmbedToken->bind(embeddings, mTokenEmbed.get());
    void* hidden = mTokenEmbed.get();
    for (size_t j = 0; j < mSegments.size(); ++j)
    {
        Link& link = mChain[mSegments[j]];
        bool const last = j + 1 == mSegments.size();
        std::string const out = m.find(link.info.name, true, last ? role::kLogits : role::kHidden).name;
        for (int past = 0; past < 2; ++past)
        {
            bindDecode(link, j, past, hidden);
        }
        hidden = link.decodeOutputs.at(out).get();
        if (last)
        {
            mLogitsName = out;
            mDecodeLogits = hidden;
            mLogitsBytes = link.decodeOutputs.at(out).bytes();
            mLogitsHalf = link.decode[0]->dataType(out) == nvinfer1::DataType::kHALF;
        }
    }
    if (mLogitsBytes != vocab() * (mLogitsHalf ? 2 : 4))
    {
        throw std::runtime_error("engine " + directory + ": the last segment's logits are not [1, vocab]; " + hint);
    }
    check(cudaMallocHost(&mHostLogits, mLogitsBytes), "cudaMallocHost");
    mLogits.resize(vocab());
}

void TrtEngine::loadTokenTable(std::string const& directory)
{
    TokenTable const& t = mManifest.tokenTable;
    std::vector<char> const bytes = readFile(directory + "/" + t.file);
    size_t const wanted = static_cast<size_t>(t.vocab * t.hidden) * (t.dtype == "float16" ? 2 : 4);
    if (bytes.size() != wanted)
    {
        throw std::runtime_error("engine " + directory + ": " + t.file + " is " + std::to_string(bytes.size())
            + " bytes, not the manifest's [" + std::to_string(t.vocab) + ", " + std::to_string(t.hidden) + "] "
            + t.dtype + "; rebuild it with `make engine`");
    }
    mTokenTable = DeviceBuffer(bytes.size());
    check(cudaMemcpy(mTokenTable.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice), "upload the token table");
}

// A segment's or select's prefill context, its outputs allocated at the prefill profile's largest shapes, and a
// segment's two decode contexts on its DECODE profile with their outputs at T = 1.
void TrtEngine::prepareLink(Link& link, std::string const& directory, std::string const& hint)
{
    std::string const& name = link.info.name;
    GraphIO const& io = mManifest.io.at(name);
    link.prefill = std::make_unique<TrtGraph>(*mRuntime, directory + "/" + name + ".plan", hint);
    link.prefill->matchManifest(io, name, directory);
    for (TensorSpec const& t : io.inputs)
    {
        char const* fed = hostDtype(t.role);
        if (fed != nullptr && t.dtype != fed) // the host side writes this width; another is a stale engine
        {
            throw std::runtime_error("engine " + directory + ": " + name + " input " + t.role + " is " + t.dtype
                + ", not the " + fed + " this runtime feeds; " + kRebuildPlans);
        }
    }
    link.prefill->useProfile(kPrefillProfile, mStream);
    link.prefill->setMaxShapes(kPrefillProfile);
    for (TensorSpec const& t : io.outputs)
    {
        if (!isCache(t.role))
        {
            link.outputs.emplace(t.name, DeviceBuffer(link.prefill->bytes(t.name)));
        }
    }
    if (link.info.kind != kind::kSegment)
    {
        return;
    }
    for (auto& context : link.decode)
    {
        context = std::make_unique<TrtGraph>(*link.prefill);
        context->useProfile(kDecodeProfile, mStream);
        context->setMaxShapes(kDecodeProfile);
    }
    for (TensorSpec const& t : io.outputs)
    {
        if (!isCache(t.role))
        {
            link.decodeOutputs.emplace(t.name, DeviceBuffer(link.decode[0]->bytes(t.name)));
        }
    }
}

// Segment `segment`'s decode context for arena parity `past`: one token `hidden` in, the pinned scalars'
// position and its offset, its layers' past caches read and present caches written in the arena.
void TrtEngine::bindDecode(Link& link, size_t segment, int past, void* hidden)
{
    TrtGraph& graph = *link.decode[past];
    auto* scalars = static_cast<int64_t*>(mScalars.get());
    for (TensorSpec const& t : mManifest.io.at(link.info.name).inputs)
    {
        size_t const layer = static_cast<size_t>(t.layer);
        void* data = t.role == role::kHidden ? hidden
            : t.role == role::kPositions     ? static_cast<void*>(scalars + 1)
            : t.role == role::kOffset        ? static_cast<void*>(scalars + 2 + segment)
            : t.role == role::kTokenTable    ? mTokenTable.get()
            : t.role == role::kKey           ? mArena->key(past, layer)
            : t.role == role::kValue         ? mArena->value(past, layer)
            : t.role == role::kValid         ? static_cast<void*>(mArena->valid(past, layer))
                                             : nullptr;
        if (data == nullptr)
        {
            throw std::runtime_error(link.prefill->path() + ": decode has no input for role " + t.role + "; "
                + kRebuildPlans);
        }
        graph.bind(t.name, data);
    }
    int const present = 1 - past;
    for (TensorSpec const& t : mManifest.io.at(link.info.name).outputs)
    {
        size_t const layer = static_cast<size_t>(t.layer);
        graph.bind(t.name, t.role == role::kKey ? mArena->key(present, layer)
                : t.role == role::kValue        ? mArena->value(present, layer)
                : t.role == role::kValid        ? static_cast<void*>(mArena->valid(present, layer))
                                                : link.decodeOutputs.at(t.name).get());
    }
}

TrtEngine::~TrtEngine()
{
    for (cudaGraphExec_t graph : mGraphs)
    {
        if (graph != nullptr)
        {
            cudaGraphExecDestroy(graph);
        }
    }
    if (mStream != nullptr)
    {
        cudaStreamSynchronize(mStream);
        cudaStreamDestroy(mStream);
    }
    cudaFreeHost(mHostScalars);
    cudaFreeHost(mHostLogits);
    // The plugin library stays loaded: TensorRT's registry holds its creators for the process's lifetime.
}

std::vector<float> TrtEngine::prefill(PrefillInputs const& in, void const* pixels, size_t pixelBytes,
    std::vector<std::vector<int64_t>>* kept)
{
    EngineManifest const& m = mManifest;
    int64_t const t = in.promptLen;
    if (pixelBytes != mPixelBytes)
    {
        throw std::invalid_argument("pixels are " + std::to_string(pixelBytes) + " bytes but the vision plan takes "
            + std::to_string(mPixelBytes) + "; pass the processor's pixel_values for this engine's grid and dtype");
    }
    if (t < 1 || t > m.maxPrompt || static_cast<int64_t>(in.tokenIds.size()) != t
        || static_cast<int64_t>(in.positions.size()) != t || in.queryIdx.size() * 8 != mQueryIdx.bytes()
        || in.queryMask.size() != mQueryMask.bytes() || in.visualStart < 0 || in.visualStart + m.nVisual > t)
    {
        throw std::invalid_argument("prefill inputs do not fit this engine (a prompt of " + std::to_string(t)
            + " tokens, capacity " + std::to_string(m.maxPrompt) + "); make them with makePrefillInputs");
    }
    mArena->reset(); // both sets zeroed (every slot invalid), synchronously; set 0 is the past
    auto upload = [&](DeviceBuffer& to, void const* from, size_t bytes) {
        check(cudaMemcpyAsync(to.get(), from, bytes, cudaMemcpyHostToDevice, mStream), "upload");
    };
    upload(mPromptIds, in.tokenIds.data(), 8 * in.tokenIds.size());
    upload(mPositions, in.positions.data(), 8 * in.positions.size());
    upload(mVisualStart, &in.visualStart, 8);
    upload(mQueryIdx, in.queryIdx.data(), 8 * in.queryIdx.size());
    upload(mQueryMask, in.queryMask.data(), in.queryMask.size());
    upload(mLastIdx, &in.lastIdx, 8);
    upload(mPixels, pixels, pixelBytes);
    mEmbedPrompt->setShape(m.find(kind::kEmbed, false, role::kTokenIds).name, {1, t});
    mEmbedPrompt->enqueue(mStream);
    mVision->enqueue(mStream);
    // The image features replace the image tokens' embeddings: one contiguous block at visualStart.
    check(cudaMemcpyAsync(static_cast<char*>(mPromptEmbeds.get()) + in.visualStart * mRowBytes, mFeatures.get(),
              mFeatures.bytes(), cudaMemcpyDeviceToDevice, mStream),
        "merge image features");

    // Each graph's outputs are the next one's inputs by role (a kept output is the next select's alive), as
    // runtime/pipeline.py chains them. A segment reads its caches from the arena's other set, zeroed by reset,
    // and writes them into the past set, where decode's first step reads them.
    int const past = mArena->past();
    int64_t const q = static_cast<int64_t>(in.queryIdx.size());
    std::map<std::string, Tensor> state{{role::kHidden, {mPromptEmbeds.get(), {1, t, m.hiddenSize}}},
        {role::kPositions, {mPositions.get(), {1, t}}}, {role::kOffset, {mZero.get(), {}}},
        {role::kTokenTable, {mTokenTable.get(), {m.vocabSize, m.hiddenSize}}},
        {role::kVisualStart, {mVisualStart.get(), {1}}}, {role::kQueryIdx, {mQueryIdx.get(), {1, q}}},
        {role::kQueryMask, {mQueryMask.get(), {1, q}}}, {role::kLastIdx, {mLastIdx.get(), {1}}}};
    std::vector<std::pair<void const*, size_t>> keptOut;
    for (Link& link : mChain)
    {
        TrtGraph& graph = *link.prefill;
        GraphIO const& io = m.io.at(link.info.name);
        for (TensorSpec const& spec : io.inputs)
        {
            size_t const layer = static_cast<size_t>(spec.layer);
            if (isCache(spec.role))
            {
                graph.bind(spec.name, spec.role == role::kKey ? mArena->key(1 - past, layer)
                        : spec.role == role::kValue           ? mArena->value(1 - past, layer)
                                                              : static_cast<void*>(mArena->valid(1 - past, layer)));
                continue;
            }
            auto const it = state.find(spec.role);
            if (it == state.end())
            {
                throw std::runtime_error("engine " + m.directory + ": " + link.info.name + " takes " + spec.role
                    + ", which no graph before it gives; " + kRebuildPlans);
            }
            graph.setShape(spec.name, it->second.dims);
            graph.bind(spec.name, it->second.data);
        }
        for (TensorSpec const& spec : io.outputs)
        {
            size_t const layer = static_cast<size_t>(spec.layer);
            graph.bind(spec.name, spec.role == role::kKey ? mArena->key(past, layer)
                    : spec.role == role::kValue           ? mArena->value(past, layer)
                    : spec.role == role::kValid           ? static_cast<void*>(mArena->valid(past, layer))
                                                          : link.outputs.at(spec.name).get());
        }
        graph.enqueue(mStream);
        for (TensorSpec const& spec : io.outputs)
        {
            if (!isCache(spec.role))
            {
                state[spec.role == role::kKept ? role::kAlive : spec.role] = Tensor{link.outputs.at(spec.name).get(),
                    graph.shape(spec.name)};
                if (spec.role == role::kKept)
                {
                    keptOut.emplace_back(link.outputs.at(spec.name).get(), graph.bytes(spec.name));
                }
            }
        }
        if (link.info.kind == kind::kSegment)
        {
            link.fill = m.segmentPrefillLen(link.info, t);
        }
    }
    mPromptLen = t;

    Link const& last = mChain[mSegments.back()];
    std::vector<char> logits(mLogitsBytes);
    check(cudaMemcpyAsync(logits.data(), last.outputs.at(mLogitsName).get(), logits.size(), cudaMemcpyDeviceToHost,
              mStream),
        "prefill logits");
    if (kept != nullptr)
    {
        kept->assign(keptOut.size(), {});
        for (size_t s = 0; s < keptOut.size(); ++s)
        {
            (*kept)[s].resize(keptOut[s].second / 8);
            check(cudaMemcpyAsync((*kept)[s].data(), keptOut[s].first, keptOut[s].second, cudaMemcpyDeviceToHost,
                      mStream),
                "kept indices");
        }
    }
    check(cudaStreamSynchronize(mStream), "prefill");
    std::vector<float> out(vocab());
    toFloat(logits.data(), mLogitsHalf, out);
    return out;
}

void TrtEngine::runDecode(int past)
{
    size_t const scalars = (2 + mSegments.size()) * sizeof(int64_t);
    check(cudaMemcpyAsync(mScalars.get(), mHostScalars, scalars, cudaMemcpyHostToDevice, mStream), "decode inputs");
    mEmbedToken->enqueue(mStream);
    for (size_t index : mSegments)
    {
        mChain[index].decode[past]->enqueue(mStream);
    }
    check(cudaMemcpyAsync(mHostLogits, mDecodeLogits, mLogitsBytes, cudaMemcpyDeviceToHost, mStream), "decode logits");
}

float const* TrtEngine::decode(int32_t token, int64_t position, int64_t step, KvArena& arena)
{
    if (&arena != mArena.get())
    {
        throw std::invalid_argument("TrtEngine::decode runs on its own device arena; pass engine.arena()");
    }
    if (mPromptLen == 0)
    {
        throw std::logic_error("TrtEngine::decode before any prefill; run prefill first");
    }
    if (step < 0 || step >= mManifest.maxNewTokens)
    {
        throw std::invalid_argument("decode step " + std::to_string(step) + " is past the caches' "
            + std::to_string(mManifest.maxNewTokens) + " new-token slots; rebuild with a larger MAX_NEW_TOKENS");
    }
    int const past = arena.past();
    mHostScalars[0] = token;
    mHostScalars[1] = position;
    for (size_t j = 0; j < mSegments.size(); ++j) // each segment writes slot `its prefill length + step`
    {
        mHostScalars[2 + j] = mChain[mSegments[j]].fill + step;
    }
    if (mGraphs[past] != nullptr)
    {
        check(cudaGraphLaunch(mGraphs[past], mStream), "cudaGraphLaunch");
    }
    else if (mCudaGraphs && mWarm[past] > 0) // TensorRT has done its lazy setup: capture this step and replay it
    {
        cudaGraph_t graph = nullptr;
        check(cudaStreamBeginCapture(mStream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
        runDecode(past);
        check(cudaStreamEndCapture(mStream, &graph), "cudaStreamEndCapture");
        check(cudaGraphInstantiateWithFlags(&mGraphs[past], graph, 0), "cudaGraphInstantiate");
        cudaGraphDestroy(graph);
        check(cudaGraphLaunch(mGraphs[past], mStream), "cudaGraphLaunch");
    }
    else
    {
        runDecode(past);
        ++mWarm[past];
    }
    check(cudaStreamSynchronize(mStream), "decode step");
    return hostLogits();
}

float const* TrtEngine::hostLogits()
{
    if (!mLogitsHalf)
    {
        return static_cast<float const*>(mHostLogits);
    }
    toFloat(mHostLogits, true, mLogits);
    return mLogits.data();
}

} // namespace iwp
