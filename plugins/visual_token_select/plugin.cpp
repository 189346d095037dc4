// The TensorRT plugin for iwp::VisualTokenSelect (see plugin.h). Compiles unchanged against TensorRT 10.3
// (JetPack 6) and 11.x; the only version-dependent piece is guarded on NV_TENSORRT_MAJOR.
#include "plugin.h"
#include "plan.h"

#include <NvInferVersion.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <utility>

using namespace nvinfer1;

namespace iwp
{
namespace
{

using vts::kPluginNamespace; // contract.py, through params.h
using vts::kPluginVersion;
char const* const kPluginName = vts::kOpType;
constexpr int32_t kNumInputs = kIwpVtsNumInputs;

void report(std::string const& where, std::string const& message)
{
    std::fprintf(stderr, "[iwp] VisualTokenSelect %s: %s\n", where.c_str(), message.c_str());
}

// The contract's element type of a TensorRT type (IwpVtsDtype), or -1.
int32_t dtypeId(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return kIwpVtsFloat32;
    case DataType::kHALF: return kIwpVtsFloat16;
    case DataType::kBF16: return kIwpVtsBFloat16;
    case DataType::kINT32: return kIwpVtsInt32;
    case DataType::kINT64: return kIwpVtsInt64;
    default: return -1;
    }
}

// Whether tensor `pos` (an input, or the output at kNumInputs) may have this type: the generated table.
bool allowedType(int32_t pos, DataType type)
{
    int32_t const id = dtypeId(type);
    if (id < 0)
    {
        return false;
    }
    uint32_t const allowed = pos < kNumInputs ? vts::kInputs[pos].dtypes : (1U << vts::kOutputDtype);
    return (allowed & (1U << id)) != 0;
}

} // namespace

// ----------------------------------------------------------------------------------------------- Attributes

std::vector<Attributes::Field> const& Attributes::schema()
{
    static std::vector<Field> const fields = [] {
        std::vector<Field> out;
        for (vts::Attribute const& a : vts::kAttributes)
        {
            switch (a.type)
            {
            case vts::AttributeType::kInt:
                out.push_back(Field{a.name, PluginFieldType::kINT32, static_cast<int32_t>(a.defaultInt), 0.0F, {}, &a});
                break;
            case vts::AttributeType::kFloat:
                out.push_back(Field{a.name, PluginFieldType::kFLOAT32, 0, static_cast<float>(a.defaultReal), {}, &a});
                break;
            case vts::AttributeType::kText:
                out.push_back(Field{a.name, PluginFieldType::kCHAR, 0, 0.0F, a.defaultText, &a});
                break;
            }
        }
        return out;
    }();
    return fields;
}

Attributes::Field const& Attributes::get(char const* name) const
{
    for (Field const& field : mFields)
    {
        if (field.name == name)
        {
            return field;
        }
    }
    std::terminate(); // only called with schema names
}

bool Attributes::parse(PluginFieldCollection const* fc, Attributes& out, std::string& error)
{
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& given = fc->fields[i];
        auto field = std::find_if(out.mFields.begin(), out.mFields.end(),
            [&](Field const& f) { return given.name != nullptr && f.name == given.name; });
        if (field == out.mFields.end() || given.data == nullptr)
        {
            continue; // e.g. BTP's `layers` list, which the kernel does not need
        }
        bool ok = true;
        switch (field->type)
        {
        case PluginFieldType::kCHAR:
            ok = given.type == PluginFieldType::kCHAR;
            if (ok)
            {
                std::string text(static_cast<char const*>(given.data), std::max<int32_t>(0, given.length));
                field->text = text.substr(0, text.find('\0'));
            }
            break;
        case PluginFieldType::kINT32:
            if (given.type == PluginFieldType::kINT32)
            {
                field->integer = *static_cast<int32_t const*>(given.data);
            }
            else if (given.type == PluginFieldType::kINT64)
            {
                field->integer = static_cast<int32_t>(*static_cast<int64_t const*>(given.data));
            }
            else
            {
                ok = false;
            }
            break;
        default:
            if (given.type == PluginFieldType::kFLOAT32)
            {
                field->real = *static_cast<float const*>(given.data);
            }
            else if (given.type == PluginFieldType::kFLOAT64)
            {
                field->real = static_cast<float>(*static_cast<double const*>(given.data));
            }
            else
            {
                ok = false;
            }
        }
        if (!ok)
        {
            error = "attribute '" + field->name + "' has the wrong type; re-export the graph with iwp";
            return false;
        }
    }
    // closed value sets (method, queries, plugin version): checked here, when the plugin is created; the
    // options of other methods carry neutral values and are not checked
    int32_t const method = vts::methodId(out.get("method").text.c_str());
    for (Field const& field : out.mFields)
    {
        vts::Attribute const& a = *field.contract;
        bool const checked = &field == &out.get("method") || vts::usedBy(a, method);
        if (checked && a.nbChoices > 0 && vts::choiceIndex(a, field.text.c_str()) < 0)
        {
            std::string allowed;
            for (int32_t c = 0; c < a.nbChoices; ++c)
            {
                allowed += (c > 0 ? ", " : "") + std::string(a.choices[c]);
            }
            error = "attribute " + field.name + "='" + field.text + "' must be one of " + allowed
                + "; re-export the graph with this iwp, or rebuild the plugin from the sources that exported it";
            return false;
        }
    }
    return true;
}

IwpVtsParams Attributes::params(Dims const* inputs, DataType activations) const
{
    IwpVtsParams p{};
    int32_t const dtype = dtypeId(activations);
    p.dtype = dtype <= kIwpVtsBFloat16 ? dtype : -1; // activations only
    if (inputs != nullptr)
    {
        p.batch = inputs[kIwpVtsHidden].d[0];
        p.tokens = inputs[kIwpVtsHidden].d[1];
        p.width = inputs[kIwpVtsHidden].d[2];
        p.queryHeads = inputs[kIwpVtsQ].d[1];
        p.headDim = inputs[kIwpVtsQ].d[3];
        p.kvHeads = inputs[kIwpVtsK].d[1];
        p.visual = inputs[kIwpVtsVisualXy].d[1];
        p.queries = inputs[kIwpVtsQueryIdx].d[1];
    }
    int32_t const method = vts::methodId(get("method").text.c_str());
    for (Field const& field : mFields) // the attributes IwpVtsParams holds, through the generated table
    {
        vts::Attribute const& a = *field.contract;
        if (&field != &get("method") && !vts::usedBy(a, method))
        {
            continue; // another method's option: a neutral value, ignored
        }
        switch (a.type)
        {
        case vts::AttributeType::kInt: vts::setParam(p, a, field.integer); break;
        case vts::AttributeType::kFloat: vts::setParam(p, a, field.real); break;
        case vts::AttributeType::kText: vts::setParam(p, a, vts::choiceIndex(a, field.text.c_str())); break;
        }
    }
    return p;
}

PluginFieldCollection const* Attributes::collection()
{
    mView.clear();
    for (Field const& field : mFields)
    {
        switch (field.type)
        {
        case PluginFieldType::kCHAR:
            mView.emplace_back(field.name.c_str(), field.text.c_str(), PluginFieldType::kCHAR,
                static_cast<int32_t>(field.text.size() + 1));
            break;
        case PluginFieldType::kINT32:
            mView.emplace_back(field.name.c_str(), &field.integer, PluginFieldType::kINT32, 1);
            break;
        default: mView.emplace_back(field.name.c_str(), &field.real, PluginFieldType::kFLOAT32, 1);
        }
    }
    mCollection.nbFields = static_cast<int32_t>(mView.size());
    mCollection.fields = mView.data();
    return &mCollection;
}

// -------------------------------------------------------------------------------------------------- Plugin

VisualTokenSelectPlugin::VisualTokenSelectPlugin(std::string name, Attributes attributes)
    : mName(std::move(name))
    , mAttributes(std::move(attributes))
{
}

IPluginCapability* VisualTokenSelectPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* VisualTokenSelectPlugin::clone() noexcept
{
    try
    {
        auto* copy = new VisualTokenSelectPlugin(mName, mAttributes);
        copy->mParams = mParams;
        return copy;
    }
    catch (std::exception const& e)
    {
        report(mName, e.what());
        return nullptr;
    }
}

char const* VisualTokenSelectPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* VisualTokenSelectPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* VisualTokenSelectPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t VisualTokenSelectPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t VisualTokenSelectPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* /*inputTypes*/, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs != kNumInputs)
    {
        report(mName, "expects 13 inputs and 1 output; re-export the graph with iwp");
        return -1;
    }
    outputTypes[0] = DataType::kINT64;
    return 0;
}

// [B, keep]: static whatever the values. keep > N is refused here when N is a build-time constant.
int32_t VisualTokenSelectPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != kNumInputs || nbOutputs != 1 || inputs[kIwpVtsVisualXy].nbDims != 3)
    {
        report(mName, "expects 13 inputs (visual_xy [B, N, 2]) and 1 output; re-export the graph with iwp");
        return -1;
    }
    int32_t const keep = mAttributes.get("keep").integer;
    IDimensionExpr const* visual = inputs[kIwpVtsVisualXy].d[1];
    if (keep < 1 || (visual->isConstant() && keep > visual->getConstantValue()))
    {
        report(mName, "keep=" + std::to_string(keep) + " must be in [1, N=" + std::to_string(visual->getConstantValue())
            + "]; export with a budget of at most the visual token count");
        return -1;
    }
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[kIwpVtsHidden].d[0];
    outputs[0].d[1] = exprBuilder.constant(keep);
    return 0;
}

bool VisualTokenSelectPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNumInputs || nbOutputs != 1 || pos < 0 || pos > kNumInputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (!allowedType(pos, desc.type))
    {
        return false;
    }
    // the activations share one type (IwpVtsParams.dtype): that of the first
    return pos == kNumInputs || !vts::kInputs[pos].activation || desc.type == inOut[kIwpVtsHidden].desc.type;
}

int32_t VisualTokenSelectPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNumInputs || nbOutputs != 1)
    {
        report(mName, "expects 13 inputs and 1 output; re-export the graph with iwp");
        return -1;
    }
    Dims dims[kNumInputs];
    for (int32_t i = 0; i < kNumInputs; ++i)
    {
        dims[i] = in[i].max; // the export's shapes are static, so max == min == opt
    }
    std::string const error = vts::validate(mAttributes.params(dims, in[0].desc.type));
    if (!error.empty())
    {
        report(mName, error);
        return -1;
    }
    return 0;
}

size_t VisualTokenSelectPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNumInputs)
    {
        return 0;
    }
    Dims dims[kNumInputs];
    for (int32_t i = 0; i < kNumInputs; ++i)
    {
        dims[i] = inputs[i].max; // the largest shapes bound every layout
    }
    IwpVtsParams const params = mAttributes.params(dims, inputs[0].desc.type);
    return iwpVtsWorkspaceSize(&params);
}

int32_t VisualTokenSelectPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNumInputs || nbOutputs != 1)
    {
        return -1;
    }
    Dims dims[kNumInputs];
    for (int32_t i = 0; i < kNumInputs; ++i)
    {
        dims[i] = in[i].dims;
    }
    mParams = mAttributes.params(dims, in[0].type);
    std::string const error = vts::validate(mParams);
    if (!error.empty())
    {
        report(mName, error);
        return -1;
    }
    return 0;
}

int32_t VisualTokenSelectPlugin::enqueue(PluginTensorDesc const* /*inputDesc*/, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    int32_t const status
        = iwpVtsEnqueue(&mParams, inputs, static_cast<int64_t*>(outputs[0]), workspace, static_cast<void*>(stream));
    if (status != 0)
    {
        report(mName, "kernel launch failed with status " + std::to_string(status));
        return -1;
    }
    return 0;
}

IPluginV3* VisualTokenSelectPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* VisualTokenSelectPlugin::getFieldsToSerialize() noexcept
{
    return mAttributes.collection();
}

// ------------------------------------------------------------------------------------------------- Creator

VisualTokenSelectCreator::VisualTokenSelectCreator()
{
    for (Attributes::Field const& field : Attributes::schema())
    {
        mFieldNames.emplace_back(field.name.c_str(), nullptr, field.type, 1);
    }
    mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mCollection.fields = mFieldNames.data();
    // A plugin built against one TensorRT major version must not run under another: the plugin ABI differs.
    int32_t const runtimeMajor = getInferLibMajorVersion();
    if (runtimeMajor != NV_TENSORRT_MAJOR)
    {
        mVersionError = "this plugin library was built for TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + "."
            + std::to_string(NV_TENSORRT_MINOR) + " but TensorRT " + std::to_string(runtimeMajor)
            + ".x is loaded; rebuild it with `make plugins TENSORRT_ROOT=<that TensorRT>`";
        report("library", mVersionError);
    }
}

char const* VisualTokenSelectCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* VisualTokenSelectCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* VisualTokenSelectCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* VisualTokenSelectCreator::getFieldNames() noexcept
{
    return &mCollection;
}

IPluginV3* VisualTokenSelectCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    std::string const where = name ? name : kPluginName;
    if (!mVersionError.empty())
    {
        report(where, mVersionError);
        return nullptr;
    }
    try
    {
        Attributes attributes;
        std::string error;
        if (!Attributes::parse(fc, attributes, error))
        {
            report(where, error);
            return nullptr;
        }
        if (phase == TensorRTPhase::kBUILD)
        {
            // Options are checked before any shape is known, against a stand-in shape as large as `keep`.
            IwpVtsParams params = attributes.params(nullptr, DataType::kFLOAT);
            params.batch = params.queryHeads = params.kvHeads = params.headDim = params.width = params.queries = 1;
            params.visual = params.tokens = std::max<int64_t>(1, params.keep);
            params.dtype = kIwpVtsFloat32;
            std::string const bad = vts::validate(params);
            if (!bad.empty())
            {
                report(where, bad);
                return nullptr;
            }
        }
        return new VisualTokenSelectPlugin(where, std::move(attributes));
    }
    catch (std::exception const& e)
    {
        report(where, e.what());
        return nullptr;
    }
}

// Static registration: loading the library registers the creator (polygraphy --plugins, ctypes, trtexec
// --staticPlugins, IPluginRegistry::loadLibrary).
REGISTER_TENSORRT_PLUGIN(VisualTokenSelectCreator);

} // namespace iwp

// What this library is, for loaders that check before use (iwp's engine builder does).
extern "C" char const* iwpPluginInfo()
{
    static std::string const info = std::string(iwp::vts::kOpType) + " " + iwp::vts::kPluginVersion + " "
        + iwp::vts::kPluginNamespace + "; TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + "."
        + std::to_string(NV_TENSORRT_MINOR) + "." + std::to_string(NV_TENSORRT_PATCH) + "; kernel ABI "
        + std::to_string(IWP_VTS_ABI_VERSION);
    return info.c_str();
}
