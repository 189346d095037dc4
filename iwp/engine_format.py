"""The engine directory's format: what an exporter writes and a runtime reads, typed once.

`EngineManifest` is manifest.json as frozen dataclasses. Its `io` section records every graph's inputs and
outputs (name, shape with symbolic dims as strings, dtype, role); a runtime finds a tensor by role
(`find`), never by name, so tensor names are spelled only in export/graphs.py. The C++ reader
(runtime/core/manifest.cpp) implements the same schema.

Any JSON is either read or refused with one line, "engine DIR: ...; rebuild it with `make engine`", naming
the field: a manifest comes from disk and may be damaged, foreign or hand-edited.

Dependency-free on purpose (json, hashlib, dataclasses, pathlib, typing): export/ and runtime/ both import
it, and neither imports the other.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 3  # 3: the io section (names, shapes, dtypes and roles of every graph's tensors)
GRAPHS = ("embed", "vision", "prefill", "decode")
REBUILD = "rebuild it with `make engine`"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
CACHE_ROLES = ("key", "value", "valid")     # one tensor per layer each (TensorSpec.layer)
KEPT = "kept"                               # one per selection stage (TensorSpec.stage)

# The only vocabulary a runtime uses to find a tensor, per graph and direction (the C++ roleTable()).
ROLES = {
    "embed": {"inputs": ("token_ids",), "outputs": ("embeddings",)},
    "vision": {"inputs": ("pixels",), "outputs": ("features",)},
    "prefill": {"inputs": ("embeddings", "attention_mask", "positions", "visual_start", "query_idx", "query_mask",
                           "last_idx"),
                "outputs": ("logits", KEPT, *CACHE_ROLES)},
    "decode": {"inputs": ("embeddings", "position", "step", *CACHE_ROLES), "outputs": ("logits", *CACHE_ROLES)},
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Bad(Exception):
    """A manifest field that is wrong; from_json turns it into the one-line ValueError."""


def _shown(value) -> str:
    text = json.dumps(value, default=str)   # one line: json escapes newlines in strings and keys
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value) -> str:
    for kinds, word in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        (list, "an array"), (dict, "an object")):
        if isinstance(value, kinds):
            return word
    return "null"


# --- the typed manifest ---

@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]   # ints for static dims, the dim's symbolic name for dynamic ones
    dtype: str
    role: str
    layer: int | None = None       # the cache roles
    stage: int | None = None       # the kept role

    @property
    def static_shape(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    hf_id: str | None
    source: str
    grid: str
    resolution: tuple[int, int]    # (height, width) the image is resized to
    n_visual: int
    n_layers: int
    hidden_size: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class MethodInfo:
    name: str                      # a method name or "none"
    budget: int                    # visual tokens kept (N when unpruned)
    config: dict[str, Any]         # the method's resolved config (dataclasses.asdict)
    stages: tuple[tuple[int, int], ...]   # (layer, tokens kept) per selection stage
    nodes: tuple[dict[str, Any], ...]     # each stage's VisualTokenSelect attributes
    tokens_per_layer: tuple[int, ...]
    options: dict[str, Any]        # the resolved --option values (the model's defaults, then the command line's)


@dataclass(frozen=True)
class Flops:
    formula: str
    unpruned: int | float
    pruned: int | float
    ratio: int | float


@dataclass(frozen=True)
class Shapes:
    batch: int
    max_prompt: int                # prompts are left-padded to this many tokens
    max_text_tokens: int
    max_new_tokens: int
    prefill_len: tuple[int, ...]   # per layer: tokens the prefill leaves in the cache
    cache_len: tuple[int, ...]     # per layer: prefill_len + max_new_tokens


@dataclass(frozen=True)
class Plan:
    file: str
    profile: dict[str, tuple[tuple[int, ...], ...]]   # input -> (min, opt, max) shapes


@dataclass(frozen=True)
class TensorRTInfo:
    version: str
    plugin: str
    plugin_library: str
    strongly_typed_flag: bool
    plans: dict[str, Plan]


@dataclass(frozen=True)
class Tokens:
    image: int
    eos: int
    pad: int


@dataclass(frozen=True)
class EngineManifest:
    format: int
    inputs_hash: str
    model: ModelInfo
    method: MethodInfo
    flops: Flops
    shapes: Shapes
    dtype: str                     # fp32 or fp16
    select: str                    # plugin or native
    backend: str                   # onnxruntime or tensorrt
    tensorrt: TensorRTInfo | None
    tokens: Tokens
    tools: dict[str, str]
    files: dict[str, str]          # file name -> sha256
    spec: dict[str, Any]           # the EngineSpec it was built from
    io: dict[str, GraphIO]         # by graph name
    directory: str = field(default="", compare=False)   # where it was read from (errors name it); not written

    def find(self, graph: str, kind: str, role: str, layer: int | None = None, stage: int | None = None) -> TensorSpec:
        """The tensor of `graph`'s inputs or outputs with this role (and layer for the caches, stage for kept)."""
        assert kind in ("inputs", "outputs"), kind
        io = self.io.get(graph)
        for spec in (getattr(io, kind) if io else ()):
            if (spec.role, spec.layer, spec.stage) == (role, layer, stage):
                return spec
        which = role + (f" (layer {layer})" if layer is not None else "")
        which += f" (stage {stage})" if stage is not None else ""
        raise ValueError(f"engine {self.directory}: {graph} has no {which} {kind[:-1]}; {REBUILD}")

    def caches(self, graph: str, kind: str) -> list[TensorSpec]:
        """Every layer's key, value and valid tensor, layer by layer (decode's past and present layout)."""
        return [self.find(graph, kind, role, layer=layer)
                for layer in range(self.model.n_layers) for role in CACHE_ROLES]

    def to_dict(self) -> dict:
        return _plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, document, directory="") -> EngineManifest:
        """The manifest of a parsed manifest.json, or ValueError with one line naming the field."""
        try:
            if not isinstance(document, dict):
                raise _Bad(f"manifest.json is {_kind(document)}, not an object")
            if document.get("format") != FORMAT or isinstance(document.get("format"), bool):
                raise _Bad(f"manifest format {_shown(document.get('format'))} is not this iwp's format {FORMAT}")
            manifest = _read(cls, document, "")
            manifest = dataclasses.replace(manifest, directory=str(directory))
            _check(manifest)
        except _Bad as bad:
            raise ValueError(f"engine {directory}: {bad}; {REBUILD}") from None
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, directory="") -> EngineManifest:
        try:
            document = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError, TypeError):   # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"engine {directory}: manifest.json is corrupt (not JSON); {REBUILD}") from None
        return cls.from_dict(document, directory)

    @classmethod
    def read(cls, directory) -> EngineManifest:
        """DIR/manifest.json; a missing or unreadable file is the same one-line error."""
        directory = Path(directory)
        try:
            text = (directory / "manifest.json").read_bytes()
        except FileNotFoundError:
            raise ValueError(f"engine {directory}: has no manifest.json (an interrupted or foreign build); "
                             f"{REBUILD}") from None
        except OSError as err:
            raise ValueError(f"engine {directory}: manifest.json cannot be read ({err.strerror}); {REBUILD}") from None
        return cls.from_json(text, directory)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")   # NaN and Infinity: Python's json takes them, the C++ reader does not


# --- reading: each field converted to its annotated type, or _Bad naming it ---

def _read(kind, value, path: str):
    where = f"manifest.json field {path}" if path else "manifest.json"
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _read(option, value, path)
            except _Bad:
                if len(options) == 1:
                    raise
        words = {int: "an integer", str: "a string", float: "a number"}
        raise _Bad(f"{where} is {_kind(value)}, not {' or '.join(words.get(o, o.__name__) for o in options)}")
    if kind is bool:
        if not isinstance(value, bool):
            raise _Bad(f"{where} is {_kind(value)}, not a boolean")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"{where} is {_kind(value)}, not an integer")
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Bad(f"{where} is {_kind(value)}, not a number")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise _Bad(f"{where} is {_kind(value)}, not a string")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise _Bad(f"{where} is {_kind(value)}, not an array")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_read(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Bad(f"{where} has {len(value)} elements, not {len(args)}")
        return tuple(_read(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(f"{where} is {_kind(value)}, not an object")
        return {k: _read(args[1], v, f"{path}.{k}" if k.isidentifier() else f"{path}[{_shown(k)}]")
                for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise _Bad(f"{where} is {_kind(value)}, not an object")
        hints = typing.get_type_hints(kind)
        out = {}
        for f in dataclasses.fields(kind):
            if f.name == "directory":
                continue
            sub = f"{path}.{f.name}" if path else f.name
            if f.name not in value:
                if f.default is not dataclasses.MISSING:
                    continue
                raise _Bad(f"manifest.json field {sub} is missing")
            out[f.name] = _read(hints[f.name], value[f.name], sub)
        return kind(**out)
    raise AssertionError(f"no reader for {kind}")  # a field type this module does not know: a bug here


def _check(m: EngineManifest) -> None:
    """What types alone do not say: ranges, vocabularies, and the io section's roles."""
    def positive(path, value, least=1):
        if value < least:
            raise _Bad(f"manifest.json field {path} is {value}, not an integer >= {least}")
    for name in ("n_visual", "n_layers", "hidden_size", "n_kv_heads", "head_dim", "vocab_size"):
        positive(f"model.{name}", getattr(m.model, name))
    for name in ("batch", "max_prompt", "max_text_tokens", "max_new_tokens"):
        positive(f"shapes.{name}", getattr(m.shapes, name))
    for name in ("prefill_len", "cache_len"):
        values = getattr(m.shapes, name)
        if len(values) != m.model.n_layers:
            raise _Bad(f"manifest.json field shapes.{name} has {len(values)} layers, not model.n_layers "
                       f"{m.model.n_layers}")
        for i, v in enumerate(values):
            positive(f"shapes.{name}[{i}]", v)
    for name in ("unpruned", "pruned", "ratio"):
        value = getattr(m.flops, name)
        if isinstance(value, float) and not math.isfinite(value):   # 1e999 parses as inf
            raise _Bad(f"manifest.json field flops.{name} is not a finite number")
    for path, value, allowed in (("dtype", m.dtype, ("fp32", "fp16")), ("select", m.select, ("plugin", "native")),
                                 ("backend", m.backend, ("onnxruntime", "tensorrt"))):
        if value not in allowed:
            raise _Bad(f"manifest.json field {path} is {_shown(value)}, not one of {', '.join(allowed)}")
    for name in m.files:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise _Bad(f"manifest.json field files holds {_shown(name)}, not a file name in the engine directory")
    for graph in GRAPHS:
        if f"{graph}.onnx" not in m.files:
            raise _Bad(f"manifest.json field files records no {graph}.onnx")
        if graph not in m.io:
            raise _Bad(f"manifest.json field io.{graph} is missing")
    for graph, io in m.io.items():
        if graph not in ROLES:
            raise _Bad(f"manifest.json field io holds {_shown(graph)}, not one of {', '.join(GRAPHS)}")
        for kind in ("inputs", "outputs"):
            seen, names = set(), set()
            for i, t in enumerate(getattr(io, kind)):
                _check_tensor(m, t, f"io.{graph}.{kind}[{i}]", ROLES[graph][kind])
                if (t.role, t.layer, t.stage) in seen:
                    raise _Bad(f"manifest.json field io.{graph}.{kind}[{i}].role repeats role {t.role}")
                if t.name in names:
                    raise _Bad(f"manifest.json field io.{graph}.{kind}[{i}].name repeats the name {_shown(t.name)}")
                seen.add((t.role, t.layer, t.stage))
                names.add(t.name)


def _check_tensor(m: EngineManifest, t: TensorSpec, path: str, roles: tuple[str, ...]) -> None:
    if not t.name:
        raise _Bad(f"manifest.json field {path}.name is empty")
    if t.dtype not in DTYPES:
        raise _Bad(f"manifest.json field {path}.dtype is {_shown(t.dtype)}, not one of {', '.join(DTYPES)}")
    if t.role not in roles:
        raise _Bad(f"manifest.json field {path}.role is {_shown(t.role)}, not one of {', '.join(roles)}")
    for i, d in enumerate(t.shape):
        if (isinstance(d, int) and d < 0) or d == "":
            raise _Bad(f"manifest.json field {path}.shape[{i}] is {_shown(d)}, not a size or a dimension name")
    counts = {"layer": (t.layer, m.model.n_layers, t.role in CACHE_ROLES),
              "stage": (t.stage, len(m.method.stages), t.role == KEPT)}
    for key, (value, count, wanted) in counts.items():
        if wanted and value is None:
            raise _Bad(f"manifest.json field {path}.{key} is missing (role {t.role} takes one)")
        if not wanted and value is not None:
            raise _Bad(f"manifest.json field {path}.{key} is set, but role {t.role} takes no {key}")
        if wanted and not 0 <= value < count:
            raise _Bad(f"manifest.json field {path}.{key} is {value}, not in [0, {count - 1}]")


# --- writing ---

def _plain(value):
    """JSON values of a manifest: dataclasses as objects (TensorSpec's unset layer/stage left out)."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            unset = isinstance(value, TensorSpec) and f.name in ("layer", "stage") and item is None
            if f.name == "directory" or unset:
                continue
            out[f.name] = _plain(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"manifest value {value} is not JSON")   # a bug in the exporter, not user input
    return value
