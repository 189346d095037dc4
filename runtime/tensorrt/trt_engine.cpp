#include "trt_engine.h"

#include <dlfcn.h>

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

void check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw std::runtime_error(std::string("CUDA: ") + what + " failed: " + cudaGetErrorString(status));
    }
}

size_t elementSize(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kBOOL:
    case nvinfer1::DataType::kINT8:
    case nvinfer1::DataType::kUINT8:
    case nvinfer1::DataType::kFP8: return 1;
    default: throw std::runtime_error("TensorRT: a tensor of a data type this runtime does not bind");
    }
}

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

std::vector<char> readFile(std::string const& path)
{
    std::ifstream file(path, std::ios::binary);
    if (!file)
    {
        throw std::runtime_error("cannot read " + path);
    }
    return std::vector<char>(std::istreambuf_iterator<char>(file), {});
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

DeviceBuffer::DeviceBuffer(size_t bytes)
    : mBytes(bytes)
{
    check(cudaMalloc(&mData, bytes == 0 ? 1 : bytes), "cudaMalloc");
}

DeviceBuffer::~DeviceBuffer()
{
    if (mData != nullptr)
    {
        cudaFree(mData);
    }
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : mData(other.mData)
    , mBytes(other.mBytes)
{
    other.mData = nullptr;
    other.mBytes = 0;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept
{
    std::swap(mData, other.mData);
    std::swap(mBytes, other.mBytes);
    return *this;
}

Allocator deviceAllocator()
{
    return Allocator{[](size_t bytes) {
                         void* p = nullptr;
                         return cudaMalloc(&p, bytes) == cudaSuccess ? p : nullptr;
                     },
        [](void* p) { cudaFree(p); }, [](void* p, size_t bytes) { check(cudaMemset(p, 0, bytes), "cudaMemset"); }};
}

TrtGraph::TrtGraph(nvinfer1::IRuntime& runtime, std::string const& path, std::string const& rebuildHint)
    : mPath(path)
    , mHint(rebuildHint)
{
    std::vector<char> const plan = readFile(path);
    mEngine = std::shared_ptr<nvinfer1::ICudaEngine>(runtime.deserializeCudaEngine(plan.data(), plan.size()));
    if (!mEngine)
    {
        throw std::runtime_error(path + " does not deserialize (another TensorRT version or GPU?); " + mHint);
    }
    mContext.reset(mEngine->createExecutionContext());
    if (!mContext)
    {
        throw std::runtime_error(path + ": no execution context (out of device memory?)");
    }
}

TrtGraph::TrtGraph(TrtGraph const& other)
    : mPath(other.mPath)
    , mHint(other.mHint)
    , mEngine(other.mEngine)
    , mContext(other.mEngine->createExecutionContext())
{
    if (!mContext)
    {
        throw std::runtime_error(mPath + ": no second execution context (out of device memory?)");
    }
}

void TrtGraph::matchManifest(GraphIO const& io, std::string const& graph, std::string const& directory) const
{
    // a plan swapped for another graph, or built from another export, is refused here, not at enqueue
    std::string const mismatch = "engine " + directory + ": " + mPath + " is not the " + graph + " graph of this engine";
    size_t const recorded = io.inputs.size() + io.outputs.size();
    if (static_cast<size_t>(mEngine->getNbIOTensors()) != recorded)
    {
        throw std::runtime_error(mismatch + " (" + std::to_string(mEngine->getNbIOTensors()) + " tensors, the manifest records "
            + std::to_string(recorded) + "); " + mHint);
    }
    for (bool output : {false, true})
    {
        for (TensorSpec const& t : output ? io.outputs : io.inputs)
        {
            bool found = false;
            for (int32_t i = 0; i < mEngine->getNbIOTensors() && !found; ++i)
            {
                found = t.name == mEngine->getIOTensorName(i);
            }
            nvinfer1::TensorIOMode const wanted = output ? nvinfer1::TensorIOMode::kOUTPUT : nvinfer1::TensorIOMode::kINPUT;
            if (!found || mEngine->getTensorIOMode(t.name.c_str()) != wanted)
            {
                throw std::runtime_error(mismatch + " (no " + (output ? "output " : "input ") + t.name + "); " + mHint);
            }
        }
    }
}

void TrtGraph::require(std::string const& name) const
{
    for (int32_t i = 0; i < mEngine->getNbIOTensors(); ++i)
    {
        if (name == mEngine->getIOTensorName(i))
        {
            return;
        }
    }
    throw std::runtime_error(mPath + " has no tensor \"" + name + "\" (an engine from another iwp?); " + mHint);
}

void TrtGraph::bind(std::string const& name, void* data)
{
    require(name);
    if (!mContext->setTensorAddress(name.c_str(), data))
    {
        throw std::runtime_error(mPath + ": cannot bind \"" + name + "\"");
    }
}

void TrtGraph::setShape(std::string const& name, std::vector<int64_t> const& dims)
{
    require(name);
    nvinfer1::Dims shape{};
    shape.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        shape.d[i] = dims[i];
    }
    if (!mContext->setInputShape(name.c_str(), shape))
    {
        throw std::runtime_error(mPath + ": \"" + name + "\" does not take this shape (outside its profile)");
    }
}

nvinfer1::DataType TrtGraph::dataType(std::string const& name) const
{
    require(name);
    return mEngine->getTensorDataType(name.c_str());
}

size_t TrtGraph::bytes(std::string const& name) const
{
    require(name);
    nvinfer1::Dims const shape = mContext->getTensorShape(name.c_str());
    size_t count = 1;
    for (int32_t i = 0; i < shape.nbDims; ++i)
    {
        if (shape.d[i] < 0)
        {
            throw std::runtime_error(mPath + ": \"" + name + "\" has an unset dimension; set the input shapes first");
        }
        count *= static_cast<size_t>(shape.d[i]);
    }
    return count * elementSize(dataType(name));
}

void TrtGraph::enqueue(cudaStream_t stream)
{
    if (!mContext->enqueueV3(stream))
    {
        throw std::runtime_error(mPath + ": enqueueV3 failed (see TensorRT's message above)");
    }
}

TrtEngine::TrtEngine(std::string const& directory, std::string const& pluginLibrary, bool cudaGraphs)
    : mManifest(readManifest(directory))
    , mCudaGraphs(cudaGraphs)
{
    std::string const hint = "rebuild the plans with `make engine BACKEND=tensorrt` on this machine";
    for (char const* graph : {"embed", "vision", "prefill", "decode"})
    {
        if (!std::ifstream(directory + "/" + graph + ".plan"))
        {
            throw std::runtime_error("engine " + directory + " has no " + graph + ".plan (built for ONNX Runtime only); "
                + kRebuildPlans);
        }
    }
    EngineManifest const& m = mManifest;
    // Every tensor is bound by its role in the manifest's io section; the names are the exporter's.
    auto input = [&](char const* graph, char const* role, char const* dtype = nullptr) {
        TensorSpec const& t = m.find(graph, false, role);
        if (dtype != nullptr && t.dtype != dtype) // the host side feeds this width; another is a stale engine
        {
            throw std::runtime_error("engine " + directory + ": " + graph + " input " + role + " is " + t.dtype + ", not the "
                + dtype + " this runtime feeds; " + kRebuildPlans);
        }
        return t.name;
    };
    auto output = [&](char const* graph, char const* role, int64_t stage = -1) {
        return m.find(graph, true, role, -1, stage).name;
    };
    for (int64_t layer = 0; layer < m.nLayers; ++layer)
    {
        mPrefillPresent.push_back(cacheNames("prefill", true, layer));
        mDecodePast.push_back(cacheNames("decode", false, layer));
        mDecodePresent.push_back(cacheNames("decode", true, layer));
    }

    mPlugin = loadPlugin(pluginLibrary);
    mLogger = std::make_unique<Logger>();
    mRuntime.reset(nvinfer1::createInferRuntime(*mLogger));
    if (!mRuntime)
    {
        throw std::runtime_error("TensorRT: createInferRuntime failed");
    }
    mEmbedPrompt = std::make_unique<TrtGraph>(*mRuntime, directory + "/embed.plan", hint);
    mEmbedToken = std::make_unique<TrtGraph>(*mEmbedPrompt);
    mVision = std::make_unique<TrtGraph>(*mRuntime, directory + "/vision.plan", hint);
    mPrefill = std::make_unique<TrtGraph>(*mRuntime, directory + "/prefill.plan", hint);
    mDecode[0] = std::make_unique<TrtGraph>(*mRuntime, directory + "/decode.plan", hint);
    mDecode[1] = std::make_unique<TrtGraph>(*mDecode[0]); // one context per arena parity: fixed bindings
    for (auto const& [graph, plan] : {std::pair<char const*, TrtGraph*>{"embed", mEmbedPrompt.get()},
             {"vision", mVision.get()}, {"prefill", mPrefill.get()}, {"decode", mDecode[0].get()}})
    {
        plan->matchManifest(m.io.at(graph), graph, directory);
    }
    check(cudaStreamCreateWithFlags(&mStream, cudaStreamNonBlocking), "cudaStreamCreate");
    mArena = std::make_unique<KvArena>(mManifest.kvLayout(), deviceAllocator());

    mElement = m.dtype == "fp16" ? 2 : 4;
    int64_t const queries = m.maxPrompt - m.nVisual;
    std::string const tokenIds = input("embed", role::kTokenIds, "int64");
    std::string const embeddings = output("embed", role::kEmbeddings);
    mEmbedPrompt->setShape(tokenIds, {1, m.maxPrompt});
    mEmbedToken->setShape(tokenIds, {1, 1});
    mPromptIds = DeviceBuffer(8 * m.maxPrompt);
    mPromptEmbeds = DeviceBuffer(mEmbedPrompt->bytes(embeddings));
    std::string const pixels = input("vision", role::kPixels);
    std::string const features = output("vision", role::kFeatures);
    mPixelBytes = mVision->bytes(pixels);
    mPixels = DeviceBuffer(mPixelBytes);
    mFeatures = DeviceBuffer(mVision->bytes(features));
    mMask = DeviceBuffer(8 * m.maxPrompt);
    mPositions = DeviceBuffer(8 * m.maxPrompt);
    mVisualStart = DeviceBuffer(8);
    mQueryIdx = DeviceBuffer(8 * queries);
    mQueryMask = DeviceBuffer(queries);
    mLastIdx = DeviceBuffer(8);
    mPrefillLogitsName = output("prefill", role::kLogits);
    mPrefillLogits = DeviceBuffer(mPrefill->bytes(mPrefillLogitsName));
    mEmbedPrompt->bind(tokenIds, mPromptIds.get());
    mEmbedPrompt->bind(embeddings, mPromptEmbeds.get());
    mVision->bind(pixels, mPixels.get());
    mVision->bind(features, mFeatures.get());
    for (auto const& [name, buffer] : {std::pair<std::string, DeviceBuffer*>{input("prefill", role::kEmbeddings),
             &mPromptEmbeds}, {input("prefill", role::kAttentionMask, "int64"), &mMask},
             {input("prefill", role::kPositions, "int64"), &mPositions},
             {input("prefill", role::kVisualStart, "int64"), &mVisualStart},
             {input("prefill", role::kQueryIdx, "int64"), &mQueryIdx},
             {input("prefill", role::kQueryMask, "bool"), &mQueryMask},
             {input("prefill", role::kLastIdx, "int64"), &mLastIdx}, {mPrefillLogitsName, &mPrefillLogits}})
    {
        mPrefill->bind(name, buffer->get());
    }
    for (int64_t s = 0; s < m.stages; ++s)
    {
        std::string const kept = output("prefill", role::kKept, s);
        mKept.emplace_back(mPrefill->bytes(kept));
        mPrefill->bind(kept, mKept.back().get());
    }

    mScalars = DeviceBuffer(3 * sizeof(int64_t));
    check(cudaMallocHost(reinterpret_cast<void**>(&mHostScalars), 3 * sizeof(int64_t)), "cudaMallocHost");
    auto* scalars = static_cast<int64_t*>(mScalars.get());
    mTokenEmbed = DeviceBuffer(mEmbedToken->bytes(embeddings));
    mEmbedToken->bind(tokenIds, scalars);
    mEmbedToken->bind(embeddings, mTokenEmbed.get());
    mDecodeEmbeddings = input("decode", role::kEmbeddings);
    mDecodePosition = input("decode", role::kPosition, "int64");
    mDecodeStep = input("decode", role::kStep, "int64");
    mDecodeLogitsName = output("decode", role::kLogits);
    mDecodeLogits = DeviceBuffer(mDecode[0]->bytes(mDecodeLogitsName));
    mLogitsHalf = mDecode[0]->dataType(mDecodeLogitsName) == nvinfer1::DataType::kHALF;
    check(cudaMallocHost(&mHostLogits, mDecodeLogits.bytes()), "cudaMallocHost");
    mLogits.resize(vocab());
    for (int past = 0; past < 2; ++past)
    {
        bindDecode(past);
    }
}

TrtEngine::CacheNames TrtEngine::cacheNames(char const* graph, bool output, int64_t layer) const
{
    return CacheNames{mManifest.find(graph, output, role::kKey, layer).name,
        mManifest.find(graph, output, role::kValue, layer).name, mManifest.find(graph, output, role::kValid, layer).name};
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

void TrtEngine::bindDecode(int past)
{
    TrtGraph& graph = *mDecode[past];
    auto* scalars = static_cast<int64_t*>(mScalars.get());
    graph.bind(mDecodeEmbeddings, mTokenEmbed.get());
    graph.bind(mDecodePosition, scalars + 1);
    graph.bind(mDecodeStep, scalars + 2);
    graph.bind(mDecodeLogitsName, mDecodeLogits.get());
    int const present = 1 - past;
    for (int64_t layer = 0; layer < mManifest.nLayers; ++layer)
    {
        CacheNames const& in = mDecodePast[layer];
        CacheNames const& out = mDecodePresent[layer];
        graph.bind(in.key, mArena->key(past, layer));
        graph.bind(in.value, mArena->value(past, layer));
        graph.bind(in.valid, mArena->valid(past, layer));
        graph.bind(out.key, mArena->key(present, layer));
        graph.bind(out.value, mArena->value(present, layer));
        graph.bind(out.valid, mArena->valid(present, layer));
    }
}

std::vector<float> TrtEngine::prefill(PrefillInputs const& in, void const* pixels, size_t pixelBytes,
    std::vector<std::vector<int64_t>>* kept)
{
    EngineManifest const& m = mManifest;
    if (pixelBytes != mPixelBytes)
    {
        throw std::invalid_argument("pixels are " + std::to_string(pixelBytes) + " bytes but the vision plan takes "
            + std::to_string(mPixelBytes) + "; pass the processor's pixel_values for this engine's grid and dtype");
    }
    if (static_cast<int64_t>(in.inputIds.size()) != m.maxPrompt)
    {
        throw std::invalid_argument("prefill inputs are not padded to the engine's length; use makePrefillInputs");
    }
    mArena->reset(); // every slot invalid, set 0 is the past: the prefill writes it whole
    int const past = mArena->past();
    for (int64_t layer = 0; layer < m.nLayers; ++layer) // the prefill's caches are laid out as decode's past
    {
        CacheNames const& out = mPrefillPresent[layer];
        mPrefill->bind(out.key, mArena->key(past, layer));
        mPrefill->bind(out.value, mArena->value(past, layer));
        mPrefill->bind(out.valid, mArena->valid(past, layer));
    }
    auto upload = [&](DeviceBuffer& to, void const* from, size_t bytes) {
        check(cudaMemcpyAsync(to.get(), from, bytes, cudaMemcpyHostToDevice, mStream), "upload");
    };
    upload(mPromptIds, in.inputIds.data(), 8 * in.inputIds.size());
    upload(mMask, in.attentionMask.data(), 8 * in.attentionMask.size());
    upload(mPositions, in.positions.data(), 8 * in.positions.size());
    upload(mVisualStart, &in.visualStart, 8);
    upload(mQueryIdx, in.queryIdx.data(), 8 * in.queryIdx.size());
    upload(mQueryMask, in.queryMask.data(), in.queryMask.size());
    upload(mLastIdx, &in.lastIdx, 8);
    upload(mPixels, pixels, pixelBytes);
    mEmbedPrompt->enqueue(mStream);
    mVision->enqueue(mStream);
    // The image features replace the image tokens' embeddings: one contiguous block at visualStart.
    size_t const row = static_cast<size_t>(m.hiddenSize) * mElement;
    check(cudaMemcpyAsync(static_cast<char*>(mPromptEmbeds.get()) + in.visualStart * row, mFeatures.get(),
              mFeatures.bytes(), cudaMemcpyDeviceToDevice, mStream),
        "merge image features");
    mPrefill->enqueue(mStream);
    std::vector<char> logits(mPrefillLogits.bytes());
    check(cudaMemcpyAsync(logits.data(), mPrefillLogits.get(), logits.size(), cudaMemcpyDeviceToHost, mStream),
        "prefill logits");
    if (kept != nullptr)
    {
        kept->assign(mKept.size(), {});
        for (size_t s = 0; s < mKept.size(); ++s)
        {
            (*kept)[s].resize(mKept[s].bytes() / 8);
            check(cudaMemcpyAsync((*kept)[s].data(), mKept[s].get(), mKept[s].bytes(), cudaMemcpyDeviceToHost, mStream),
                "kept indices");
        }
    }
    check(cudaStreamSynchronize(mStream), "prefill");
    std::vector<float> out(vocab());
    toFloat(logits.data(), mPrefill->dataType(mPrefillLogitsName) == nvinfer1::DataType::kHALF, out);
    return out;
}

void TrtEngine::toFloat(void const* data, bool half, std::vector<float>& out)
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

void TrtEngine::runDecode(int past)
{
    check(cudaMemcpyAsync(mScalars.get(), mHostScalars, 3 * sizeof(int64_t), cudaMemcpyHostToDevice, mStream),
        "decode inputs");
    mEmbedToken->enqueue(mStream);
    mDecode[past]->enqueue(mStream);
    check(cudaMemcpyAsync(mHostLogits, mDecodeLogits.get(), mDecodeLogits.bytes(), cudaMemcpyDeviceToHost, mStream),
        "decode logits");
}

float const* TrtEngine::decode(int32_t token, int64_t position, int64_t step, KvArena& arena)
{
    if (&arena != mArena.get())
    {
        throw std::invalid_argument("TrtEngine::decode runs on its own device arena; pass engine.arena()");
    }
    int const past = arena.past();
    mHostScalars[0] = token;
    mHostScalars[1] = position;
    mHostScalars[2] = step;
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
