// GENERATED from contract.py by `python -m iwp.plugins.visual_token_select.codegen`; do not edit.
// The op contract for C and C++: what the CPU kernel, the CUDA kernels and the TensorRT plugin share.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

// Bumped with any change to IwpVtsParams or to the selection's results.
#define IWP_VTS_ABI_VERSION 2

enum IwpVtsMethod : int32_t
{
    kIwpVtsIwp = 0,
    kIwpVtsFastV = 1,
    kIwpVtsDart = 2,
    kIwpVtsDivPrune = 3,
    kIwpVtsRandom = 4,
    kIwpVtsTransPrune = 5,
    kIwpVtsBtp = 6,
    kIwpVtsNumMethods = 7,
};

// Element types; the first three are the activations' (IwpVtsParams.dtype).
enum IwpVtsDtype : int32_t
{
    kIwpVtsFloat32 = 0,
    kIwpVtsFloat16 = 1,
    kIwpVtsBFloat16 = 2,
    kIwpVtsInt32 = 3,
    kIwpVtsInt64 = 4,
};

// The inputs, in the node's order (contract.INPUTS).
enum IwpVtsInput : int32_t
{
    kIwpVtsHidden = 0,
    kIwpVtsQ = 1,
    kIwpVtsK = 2,
    kIwpVtsQRot = 3,
    kIwpVtsKRot = 4,
    kIwpVtsV = 5,
    kIwpVtsKeyMask = 6,
    kIwpVtsVisualStart = 7,
    kIwpVtsQueryIdx = 8,
    kIwpVtsQueryMask = 9,
    kIwpVtsLastIdx = 10,
    kIwpVtsVisualXy = 11,
    kIwpVtsTtv = 12,
    kIwpVtsNumInputs = 13,
};

// Shapes, the node's core attributes and the method's options (those of other methods are ignored).
struct IwpVtsParams
{
    int32_t method; // attribute method (position in iwp, fastv, dart, divprune, random, transprune, btp)
    int32_t dtype; // IwpVtsDtype of the activations
    int64_t batch; // B
    int64_t tokens; // T
    int64_t width; // D of hidden
    int64_t queryHeads; // Hq
    int64_t kvHeads; // Hkv
    int64_t headDim; // d
    int64_t visual; // N
    int64_t queries; // Q, the columns of query_idx
    int64_t keep; // attribute keep
    int64_t stage; // attribute stage
    int64_t nStages; // attribute n_stages
    double lam; // attribute lam
    int64_t chunk; // attribute chunk
    double growth; // attribute growth
    int32_t queriesLast; // attribute queries (position in instruction, last)
    int32_t rebalance; // attribute rebalance
    int64_t pivots; // attribute pivots
    int64_t seed; // attribute seed
    double alpha; // attribute alpha
    double attentionFirst; // attribute attention_first
    double attentionLast; // attribute attention_last
    double seedFraction; // attribute seed_fraction
};

namespace iwp
{
namespace vts
{

// The node's identity: how TensorRT's ONNX parser finds the plugin.
inline constexpr char const* kOpType = "VisualTokenSelect";
inline constexpr char const* kPluginVersion = "1";
inline constexpr char const* kPluginNamespace = "iwp";

enum class AttributeType : int32_t
{
    kInt,   // TensorRT kINT32
    kFloat, // kFLOAT32
    kText,  // kCHAR
};

enum class ParamType : int32_t
{
    kNone, // not a kernel parameter
    kInt32,
    kInt64,
    kDouble,
};

struct Attribute
{
    char const* name;
    AttributeType type;
    int64_t defaultInt;
    double defaultReal;
    char const* defaultText;
    char const* const* choices; // a closed value set, stored in IwpVtsParams as the position
    int32_t nbChoices;
    ParamType param;
    size_t offset; // in IwpVtsParams
    uint32_t methods; // bit m: method id m reads it (core attributes: every method)
};

inline constexpr char const* kMethodChoices[] = {"iwp", "fastv", "dart", "divprune", "random", "transprune", "btp"};
inline constexpr char const* kQueriesChoices[] = {"instruction", "last"};
inline constexpr char const* kPluginNamespaceChoices[] = {"iwp"};
inline constexpr char const* kPluginVersionChoices[] = {"1"};

// Every scalar attribute a node carries (contract.scalar_attributes()), in order.
inline constexpr Attribute kAttributes[] = {
    {"method", AttributeType::kText, 0, 0.0, "iwp", kMethodChoices, 7, ParamType::kInt32, offsetof(IwpVtsParams, method), 0x7FU},
    {"keep", AttributeType::kInt, 0, 0.0, "", nullptr, 0, ParamType::kInt64, offsetof(IwpVtsParams, keep), 0x7FU},
    {"layer_index", AttributeType::kInt, 0, 0.0, "", nullptr, 0, ParamType::kNone, 0, 0x7FU},
    {"stage", AttributeType::kInt, 0, 0.0, "", nullptr, 0, ParamType::kInt64, offsetof(IwpVtsParams, stage), 0x7FU},
    {"n_stages", AttributeType::kInt, 1, 0.0, "", nullptr, 0, ParamType::kInt64, offsetof(IwpVtsParams, nStages), 0x7FU},
    {"plugin_namespace", AttributeType::kText, 0, 0.0, "iwp", kPluginNamespaceChoices, 1, ParamType::kNone, 0, 0x7FU},
    {"plugin_version", AttributeType::kText, 0, 0.0, "1", kPluginVersionChoices, 1, ParamType::kNone, 0, 0x7FU},
    {"layer", AttributeType::kInt, 2, 0.0, "", nullptr, 0, ParamType::kNone, 0, 0x1FU},
    {"lam", AttributeType::kFloat, 0, 0.3, "", nullptr, 0, ParamType::kDouble, offsetof(IwpVtsParams, lam), 0x01U},
    {"chunk", AttributeType::kInt, 4, 0.0, "", nullptr, 0, ParamType::kInt64, offsetof(IwpVtsParams, chunk), 0x41U},
    {"growth", AttributeType::kFloat, 0, 1.5, "", nullptr, 0, ParamType::kDouble, offsetof(IwpVtsParams, growth), 0x41U},
    {"queries", AttributeType::kText, 0, 0.0, "instruction", kQueriesChoices, 2, ParamType::kInt32, offsetof(IwpVtsParams, queriesLast), 0x01U},
    {"attention_first", AttributeType::kFloat, 0, 0.3, "", nullptr, 0, ParamType::kDouble, offsetof(IwpVtsParams, attentionFirst), 0x40U},
    {"attention_last", AttributeType::kFloat, 0, 0.9, "", nullptr, 0, ParamType::kDouble, offsetof(IwpVtsParams, attentionLast), 0x40U},
    {"seed_fraction", AttributeType::kFloat, 0, 0.1, "", nullptr, 0, ParamType::kDouble, offsetof(IwpVtsParams, seedFraction), 0x40U},
    {"rebalance", AttributeType::kInt, 1, 0.0, "", nullptr, 0, ParamType::kInt32, offsetof(IwpVtsParams, rebalance), 0x40U},
    {"alpha", AttributeType::kFloat, 0, 0.5, "", nullptr, 0, ParamType::kDouble, offsetof(IwpVtsParams, alpha), 0x20U},
    {"ttv_start", AttributeType::kInt, 0, 0.0, "", nullptr, 0, ParamType::kNone, 0, 0x20U},
    {"pivots", AttributeType::kInt, 8, 0.0, "", nullptr, 0, ParamType::kInt64, offsetof(IwpVtsParams, pivots), 0x04U},
    {"seed", AttributeType::kInt, 0, 0.0, "", nullptr, 0, ParamType::kInt64, offsetof(IwpVtsParams, seed), 0x10U},
};
inline constexpr int32_t kNbAttributes = 20;

inline constexpr char const* kDtypeNames[] = {"float32", "float16", "bfloat16", "int32", "int64"};

struct Input
{
    char const* name;
    uint32_t dtypes; // bit i set: IwpVtsDtype i allowed
    bool activation; // one of the activations, which share IwpVtsParams.dtype
};

inline constexpr Input kInputs[kIwpVtsNumInputs] = {
    {"hidden", (1U << kIwpVtsFloat32) | (1U << kIwpVtsFloat16) | (1U << kIwpVtsBFloat16), true},
    {"q", (1U << kIwpVtsFloat32) | (1U << kIwpVtsFloat16) | (1U << kIwpVtsBFloat16), true},
    {"k", (1U << kIwpVtsFloat32) | (1U << kIwpVtsFloat16) | (1U << kIwpVtsBFloat16), true},
    {"q_rot", (1U << kIwpVtsFloat32) | (1U << kIwpVtsFloat16) | (1U << kIwpVtsBFloat16), true},
    {"k_rot", (1U << kIwpVtsFloat32) | (1U << kIwpVtsFloat16) | (1U << kIwpVtsBFloat16), true},
    {"v", (1U << kIwpVtsFloat32) | (1U << kIwpVtsFloat16) | (1U << kIwpVtsBFloat16), true},
    {"key_mask", (1U << kIwpVtsInt32), false},
    {"visual_start", (1U << kIwpVtsInt64), false},
    {"query_idx", (1U << kIwpVtsInt64), false},
    {"query_mask", (1U << kIwpVtsInt32), false},
    {"last_idx", (1U << kIwpVtsInt64), false},
    {"visual_xy", (1U << kIwpVtsFloat32), false},
    {"ttv", (1U << kIwpVtsFloat32), false},
};
inline constexpr int32_t kOutputDtype = kIwpVtsInt64;

// The position of `text` in an attribute's value set, or -1.
inline int32_t choiceIndex(Attribute const& attribute, char const* text)
{
    for (int32_t i = 0; text != nullptr && i < attribute.nbChoices; ++i)
    {
        if (std::strcmp(attribute.choices[i], text) == 0)
        {
            return i;
        }
    }
    return -1;
}

// Whether the method with this id reads the attribute (a node carries every attribute; those of other
// methods hold neutral values and are ignored).
inline bool usedBy(Attribute const& attribute, int32_t method)
{
    return method >= 0 && method < kIwpVtsNumMethods && ((attribute.methods >> method) & 1U) != 0;
}

// The attribute called `name`, or nullptr.
inline Attribute const* findAttribute(char const* name)
{
    for (Attribute const& attribute : kAttributes)
    {
        if (name != nullptr && std::strcmp(attribute.name, name) == 0)
        {
            return &attribute;
        }
    }
    return nullptr;
}

// The method id of a method name, or -1; and back (nullptr for an unknown id).
inline int32_t methodId(char const* name)
{
    for (int32_t id = 0; name != nullptr && id < kIwpVtsNumMethods; ++id)
    {
        if (std::strcmp(kMethodChoices[id], name) == 0)
        {
            return id;
        }
    }
    return -1;
}

inline char const* methodName(int32_t id)
{
    return id >= 0 && id < kIwpVtsNumMethods ? kMethodChoices[id] : nullptr;
}

// Store an attribute's value where IwpVtsParams keeps it (text attributes: the choice's position).
inline void setParam(IwpVtsParams& params, Attribute const& attribute, double value)
{
    char* at = reinterpret_cast<char*>(&params) + attribute.offset;
    switch (attribute.param)
    {
    case ParamType::kInt32: { auto v = static_cast<int32_t>(value); std::memcpy(at, &v, sizeof(v)); break; }
    case ParamType::kInt64: { auto v = static_cast<int64_t>(value); std::memcpy(at, &v, sizeof(v)); break; }
    case ParamType::kDouble: std::memcpy(at, &value, sizeof(value)); break;
    case ParamType::kNone: break;
    }
}

} // namespace vts
} // namespace iwp
