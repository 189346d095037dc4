// The Python binding of the CPU kernel: iwp.plugins.visual_token_select._cpu (built by setup.py; cpu.py and
// the ONNX Runtime op call it). Arrays arrive in the contract's input order; the node's attributes are read
// through params.h's attribute table, the same one the TensorRT creator parses.
#include "cpu.h"
#include "params.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace iwp
{
namespace
{

// Rank of each input (IwpVtsInput order), as kernel.h lists the shapes.
constexpr int kRanks[kIwpVtsNumInputs] = {3, 4, 4, 4, 4, 4, 2, 1, 2, 2, 1, 3, 2};

template <typename T>
py::array_t<T, py::array::c_style> contiguous(py::handle a, int32_t input)
{
    auto out = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
    if (!out || out.ndim() != kRanks[input])
    {
        throw std::invalid_argument(std::string("VisualTokenSelect: input ") + vts::kInputs[input].name + " must be a "
            + std::to_string(kRanks[input]) + "-d array");
    }
    return out;
}

// Every input's shape against the one the parameters imply (kernel.h lists them).
void checkShapes(IwpVtsParams const& p, std::vector<py::array const*> const& arrays)
{
    int64_t const b = p.batch, t = p.tokens, d = p.headDim, hq = p.queryHeads, hkv = p.kvHeads;
    std::vector<std::vector<int64_t>> const expected{{b, t, p.width}, {b, hq, t, d}, {b, hkv, t, d}, {b, hq, t, d},
        {b, hkv, t, d}, {b, hkv, t, d}, {b, t}, {b}, {b, p.queries}, {b, p.queries}, {b}, {b, p.visual, 2},
        {b, p.visual}};
    for (int32_t i = 0; i < kIwpVtsNumInputs; ++i)
    {
        std::vector<int64_t> const shape(arrays[i]->shape(), arrays[i]->shape() + arrays[i]->ndim());
        if (shape != expected[i])
        {
            auto text = [](std::vector<int64_t> const& s) {
                std::string out = "[";
                for (size_t j = 0; j < s.size(); ++j)
                {
                    out += (j > 0 ? ", " : "") + std::to_string(s[j]);
                }
                return out + "]";
            };
            throw std::invalid_argument(std::string("VisualTokenSelect: input ") + vts::kInputs[i].name + " has shape "
                + text(shape) + ", expected " + text(expected[i]) + " from the other inputs");
        }
    }
}

// Positions index the sequence: out-of-range values would read outside the arrays.
void checkPositions(IwpVtsParams const& p, int64_t const* visualStart, int64_t const* queryIdx, int64_t const* lastIdx)
{
    auto inRange = [&](int64_t x, int64_t hi) { return x >= 0 && x < hi; };
    for (int64_t b = 0; b < p.batch; ++b)
    {
        bool ok = inRange(visualStart[b], p.tokens - p.visual + 1) && inRange(lastIdx[b], p.tokens);
        for (int64_t r = 0; r < p.queries; ++r)
        {
            ok = ok && inRange(queryIdx[b * p.queries + r], p.tokens);
        }
        if (!ok)
        {
            throw std::invalid_argument("VisualTokenSelect: sample " + std::to_string(b)
                + " has a position outside the sequence (visual_start + N <= T, query_idx and last_idx < T)");
        }
    }
}

// One attribute into IwpVtsParams; missing ones take the table's default, and a text attribute outside its
// value set fails with the allowed values.
void readAttribute(py::dict const& attributes, vts::Attribute const& a, IwpVtsParams& p)
{
    bool const given = attributes.contains(a.name);
    switch (a.type)
    {
    case vts::AttributeType::kInt:
        vts::setParam(p, a, static_cast<double>(given ? attributes[a.name].cast<int64_t>() : a.defaultInt));
        break;
    case vts::AttributeType::kFloat: vts::setParam(p, a, given ? attributes[a.name].cast<double>() : a.defaultReal); break;
    case vts::AttributeType::kText:
    {
        std::string const text = given ? attributes[a.name].cast<std::string>() : std::string(a.defaultText);
        int32_t const index = vts::choiceIndex(a, text.c_str());
        if (index < 0)
        {
            std::string allowed;
            for (int32_t c = 0; c < a.nbChoices; ++c)
            {
                allowed += (c > 0 ? ", " : "") + std::string(a.choices[c]);
            }
            throw std::invalid_argument(std::string("VisualTokenSelect: attribute ") + a.name + "='" + text
                + "' must be one of " + allowed);
        }
        vts::setParam(p, a, index);
        break;
    }
    }
}

// A node's attributes -> IwpVtsParams, through the generated table. Options of other methods (neutral values
// on the node) are skipped, so the method is read first.
void readAttributes(py::dict const& attributes, IwpVtsParams& p)
{
    vts::Attribute const& method = *vts::findAttribute("method");
    readAttribute(attributes, method, p);
    for (vts::Attribute const& a : vts::kAttributes)
    {
        if (&a != &method && a.param != vts::ParamType::kNone && vts::usedBy(a, p.method))
        {
            readAttribute(attributes, a, p);
        }
    }
}

py::array_t<int64_t> select(py::sequence const& inputs, py::dict const& attributes)
{
    if (static_cast<int32_t>(py::len(inputs)) != kIwpVtsNumInputs)
    {
        throw std::invalid_argument("VisualTokenSelect: expects the " + std::to_string(kIwpVtsNumInputs)
            + " inputs of the contract, got " + std::to_string(py::len(inputs)));
    }
    auto hidden = contiguous<float>(inputs[kIwpVtsHidden], kIwpVtsHidden);
    auto q = contiguous<float>(inputs[kIwpVtsQ], kIwpVtsQ);
    auto k = contiguous<float>(inputs[kIwpVtsK], kIwpVtsK);
    auto qRot = contiguous<float>(inputs[kIwpVtsQRot], kIwpVtsQRot);
    auto kRot = contiguous<float>(inputs[kIwpVtsKRot], kIwpVtsKRot);
    auto v = contiguous<float>(inputs[kIwpVtsV], kIwpVtsV);
    auto keyMask = contiguous<uint8_t>(inputs[kIwpVtsKeyMask], kIwpVtsKeyMask);
    auto visualStart = contiguous<int64_t>(inputs[kIwpVtsVisualStart], kIwpVtsVisualStart);
    auto queryIdx = contiguous<int64_t>(inputs[kIwpVtsQueryIdx], kIwpVtsQueryIdx);
    auto queryMask = contiguous<uint8_t>(inputs[kIwpVtsQueryMask], kIwpVtsQueryMask);
    auto lastIdx = contiguous<int64_t>(inputs[kIwpVtsLastIdx], kIwpVtsLastIdx);
    auto visualXy = contiguous<float>(inputs[kIwpVtsVisualXy], kIwpVtsVisualXy);
    auto ttv = contiguous<float>(inputs[kIwpVtsTtv], kIwpVtsTtv);

    IwpVtsParams p{};
    readAttributes(attributes, p);
    p.dtype = kIwpVtsFloat32;
    p.batch = q.shape(0);
    p.queryHeads = q.shape(1);
    p.tokens = q.shape(2);
    p.headDim = q.shape(3);
    p.kvHeads = k.shape(1);
    p.width = hidden.shape(2);
    p.visual = visualXy.shape(1);
    p.queries = queryIdx.shape(1);

    checkShapes(p, {&hidden, &q, &k, &qRot, &kRot, &v, &keyMask, &visualStart, &queryIdx, &queryMask, &lastIdx,
                       &visualXy, &ttv});
    checkPositions(p, visualStart.data(), queryIdx.data(), lastIdx.data());

    cpu::Inputs const in{hidden.data(), q.data(), k.data(), qRot.data(), kRot.data(), v.data(), keyMask.data(),
        visualStart.data(), queryIdx.data(), queryMask.data(), lastIdx.data(), visualXy.data(), ttv.data()};
    py::array_t<int64_t> out({p.batch, std::max<int64_t>(p.keep, 0)});
    {
        py::gil_scoped_release release; // the selection touches no Python object
        cpu::select(in, p, out.mutable_data());
    }
    return out;
}

} // namespace
} // namespace iwp

PYBIND11_MODULE(_cpu, m)
{
    m.doc() = "iwp's compiled CPU kernel for VisualTokenSelect";
    m.def("select", &iwp::select, py::arg("inputs"), py::arg("attributes"),
        "VisualTokenSelect on the CPU: the contract's inputs (contract.INPUTS order) and a node's attributes -> "
        "[B, keep] int64 indices into the visual tokens, ascending.");
    m.attr("abi_version") = IWP_VTS_ABI_VERSION;
}
