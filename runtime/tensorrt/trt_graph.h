// One TensorRT plan with an execution context on it, and device memory: the plumbing TrtEngine
// (trt_engine.h) runs an engine's graphs with. TrtGraph binds tensors by name (found by role in the manifest
// by its caller), sets dynamic input shapes within a plan's optimization profiles and reads the shapes
// TensorRT infers from them, and checks a plan against the manifest's record of its graph. Inline, so the
// TensorRT backend stays the one source file runtime/CMakeLists.txt compiles.
#pragma once

#include "kv_arena.h"
#include "manifest.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace iwp
{
namespace trt
{
inline void check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        throw std::runtime_error(std::string("CUDA: ") + what + " failed: " + cudaGetErrorString(status));
    }
}

inline size_t elementSize(nvinfer1::DataType type)
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

// The manifest's name of a TensorRT type (iwp/engine_format.py DTYPES), or nullptr for one it has no name for.
inline char const* dtypeName(nvinfer1::DataType type)
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kBOOL: return "bool";
    default: return nullptr;
    }
}

inline std::vector<int64_t> toVector(nvinfer1::Dims const& dims)
{
    return std::vector<int64_t>(dims.d, dims.d + std::max<int32_t>(dims.nbDims, 0));
}

inline std::vector<char> readFile(std::string const& path)
{
    std::ifstream file(path, std::ios::binary);
    if (!file)
    {
        throw std::runtime_error("cannot read " + path);
    }
    return std::vector<char>(std::istreambuf_iterator<char>(file), {});
}
} // namespace trt

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
    // Another execution context on the same engine (its own bindings, shapes and profile).
    TrtGraph(TrtGraph const& other);
    TrtGraph& operator=(TrtGraph const&) = delete;

    std::string const& path() const { return mPath; }
    int32_t profiles() const;
    // Select the context's optimization profile (before any setShape); the stream is synchronized.
    void useProfile(int32_t profile, cudaStream_t stream);
    // Set every dynamic input to its largest shape in `profile`: the outputs' shapes are then their largest.
    void setMaxShapes(int32_t profile);

    // Bind a tensor to device memory; throws naming the tensor and the plan when it does not exist.
    void bind(std::string const& name, void* data);
    // Set a dynamic input's shape; a static input is left as the plan fixes it.
    void setShape(std::string const& name, std::vector<int64_t> const& dims);
    std::vector<int64_t> shape(std::string const& name) const; // at the context's current input shapes
    size_t bytes(std::string const& name) const;
    nvinfer1::DataType dataType(std::string const& name) const;
    void enqueue(cudaStream_t stream);
    // Throws one line unless the plan's I/O tensors are exactly the manifest's record of `graph` (same names,
    // each an input or an output as recorded): a plan swapped for another graph is named as such.
    void matchManifest(GraphIO const& io, std::string const& graph, std::string const& directory) const;

private:
    void require(std::string const& name) const;
    bool dynamic(std::string const& name) const;

    std::string mPath;
    std::string mHint;
    std::shared_ptr<nvinfer1::ICudaEngine> mEngine;
    std::unique_ptr<nvinfer1::IExecutionContext> mContext;
};

inline DeviceBuffer::DeviceBuffer(size_t bytes)
    : mBytes(bytes)
{
    trt::check(cudaMalloc(&mData, bytes == 0 ? 1 : bytes), "cudaMalloc");
}

inline DeviceBuffer::~DeviceBuffer()
{
    if (mData != nullptr)
    {
        cudaFree(mData);
    }
}

inline DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : mData(other.mData)
    , mBytes(other.mBytes)
{
    other.mData = nullptr;
    other.mBytes = 0;
}

inline DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept
{
    std::swap(mData, other.mData);
    std::swap(mBytes, other.mBytes);
    return *this;
}

inline Allocator deviceAllocator()
{
    return Allocator{[](size_t bytes) {
                         void* p = nullptr;
                         return cudaMalloc(&p, bytes) == cudaSuccess ? p : nullptr;
                     },
        [](void* p) { cudaFree(p); },
        [](void* p, size_t bytes) {
            // on the legacy stream, which a non-blocking stream does not wait for: done before the next prefill
            trt::check(cudaMemset(p, 0, bytes), "cudaMemset");
            trt::check(cudaDeviceSynchronize(), "cudaMemset");
        }};
}

inline TrtGraph::TrtGraph(nvinfer1::IRuntime& runtime, std::string const& path, std::string const& rebuildHint)
    : mPath(path)
    , mHint(rebuildHint)
{
    std::vector<char> const plan = trt::readFile(path);
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

inline TrtGraph::TrtGraph(TrtGraph const& other)
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

inline void TrtGraph::matchManifest(GraphIO const& io, std::string const& graph, std::string const& directory) const
{
    // a plan swapped for another graph, or built from another export, is refused here, not at enqueue
    std::string const mismatch
        = "engine " + directory + ": " + mPath + " is not the " + graph + " graph of this engine";
    size_t const recorded = io.inputs.size() + io.outputs.size();
    if (static_cast<size_t>(mEngine->getNbIOTensors()) != recorded)
    {
        throw std::runtime_error(mismatch + " (" + std::to_string(mEngine->getNbIOTensors())
            + " tensors, the manifest records " + std::to_string(recorded) + "); " + mHint);
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
            auto const wanted = output ? nvinfer1::TensorIOMode::kOUTPUT : nvinfer1::TensorIOMode::kINPUT;
            if (!found || mEngine->getTensorIOMode(t.name.c_str()) != wanted)
            {
                throw std::runtime_error(mismatch + " (no " + (output ? "output " : "input ") + t.name + "); " + mHint);
            }
            char const* type = trt::dtypeName(mEngine->getTensorDataType(t.name.c_str()));
            if (type == nullptr || t.dtype != type)
            {
                throw std::runtime_error(mismatch + " (" + t.name + " is " + (type ? type : "of another type")
                    + ", the manifest records " + t.dtype + "); " + mHint);
            }
        }
    }
}

inline void TrtGraph::require(std::string const& name) const
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

inline void TrtGraph::bind(std::string const& name, void* data)
{
    require(name);
    if (!mContext->setTensorAddress(name.c_str(), data))
    {
        throw std::runtime_error(mPath + ": cannot bind \"" + name + "\"");
    }
}

inline bool TrtGraph::dynamic(std::string const& name) const
{
    nvinfer1::Dims const dims = mEngine->getTensorShape(name.c_str());
    return std::any_of(dims.d, dims.d + std::max<int32_t>(dims.nbDims, 0), [](int64_t d) { return d < 0; });
}

inline int32_t TrtGraph::profiles() const
{
    return mEngine->getNbOptimizationProfiles();
}

inline void TrtGraph::useProfile(int32_t profile, cudaStream_t stream)
{
    if (profile >= profiles())
    {
        throw std::runtime_error(mPath + " has no optimization profile " + std::to_string(profile) + " ("
            + std::to_string(profiles()) + " in all; iwp builds a segment's plan with a prefill and a decode profile); "
            + mHint);
    }
    if (!mContext->setOptimizationProfileAsync(profile, stream))
    {
        throw std::runtime_error(mPath + ": cannot select optimization profile " + std::to_string(profile));
    }
    trt::check(cudaStreamSynchronize(stream), "select an optimization profile");
}

inline void TrtGraph::setMaxShapes(int32_t profile)
{
    for (int32_t i = 0; i < mEngine->getNbIOTensors(); ++i)
    {
        char const* name = mEngine->getIOTensorName(i);
        if (mEngine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT && dynamic(name))
        {
            setShape(name, trt::toVector(mEngine->getProfileShape(name, profile, nvinfer1::OptProfileSelector::kMAX)));
        }
    }
}

inline std::vector<int64_t> TrtGraph::shape(std::string const& name) const
{
    require(name);
    return trt::toVector(mContext->getTensorShape(name.c_str()));
}

inline void TrtGraph::setShape(std::string const& name, std::vector<int64_t> const& dims)
{
    require(name);
    if (!dynamic(name))
    {
        return; // the plan fixes it; a wrong size shows in bytes() and the manifest's check
    }
    nvinfer1::Dims shape{};
    if (dims.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
    {
        throw std::runtime_error(mPath + ": \"" + name + "\" given " + std::to_string(dims.size()) + " dimensions");
    }
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

inline nvinfer1::DataType TrtGraph::dataType(std::string const& name) const
{
    require(name);
    return mEngine->getTensorDataType(name.c_str());
}

inline size_t TrtGraph::bytes(std::string const& name) const
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
    return count * trt::elementSize(dataType(name));
}

inline void TrtGraph::enqueue(cudaStream_t stream)
{
    if (!mContext->enqueueV3(stream))
    {
        throw std::runtime_error(mPath + ": enqueueV3 failed (see TensorRT's message above)");
    }
}

} // namespace iwp
