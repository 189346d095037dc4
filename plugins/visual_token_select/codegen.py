"""Write params.h, the C/C++ copy of the op contract, from contract.py.

    python -m iwp.plugins.visual_token_select.codegen          # regenerate plugins/visual_token_select/params.h
    python -m iwp.plugins.visual_token_select.codegen --check  # exit 1 if the committed copy is stale

The header holds the ABI version, the method, dtype and input enums, IwpVtsParams, the attribute table the
TensorRT creator advertises and parses (name, type, default, closed value set, where IwpVtsParams keeps it)
and the per-input dtype table. CMake regenerates it when a Python with iwp is found; the committed copy lets
a build without Python go ahead, and tests/test_op_header.py fails when it is stale.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import METHODS, contract

HEADER = Path(__file__).with_name("params.h")

# C spellings where capitalizing the name is not TensorRT's style (kIwpVtsFastV, not kIwpVtsFastv).
_C_SPELLING = {"fastv": "FastV", "divprune": "DivPrune", "transprune": "TransPrune", "bfloat16": "BFloat16"}
_C_TYPES = {"int32": "int32_t", "int64": "int64_t", "double": "double"}
_PARAM_TYPES = {"int32": "kInt32", "int64": "kInt64", "double": "kDouble"}
_ATTR_TYPES = {bool: "kInt", int: "kInt", float: "kFloat", str: "kText"}
_SHAPE_DOC = {"dtype": "IwpVtsDtype of the activations", "batch": "B", "tokens": "T", "width": "D of hidden",
              "queryHeads": "Hq", "kvHeads": "Hkv", "headDim": "d", "visual": "N",
              "queries": "Q, the columns of query_idx"}


def camel(name: str) -> str:
    """q_rot -> QRot, fastv -> FastV: the enumerator suffix of a contract name."""
    return _C_SPELLING.get(name) or "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _literal(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return str(int(value))
    return repr(value)


def _enum(name: str, entries: list[tuple[str, int]], count: str | None = None) -> list[str]:
    lines = [f"enum {name} : int32_t", "{"]
    lines += [f"    {entry} = {value}," for entry, value in entries]
    if count:
        lines.append(f"    {count} = {len(entries)},")
    return lines + ["};", ""]


def render() -> str:
    """The text of params.h."""
    defaults = contract.attribute_defaults()
    attributes = contract.scalar_attributes()
    fields = {source: (field, ctype) for field, ctype, source in contract.PARAMS if source}
    out = ["// GENERATED from contract.py by `python -m iwp.plugins.visual_token_select.codegen`; do not edit.",
           "// The op contract for C and C++: what the CPU kernel, the CUDA kernels and the TensorRT plugin share.",
           "#pragma once", "", "#include <cstddef>", "#include <cstdint>", "#include <cstring>", "",
           "// Bumped with any change to IwpVtsParams or to the selection's results.",
           f"#define IWP_VTS_ABI_VERSION {contract.ABI_VERSION}", ""]
    out += _enum("IwpVtsMethod", [(f"kIwpVts{camel(m)}", i) for m, i in contract.METHOD_IDS.items()],
                 "kIwpVtsNumMethods")
    out += ["// Element types; the first three are the activations' (IwpVtsParams.dtype)."]
    out += _enum("IwpVtsDtype", [(f"kIwpVts{camel(d)}", i) for i, d in enumerate(contract.DTYPES)])
    out += ["// The inputs, in the node's order (contract.INPUTS)."]
    out += _enum("IwpVtsInput", [(f"kIwpVts{camel(n)}", i) for i, n in enumerate(contract.INPUTS)],
                 "kIwpVtsNumInputs")
    out += ["// Shapes, the node's core attributes and the method's options (those of other methods are ignored).",
            "struct IwpVtsParams", "{"]
    for field, ctype, source in contract.PARAMS:
        doc = _SHAPE_DOC.get(field, "") if source is None else f"attribute {source}"
        if source in contract.CHOICES:
            doc += f" (position in {', '.join(contract.CHOICES[source])})"
        out.append(f"    {_C_TYPES[ctype]} {field}; // {doc}")
    out += ["};", "", "namespace iwp", "{", "namespace vts", "{", ""]
    out += ["// The node's identity: how TensorRT's ONNX parser finds the plugin.",
            f"inline constexpr char const* kOpType = {_literal(contract.OP_TYPE)};",
            f"inline constexpr char const* kPluginVersion = {_literal(contract.PLUGIN_VERSION)};",
            f"inline constexpr char const* kPluginNamespace = {_literal(contract.PLUGIN_NAMESPACE)};", ""]
    out += ["enum class AttributeType : int32_t", "{", "    kInt,   // TensorRT kINT32", "    kFloat, // kFLOAT32",
            "    kText,  // kCHAR", "};", "",
            "enum class ParamType : int32_t", "{", "    kNone, // not a kernel parameter", "    kInt32,",
            "    kInt64,", "    kDouble,", "};", "",
            "struct Attribute", "{", "    char const* name;", "    AttributeType type;",
            "    int64_t defaultInt;", "    double defaultReal;", "    char const* defaultText;",
            "    char const* const* choices; // a closed value set, stored in IwpVtsParams as the position",
            "    int32_t nbChoices;", "    ParamType param;", "    size_t offset; // in IwpVtsParams",
            "    uint32_t methods; // bit m: method id m reads it (core attributes: every method)", "};", ""]
    for name, values in contract.CHOICES.items():
        out.append(f"inline constexpr char const* k{camel(name)}Choices[] = {{{', '.join(map(_literal, values))}}};")
    out += ["", "// Every scalar attribute a node carries (contract.scalar_attributes()), in order.",
            "inline constexpr Attribute kAttributes[] = {"]
    for name, kind in attributes.items():
        default = defaults[name]
        integer = _literal(default) if kind in (bool, int) else "0"
        real = _literal(float(default)) if kind is float else "0.0"
        text = _literal(default) if kind is str else '""'
        choices = (f"k{camel(name)}Choices", str(len(contract.CHOICES[name]))) if name in contract.CHOICES \
            else ("nullptr", "0")
        field, ctype = fields.get(name, (None, None))
        param = (f"ParamType::{_PARAM_TYPES[ctype]}", f"offsetof(IwpVtsParams, {field})") if field \
            else ("ParamType::kNone", "0")
        users = [i for m, i in contract.METHOD_IDS.items() if name in contract.CORE_ATTRIBUTES
                 or name in {f.name for f in dataclasses.fields(METHODS[m].Config)}]
        mask = f"0x{sum(1 << i for i in users):02X}U"
        out.append(f"    {{{_literal(name)}, AttributeType::{_ATTR_TYPES[kind]}, {integer}, {real}, {text}, "
                   f"{choices[0]}, {choices[1]}, {param[0]}, {param[1]}, {mask}}},")
    out += ["};", f"inline constexpr int32_t kNbAttributes = {len(attributes)};", ""]
    out.append(f"inline constexpr char const* kDtypeNames[] = {{{', '.join(map(_literal, contract.DTYPES))}}};")
    out += ["", "struct Input", "{", "    char const* name;", "    uint32_t dtypes; // bit i set: IwpVtsDtype i allowed",
            "    bool activation; // one of the activations, which share IwpVtsParams.dtype", "};", "",
            "inline constexpr Input kInputs[kIwpVtsNumInputs] = {"]
    for name in contract.INPUTS:
        mask = " | ".join(f"(1U << kIwpVts{camel(d)})" for d in contract.INPUT_DTYPES[name])
        out.append(f"    {{{_literal(name)}, {mask}, {str(name in contract.ACTIVATIONS).lower()}}},")
    out += ["};", f"inline constexpr int32_t kOutputDtype = kIwpVts{camel(contract.OUTPUT_DTYPE)};", ""]
    out += ["// The position of `text` in an attribute's value set, or -1.",
            "inline int32_t choiceIndex(Attribute const& attribute, char const* text)", "{",
            "    for (int32_t i = 0; text != nullptr && i < attribute.nbChoices; ++i)", "    {",
            "        if (std::strcmp(attribute.choices[i], text) == 0)", "        {", "            return i;",
            "        }", "    }", "    return -1;", "}", "",
            "// Whether the method with this id reads the attribute (a node carries every attribute; those of other",
            "// methods hold neutral values and are ignored).",
            "inline bool usedBy(Attribute const& attribute, int32_t method)", "{",
            "    return method >= 0 && method < kIwpVtsNumMethods && ((attribute.methods >> method) & 1U) != 0;",
            "}", "",
            "// The attribute called `name`, or nullptr.",
            "inline Attribute const* findAttribute(char const* name)", "{",
            "    for (Attribute const& attribute : kAttributes)", "    {",
            "        if (name != nullptr && std::strcmp(attribute.name, name) == 0)", "        {",
            "            return &attribute;", "        }", "    }", "    return nullptr;", "}", "",
            "// The method id of a method name, or -1; and back (nullptr for an unknown id).",
            "inline int32_t methodId(char const* name)", "{",
            "    for (int32_t id = 0; name != nullptr && id < kIwpVtsNumMethods; ++id)", "    {",
            "        if (std::strcmp(kMethodChoices[id], name) == 0)", "        {", "            return id;",
            "        }", "    }", "    return -1;", "}", "",
            "inline char const* methodName(int32_t id)", "{",
            "    return id >= 0 && id < kIwpVtsNumMethods ? kMethodChoices[id] : nullptr;", "}", "",
            "// Store an attribute's value where IwpVtsParams keeps it (text attributes: the choice's position).",
            "inline void setParam(IwpVtsParams& params, Attribute const& attribute, double value)", "{",
            "    char* at = reinterpret_cast<char*>(&params) + attribute.offset;",
            "    switch (attribute.param)", "    {",
            "    case ParamType::kInt32: { auto v = static_cast<int32_t>(value); std::memcpy(at, &v, sizeof(v)); break; }",
            "    case ParamType::kInt64: { auto v = static_cast<int64_t>(value); std::memcpy(at, &v, sizeof(v)); break; }",
            "    case ParamType::kDouble: std::memcpy(at, &value, sizeof(value)); break;",
            "    case ParamType::kNone: break;", "    }", "}", "",
            "} // namespace vts", "} // namespace iwp", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if params.h differs from contract.py")
    parser.add_argument("--output", type=Path, default=HEADER, help="where to write (default: beside this file)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is stale; regenerate it with `python -m iwp.plugins.visual_token_select.codegen`",
                  file=sys.stderr)
            return 1
        return 0
    if not args.output.exists() or args.output.read_text() != text:  # untouched when current: no rebuilds
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
