// The TensorRT backend of the runtime core: an engine directory (format 4) built with BACKEND=tensorrt, run
// from C++.
//
// It deserializes one plan per graph (after loading the iwp plugin library, whose creators register
// themselves when it is loaded) and runs the manifest's chain on one stream:
//   prefill  embed over the prompt's real length T, vision, the image features merged into the embeddings,
//            then the segments and selects in run order (a select first for a stage at layer 0), each graph's
//            outputs the next one's inputs by role, as runtime/pipeline.py chains them. A segment runs through
//            its PREFILL profile; its caches are written into the arena's past set.
//   decode   per step, embed of one token, then every segment (T = 1, its DECODE profile) at cache slot
//            `offset` = its prefill length + step; the token, position and offsets go through one pinned
//            buffer, so the step is captured once per arena parity into a CUDA graph and replayed.
// The profiles are export/tensorrt.py's (PREFILL 0, DECODE 1). The token table is uploaded to the device once
// and bound to embed and, when the LM head is tied, to the last segment. Every tensor is found by its role in
// the manifest's io section (no tensor name is spelled here), and each plan is checked against the
// manifest's record of its graph when it loads. A step's only host sync is reading its logits.
#pragma once

#include "generate.h"
#include "kv_arena.h"
#include "manifest.h"
#include "prompt.h"
#include "trt_graph.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace iwp
{

// A segment plan's optimization profiles (export/tensorrt.py PREFILL, DECODE); every other plan has one at most.
constexpr int32_t kPrefillProfile = 0;
constexpr int32_t kDecodeProfile = 1;

class TrtEngine : public Backend
{
public:
    // `pluginLibrary`: libiwp_trt_plugins.so (built by `make plugins`); `cudaGraphs`: replay decode steps.
    TrtEngine(std::string const& directory, std::string const& pluginLibrary, bool cudaGraphs = true);
    ~TrtEngine() override;
    TrtEngine(TrtEngine const&) = delete;
    TrtEngine& operator=(TrtEngine const&) = delete;

    EngineManifest const& manifest() const { return mManifest; }
    KvArena& arena() { return *mArena; }

    // Embed, vision, merge the image features into the prompt, then the segments and selects over the
    // prompt's real length. `pixels`: the vision graph's input in its own dtype and layout (what the
    // processor gives), `pixelBytes` its size. The caches land in the arena's past set, where the first decode
    // step reads them. Returns the last token's logits and fills `kept` with each stage's kept visual-token
    // indices.
    std::vector<float> prefill(PrefillInputs const& inputs, void const* pixels, size_t pixelBytes,
        std::vector<std::vector<int64_t>>* kept = nullptr);

    float const* decode(int32_t token, int64_t position, int64_t step, KvArena& arena) override;
    size_t vocab() const override { return static_cast<size_t>(mManifest.vocabSize); }

    size_t pixelBytes() const { return mPixelBytes; }

private:
    // A tensor of the prefill's chain: where it lies and its current dims.
    struct Tensor
    {
        void* data = nullptr;
        std::vector<int64_t> dims;
    };
    // One segment or select graph of the chain, in run order.
    struct Link
    {
        GraphInfo info;
        std::unique_ptr<TrtGraph> prefill;              // profile PREFILL
        std::map<std::string, DeviceBuffer> outputs;    // its non-cache outputs, at the profile's largest shapes
        std::unique_ptr<TrtGraph> decode[2];            // segments: profile DECODE, one context per arena parity
        std::map<std::string, DeviceBuffer> decodeOutputs;
        int64_t fill = 0;                               // segments: the prompt's prefill length (decode's offset)
    };

    void loadTokenTable(std::string const& directory);
    void prepareLink(Link& link, std::string const& directory, std::string const& hint);
    void bindDecode(Link& link, size_t segment, int past, void* hidden);
    void runDecode(int past);
    float const* hostLogits();

    EngineManifest mManifest;
    bool mCudaGraphs;
    void* mPlugin = nullptr;
    class Logger;
    std::unique_ptr<Logger> mLogger;
    std::unique_ptr<nvinfer1::IRuntime> mRuntime;
    std::unique_ptr<TrtGraph> mEmbedPrompt; // the embedding plan at the prompt's length
    std::unique_ptr<TrtGraph> mEmbedToken;  // and at one token, a second context for the decode steps
    std::unique_ptr<TrtGraph> mVision;
    std::vector<Link> mChain;               // the manifest's graphs after embed and vision
    std::vector<size_t> mSegments;          // indices of the segments in mChain
    std::unique_ptr<KvArena> mArena;
    cudaStream_t mStream = nullptr;

    size_t mPixelBytes = 0;
    size_t mRowBytes = 0;                   // one embedding row in the engine's dtype
    DeviceBuffer mTokenTable;               // [vocab, hidden], uploaded once
    DeviceBuffer mPromptIds, mPromptEmbeds, mPixels, mFeatures, mPositions, mVisualStart, mQueryIdx, mQueryMask,
        mLastIdx, mZero;
    DeviceBuffer mTokenEmbed;               // decode: the token's embedding [1, 1, D]
    DeviceBuffer mScalars;                  // decode: token, position, then each segment's offset (int64 each)
    int64_t* mHostScalars = nullptr;        // pinned: the captured graphs copy from here
    std::string mLogitsName;                // the last segment's logits output
    void* mDecodeLogits = nullptr;          // the last segment's decode logits on the device
    size_t mLogitsBytes = 0;
    bool mLogitsHalf = false;
    void* mHostLogits = nullptr;            // pinned: decode's logits in the engine's dtype
    std::vector<float> mLogits;             // as float for the sampler
    int64_t mPromptLen = 0;                 // of the last prefill; decode needs one first

    int mWarm[2] = {0, 0};                  // eager runs per parity before capture (TensorRT's lazy setup)
    cudaGraphExec_t mGraphs[2] = {nullptr, nullptr};
};

} // namespace iwp
