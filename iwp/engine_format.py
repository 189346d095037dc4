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

FORMAT = 4  # 4: segment graphs (every weight stored once), the prompt's real length; 3: the io section
REBUILD = "rebuild it with `make engine`"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
CACHE_ROLES = ("key", "value", "valid")     # one tensor per layer each (TensorSpec.layer)
KEPT = "kept"                               # one per selection stage (TensorSpec.stage)
KINDS = ("embed", "vision", "segment", "select")

# The only vocabulary a runtime uses to find a tensor, per graph KIND and direction (the C++ roleTable()).
# A segment runs a contiguous range of decoder layers for prefill (T = the prompt) and decode (T = 1); a select
# runs one selection stage between two segments (prefill only). See export/graphs.py.
ROLES = {
    "embed": {"inputs": ("token_ids", "token_table"), "outputs": ("embeddings",)},
    "vision": {"inputs": ("pixels",), "outputs": ("features",)},
    "segment": {"inputs": ("hidden", "positions", "offset", "token_table", *CACHE_ROLES),
                "outputs": ("hidden", "logits", "transitions", *CACHE_ROLES)},
    "select": {"inputs": ("hidden", "positions", "visual_start", "query_idx", "query_mask", "last_idx", "alive", "ttv",
                          "transitions"),
               "outputs": (KEPT, "hidden", "positions", "query_idx", "last_idx", "ttv")},
}

# The token axis of a segment's per-token tensors: a prompt can run through a segment in chunks (consecutive
# runs at increasing offsets, each reading the caches the last one wrote), and these are cut and joined along it.
TOKEN_AXIS = {"hidden": 1, "positions": 1, "transitions": 2}


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
    max_prompt: int                # the longest prompt (N + max_text_tokens); prompts are not padded
    max_text_tokens: int
    max_new_tokens: int
    cache_len: tuple[int, ...]     # per layer: its capacity, max_prompt - N + its visual tokens + max_new_tokens


@dataclass(frozen=True)
class Plan:
    file: str
    profiles: tuple[dict[str, tuple[tuple[int, ...], ...]], ...]   # per profile: input -> (min, opt, max) shapes


@dataclass(frozen=True)
class GraphInfo:
    name: str                      # <name>.onnx (and <name>.plan)
    kind: str                      # one of KINDS
    layers: tuple[int, int] | None = None   # a segment's decoder layers [first, end)
    stage: int | None = None       # a select's stage
    layer: int | None = None       # a select's layer (the next segment's first)


@dataclass(frozen=True)
class TokenTable:
    file: str                      # raw, C order [vocab, hidden], little-endian, the engine's float dtype
    shape: tuple[int, int]
    dtype: str
    tied: bool                     # the last segment's LM head reads it (an input there too)


@dataclass(frozen=True)
class WeightCopy:
    graph: str
    what: str
    bytes: int


@dataclass(frozen=True)
class Weights:
    distinct_bytes: int            # the model's distinct parameter bytes in the engine's dtype (tied ones once)
    stored_bytes: int              # every graph's initializers and the token table
    copies: tuple[WeightCopy, ...]  # the named exceptions stored twice (each select's layer q/k/v)


@dataclass(frozen=True)
class BuildInfo:
    seconds: float                   # the build's wall time
    peak_rss_bytes: dict[str, int]   # the building process's peak resident memory by the end of each phase
                                     # (export; tensorrt when it builds plans): what `make engine` needs


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
    graphs: tuple[GraphInfo, ...]  # in run order: embed, vision, then segment.0, select.0, segment.1, ...
    token_table: TokenTable
    weights: Weights
    io: dict[str, GraphIO]         # by graph name
    build: BuildInfo | None = None   # how much the build took (None: not recorded)
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
        """The cache tensors `graph` has (a segment's layers), layer by layer: key, value, valid."""
        assert kind in ("inputs", "outputs"), kind
        specs = [t for t in getattr(self.io[graph], kind) if t.role in CACHE_ROLES]
        return sorted(specs, key=lambda t: (t.layer, CACHE_ROLES.index(t.role)))

    def graph(self, name: str) -> GraphInfo:
        for graph in self.graphs:
            if graph.name == name:
                return graph
        raise ValueError(f"engine {self.directory}: has no graph {name}; {REBUILD}")

    def segments(self) -> list[GraphInfo]:
        return [g for g in self.graphs if g.kind == "segment"]

    def selects(self) -> list[GraphInfo]:
        return [g for g in self.graphs if g.kind == "select"]

    def segment_prefill_len(self, segment: GraphInfo, prompt_len: int) -> int:
        """The tokens a segment runs in the prefill of a prompt of `prompt_len` tokens (its caches' fill)."""
        return prompt_len - self.model.n_visual + self.method.tokens_per_layer[segment.layers[0]]

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
    if len(m.shapes.cache_len) != m.model.n_layers:
        raise _Bad(f"manifest.json field shapes.cache_len has {len(m.shapes.cache_len)} layers, not model.n_layers "
                   f"{m.model.n_layers}")
    for i, v in enumerate(m.shapes.cache_len):
        positive(f"shapes.cache_len[{i}]", v)
    if len(m.method.tokens_per_layer) != m.model.n_layers:
        raise _Bad(f"manifest.json field method.tokens_per_layer has {len(m.method.tokens_per_layer)} layers, "
                   f"not model.n_layers {m.model.n_layers}")
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
    _check_graphs(m)
    table = m.token_table
    if table.file not in m.files:
        raise _Bad(f"manifest.json field files records no token table {_shown(table.file)}")
    if list(table.shape) != [m.model.vocab_size, m.model.hidden_size]:
        raise _Bad(f"manifest.json field token_table.shape is {list(table.shape)}, not [model.vocab_size, "
                   f"model.hidden_size]")
    if table.dtype not in ("float32", "float16"):
        raise _Bad(f"manifest.json field token_table.dtype is {_shown(table.dtype)}, not float32 or float16")
    for graph, io in m.io.items():
        kind = m.graph(graph).kind if graph in {g.name for g in m.graphs} else None
        if kind is None:
            raise _Bad(f"manifest.json field io holds {_shown(graph)}, which is not in graphs")
        for direction in ("inputs", "outputs"):
            seen, names = set(), set()
            for i, t in enumerate(getattr(io, direction)):
                _check_tensor(m, t, f"{_io(graph)}.{direction}[{i}]", ROLES[kind][direction])
                if (t.role, t.layer, t.stage) in seen:
                    raise _Bad(f"manifest.json field {_io(graph)}.{direction}[{i}].role repeats role {t.role}")
                if t.name in names:
                    raise _Bad(f"manifest.json field {_io(graph)}.{direction}[{i}].name repeats the name "
                               f"{_shown(t.name)}")
                seen.add((t.role, t.layer, t.stage))
                names.add(t.name)


def _io(graph: str) -> str:
    """A graph's path in the io section as the reader spells it (segment.0 is not an identifier)."""
    return f"io.{graph}" if graph.isidentifier() else f"io[{_shown(graph)}]"


def _check_graphs(m: EngineManifest) -> None:
    """embed and vision first, then segments covering every layer in order with a select at each stage layer
    (before the first segment when the stage is at layer 0), segments and selects alternating."""
    graphs = m.graphs
    names = [g.name for g in graphs]
    for i, g in enumerate(graphs):
        where = f"manifest.json field graphs[{i}]"
        if g.kind not in KINDS:
            raise _Bad(f"{where}.kind is {_shown(g.kind)}, not one of {', '.join(KINDS)}")
        if names.count(g.name) > 1 or not g.name or "/" in g.name:
            raise _Bad(f"{where}.name {_shown(g.name)} is repeated or not a file stem")
        if f"{g.name}.onnx" not in m.files:
            raise _Bad(f"manifest.json field files records no {g.name}.onnx")
        if g.name not in m.io:
            raise _Bad(f"manifest.json field {_io(g.name)} is missing")
    if [g.kind for g in graphs[:2]] != ["embed", "vision"]:
        raise _Bad("manifest.json field graphs does not start with the embed and vision graphs")
    end, stage, previous = 0, 0, None
    for i, g in enumerate(graphs[2:], start=2):
        where = f"manifest.json field graphs[{i}]"
        if g.kind not in ("segment", "select") or g.kind == previous:
            raise _Bad(f"{where} is a {g.kind} after a {previous or 'vision'}: segments and selects alternate "
                       "after embed and vision")
        if g.kind == "segment":
            if g.layers is None or g.layers[0] != end or not g.layers[0] < g.layers[1] <= m.model.n_layers:
                raise _Bad(f"{where}.layers is {_shown(g.layers)}, not a range of layers from {end}")
            end = g.layers[1]
        else:
            if stage >= len(m.method.stages) or g.stage != stage or g.layer != end \
                    or g.layer != m.method.stages[stage][0]:
                raise _Bad(f"{where} is not stage {stage} at layer {end}")
            stage += 1
        previous = g.kind
    if end != m.model.n_layers or previous != "segment":
        raise _Bad(f"manifest.json field graphs' segments end at layer {end}, not model.n_layers {m.model.n_layers}")
    if stage != len(m.method.stages):
        raise _Bad(f"manifest.json field graphs has {stage} selects, not one per method stage "
                   f"({len(m.method.stages)})")


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
    """JSON values of a manifest: dataclasses as objects (TensorSpec's and GraphInfo's unset fields left out)."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            unset = item is None and ((isinstance(value, TensorSpec) and f.name in ("layer", "stage"))
                                      or (isinstance(value, GraphInfo) and f.name in ("layers", "stage", "layer")))
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
