// The TensorRT backend of the runtime core: an engine directory built with BACKEND=tensorrt, run from C++.
//
// It deserializes the directory's embed, vision, prefill and decode plans (after loading the iwp plugin
// library, whose creators register themselves when it is loaded), keeps the KV arena in device memory and
// binds its buffers straight to the prefill's outputs and to each decode step's past and present caches,
// so no cache is ever copied. Every tensor is found by its role in the manifest's io section (no tensor name
// is spelled here), and each plan is checked against the manifest's record of its graph when it loads. Each decode step (token embedding + decode graph + logits copy) is captured
// once per arena parity into a CUDA graph and replayed; inputs go through fixed pinned buffers, so the
// graphs never change. Everything runs on one stream; the only host sync is reading each step's logits.
#pragma once

#include "generate.h"
#include "kv_arena.h"
#include "manifest.h"
#include "prompt.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

namespace iwp
{

// A device allocation, freed on destruction.
class DeviceBuffer
{
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes);
    ~DeviceBuffer();
    DeviceBuffer(DeviceBuffer&& other) noexcept;
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;

    void* get() const { return mData; }
    size_t bytes() const { return mBytes; }

private:
    void* mData = nullptr;
    size_t mBytes = 0;
};

// The KV arena's allocator on the device.
Allocator deviceAllocator();

// One plan file and an execution context on it.
class TrtGraph
{
public:
    TrtGraph(nvinfer1::IRuntime& runtime, std::string const& path, std::string const& rebuildHint);
    // Another execution context on the same engine (its own bindings and shapes).
    TrtGraph(TrtGraph const& other);
    TrtGraph& operator=(TrtGraph const&) = delete;

    // Bind a tensor to device memory; throws naming the tensor and the plan when it does not exist.
    void bind(std::string const& name, void* data);
    void setShape(std::string const& name, std::vector<int64_t> const& dims);
    // Bytes of a tensor at the context's current shapes.
    size_t bytes(std::string const& name) const;
    nvinfer1::DataType dataType(std::string const& name) const;
    void enqueue(cudaStream_t stream);
    nvinfer1::IExecutionContext& context() { return *mContext; }
    // Throws one line unless the plan's I/O tensors are exactly the manifest's record of `graph` (same names,
    // each an input or an output as recorded): a plan swapped for another graph is named as such.
    void matchManifest(GraphIO const& io, std::string const& graph, std::string const& directory) const;

private:
    void require(std::string const& name) const;

    std::string mPath;
    std::string mHint;
    std::shared_ptr<nvinfer1::ICudaEngine> mEngine;
    std::unique_ptr<nvinfer1::IExecutionContext> mContext;
};

class TrtEngine : public Backend
{
public:
    // `pluginLibrary`: libiwp_trt_plugins.so (built by `make plugins`); `cudaGraphs`: replay decode steps.
    TrtEngine(std::string const& directory, std::string const& pluginLibrary, bool cudaGraphs = true);
    ~TrtEngine() override;

    EngineManifest const& manifest() const { return mManifest; }
    KvArena& arena() { return *mArena; }

    // Embed, vision, merge the image features into the prompt, and prefill (the selection runs inside the
    // prefill plan). `pixels`: the vision graph's input in its own dtype and layout (what the processor
    // gives), `pixelBytes` its size. The caches land in the arena's past set. Returns the last token's
    // logits and fills `kept` with each stage's kept visual-token indices.
    std::vector<float> prefill(PrefillInputs const& inputs, void const* pixels, size_t pixelBytes,
        std::vector<std::vector<int64_t>>* kept = nullptr);

    float const* decode(int32_t token, int64_t position, int64_t step, KvArena& arena) override;
    size_t vocab() const override { return static_cast<size_t>(mManifest.vocabSize); }

    size_t pixelBytes() const { return mPixelBytes; }

private:
    struct CacheNames // one layer's cache tensors of one graph, found by role
    {
        std::string key, value, valid;
    };
    CacheNames cacheNames(char const* graph, bool output, int64_t layer) const;
    void bindDecode(int past);
    void runDecode(int past);
    float const* hostLogits();
    static void toFloat(void const* data, bool half, std::vector<float>& out);

    EngineManifest mManifest;
    bool mCudaGraphs;
    void* mPlugin = nullptr;
    class Logger;
    std::unique_ptr<Logger> mLogger;
    std::unique_ptr<nvinfer1::IRuntime> mRuntime;
    std::unique_ptr<TrtGraph> mEmbedPrompt; // the embedding plan at the prompt's length
    std::unique_ptr<TrtGraph> mEmbedToken;  // and at one token, a second context for the decode steps
    std::unique_ptr<TrtGraph> mVision;
    std::unique_ptr<TrtGraph> mPrefill;
    std::unique_ptr<TrtGraph> mDecode[2];  // one context per arena parity, each bound once
    std::unique_ptr<KvArena> mArena;
    cudaStream_t mStream = nullptr;

    // Tensor names the steps bind again after construction, looked up by role in the manifest's io section.
    std::vector<CacheNames> mPrefillPresent, mDecodePast, mDecodePresent; // per layer
    std::string mPrefillLogitsName, mDecodeEmbeddings, mDecodePosition, mDecodeStep, mDecodeLogitsName;

    size_t mElement = 4;     // bytes per activation (fp32 or fp16 engine)
    size_t mPixelBytes = 0;
    DeviceBuffer mPromptIds, mPromptEmbeds, mPixels, mFeatures, mMask, mPositions, mVisualStart, mQueryIdx,
        mQueryMask, mLastIdx, mPrefillLogits;
    std::vector<DeviceBuffer> mKept;
    DeviceBuffer mTokenEmbed, mDecodeLogits;
    DeviceBuffer mScalars;        // token, position, step on the device (int64 each)
    int64_t* mHostScalars = nullptr;  // pinned: the graphs copy from here
    void* mHostLogits = nullptr;      // pinned: logits in the engine's dtype
    std::vector<float> mLogits;       // as float for the sampler
    bool mLogitsHalf = false;

    int mWarm[2] = {0, 0};            // eager runs per parity before capture (TensorRT's lazy setup)
    cudaGraphExec_t mGraphs[2] = {nullptr, nullptr};
};

} // namespace iwp
