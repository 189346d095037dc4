// The TensorRT plugin for iwp::VisualTokenSelect: an IPluginV3 (core, build and runtime capabilities) over
// the CUDA kernels of kernel.cu, and its IPluginCreatorV3One. The ONNX parser maps the node to it through
// (op type, plugin_version, plugin_namespace) = ("VisualTokenSelect", "1", "iwp"); see README.md.
#pragma once

#include "kernel.h"
#include "params.h"

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace iwp
{

// The node's attributes, as the parser hands them over (ints, floats, strings) and as they are serialized.
class Attributes
{
public:
    struct Field
    {
        std::string name;
        nvinfer1::PluginFieldType type; // kINT32, kFLOAT32 or kCHAR
        int32_t integer = 0;
        float real = 0.0F;
        std::string text;
        vts::Attribute const* contract = nullptr; // its row in the generated table (params.h)
    };

    // The fields every node carries: params.h's attribute table (contract.scalar_attributes()), with defaults.
    static std::vector<Field> const& schema();

    // Read from a field collection; unknown or mistyped fields fail with a message.
    static bool parse(nvinfer1::PluginFieldCollection const* fc, Attributes& out, std::string& error);

    // The kernel parameters for these attributes and the given input shapes.
    IwpVtsParams params(nvinfer1::Dims const* inputs, nvinfer1::DataType activations) const;

    nvinfer1::PluginFieldCollection const* collection();

    Field const& get(char const* name) const;

private:
    std::vector<Field> mFields = schema();
    std::vector<nvinfer1::PluginField> mView;
    nvinfer1::PluginFieldCollection mCollection{};
};

class VisualTokenSelectPlugin : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime
{
public:
    VisualTokenSelectPlugin(std::string name, Attributes attributes);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    std::string mName;
    Attributes mAttributes;
    IwpVtsParams mParams{}; // set by onShapeChange
};

class VisualTokenSelectCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    VisualTokenSelectCreator();

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mCollection{};
    std::string mVersionError; // set at load when the runtime's TensorRT major differs from the build's
};

} // namespace iwp
