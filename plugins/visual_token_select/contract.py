"""The VisualTokenSelect op contract, written once.

The ONNX schema (onnx_op.py), the torch custom op, the ONNX Runtime op (ort_op.py) and the
ctypes binding (cuda.py) read their names, input order, dtypes and attributes from here. The C++ side (the
CPU kernel, the CUDA kernels, the TensorRT creator) reads params.h, which codegen.py generates from this
module; tests/test_op_header.py fails when the committed header is stale. The method attributes are derived
from the methods' config dataclasses, so a new option appears in every implementation at once.
"""
from __future__ import annotations

import dataclasses
import functools
import typing

from . import METHODS, make_method
from .iwp_method import QUERIES

OP_TYPE = "VisualTokenSelect"
DOMAIN = "iwp"                 # TensorRT's parser maps (op_type, plugin_namespace, plugin_version) to a plugin
OP_VERSION = 1
PLUGIN_NAMESPACE = "iwp"
PLUGIN_VERSION = "1"

# Input order of the node (LayerView's fields). ttv is zeros for methods that do not track it. On the node the
# masks are int32, not bool: TensorRT plugins take no bool tensors.
INPUTS = ("hidden", "q", "k", "q_rot", "k_rot", "v", "key_mask", "visual_start", "query_idx", "query_mask",
          "last_idx", "visual_xy", "ttv")
OUTPUT = "indices"             # [B, keep] int64, ascending

# Bumped with any change to IwpVtsParams or to the selection's results (params.h's IWP_VTS_ABI_VERSION).
ABI_VERSION = 2

# Method ids on the C side (IwpVtsMethod); ids are part of the ABI, so a new method takes the next one.
METHOD_IDS = {"iwp": 0, "fastv": 1, "dart": 2, "divprune": 3, "random": 4, "transprune": 5, "btp": 6}

# Element types, by id (IwpVtsDtype). The first three are the activations' (IwpVtsParams.dtype).
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64")
ACTIVATION_DTYPES = DTYPES[:3]
ACTIVATIONS = INPUTS[:6]       # hidden, q, k, q_rot, k_rot, v: one dtype for all six, scored in fp32
INPUT_DTYPES = {**{name: ACTIVATION_DTYPES for name in ACTIVATIONS},
                "key_mask": ("int32",), "visual_start": ("int64",), "query_idx": ("int64",),
                "query_mask": ("int32",), "last_idx": ("int64",), "visual_xy": ("float32",), "ttv": ("float32",)}
OUTPUT_DTYPE = "int64"

# Attributes every node carries, beside the method's own options.
CORE_ATTRIBUTES = {"method": str, "keep": int, "layer_index": int, "stage": int, "n_stages": int,
                   "plugin_namespace": str, "plugin_version": str}
CORE_DEFAULTS = {"method": "iwp", "keep": 0, "layer_index": 0, "stage": 0, "n_stages": 1,
                 "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}

# String attributes with a closed set of values; on the C side a value is stored as its position.
CHOICES = {"method": tuple(METHOD_IDS), "queries": QUERIES, "plugin_namespace": (PLUGIN_NAMESPACE,),
           "plugin_version": (PLUGIN_VERSION,)}

# IwpVtsParams, field by field: (C name, C type, the attribute it is read from, or None for shapes and
# dtype). The ctypes mirror (cuda.py) and the generated header both follow this order.
PARAMS = (("method", "int32", "method"), ("dtype", "int32", None), ("batch", "int64", None),
          ("tokens", "int64", None), ("width", "int64", None), ("queryHeads", "int64", None),
          ("kvHeads", "int64", None), ("headDim", "int64", None), ("visual", "int64", None),
          ("queries", "int64", None), ("keep", "int64", "keep"), ("stage", "int64", "stage"),
          ("nStages", "int64", "n_stages"), ("lam", "double", "lam"), ("chunk", "int64", "chunk"),
          ("growth", "double", "growth"), ("queriesLast", "int32", "queries"), ("rebalance", "int32", "rebalance"),
          ("pivots", "int64", "pivots"), ("seed", "int64", "seed"), ("alpha", "double", "alpha"),
          ("attentionFirst", "double", "attention_first"), ("attentionLast", "double", "attention_last"),
          ("seedFraction", "double", "seed_fraction"))


def _attribute_type(annotation) -> type:
    """bool/int/float/str, or tuple for a list of ints; Optional[...] reads as its inner type."""
    base = next(a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None))
    if typing.get_origin(base) is tuple:
        return tuple
    if base in (bool, int, float, str):
        return base
    raise TypeError(f"no ONNX attribute type for {annotation!r}")


def method_attributes() -> dict[str, type]:
    """Union of every method's config fields: name -> bool/int/float/str/tuple (tuple = list of ints)."""
    return dict(_method_attributes())


@functools.cache
def _method_attributes() -> dict[str, type]:  # the methods are fixed at import; get_type_hints is slow
    out: dict[str, type] = {}
    for cls in METHODS.values():
        hints = typing.get_type_hints(cls.Config)
        for field in dataclasses.fields(cls.Config):
            kind = _attribute_type(hints[field.name])
            if out.setdefault(field.name, kind) is not kind:
                raise TypeError(f"option {field.name!r} has two types across methods: {out[field.name]} and {kind}")
    clash = set(out) & set(CORE_ATTRIBUTES)
    if clash:
        raise TypeError(f"method options {sorted(clash)} clash with the op's core attributes")
    return out


def core_attributes(method: str, keep: int, layer_index: int, stage: int, n_stages: int) -> dict:
    """The attributes every node carries beside the method's options."""
    return {"method": method, "keep": keep, "layer_index": layer_index, "stage": stage, "n_stages": n_stages,
            "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def method_options(config) -> dict:
    """A method config as attribute values (tuples become lists; None options are omitted)."""
    options = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is not None:
            options[field.name] = list(value) if isinstance(value, tuple) else value
    return options


def node_attributes(method, keep: int, layer_index: int, stage: int, n_stages: int) -> dict:
    """The attributes of one node: the core ones plus the method's options."""
    return {**core_attributes(method.name, keep, layer_index, stage, n_stages), **method_options(method.config)}


def scalar_attributes() -> dict[str, type]:
    """Every attribute a node carries a single value for (core first, then the methods' options; BTP's
    `layers` list is left out): the fields of the TensorRT creator, in order."""
    return {name: kind for name, kind in {**CORE_ATTRIBUTES, **method_attributes()}.items() if kind is not tuple}


def attribute_defaults() -> dict:
    """name -> default of every scalar attribute: the core defaults, then each option's default from the
    first method (in METHODS order) that has it. `layer` differs between methods; the creator never uses it."""
    out = dict(CORE_DEFAULTS)
    for cls in METHODS.values():
        for field in dataclasses.fields(cls.Config):
            if field.name in scalar_attributes() and field.name not in out:
                out[field.name] = field.default
    return out


_NEUTRAL = {bool: 0, int: 0, float: 0.0, str: ""}


def complete_attributes(attrs: dict) -> dict:
    """Every node carries every scalar attribute, so consumers (the TensorRT creator, ONNX Runtime's Python
    op) read one fixed field list. Options of other methods get a neutral 0 / 0.0 / "" and are ignored."""
    out = dict(attrs)
    for name, kind in {**CORE_ATTRIBUTES, **method_attributes()}.items():
        if kind in _NEUTRAL and name not in out:
            out[name] = _NEUTRAL[kind]
    return {k: int(v) if isinstance(v, bool) else v for k, v in out.items()}


def method_from_attributes(attrs: dict):
    """Rebuild the method a node describes; unknown methods and out-of-range options fail here, at load."""
    name = attrs["method"]
    if name not in METHODS:
        raise ValueError(f"VisualTokenSelect: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    fields = {f.name: f for f in dataclasses.fields(METHODS[name].Config)}
    options = {}
    for key, value in attrs.items():
        if key in fields:
            kind = _attribute_type(typing.get_type_hints(METHODS[name].Config)[key])
            options[key] = tuple(int(v) for v in value) if kind is tuple else kind(value)
    return make_method(name, **options)
