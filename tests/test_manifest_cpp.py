"""The C++ manifest reader (runtime/core/manifest.cpp, through iwp.runtime._core) against the Python one
(iwp/engine_format.py), format 4: the same format number and role vocabulary by graph kind; a freshly built
engine and synthetic ones (a stage at layer 1, a stage at layer 0 whose select runs first, no stage) read the
same, graphs, token table, weights, find, caches and segment lengths included; every mutation of a manifest
read by both or refused by both, with the same line where the C++ reader reads the field; any JSON or bytes
refused in one line, never a crash. Also: the C++ sampler takes the seeds Python takes, and no runtime source
spells a tensor name (names live in export/graphs.py and the manifest's io section)."""
from __future__ import annotations

import copy
import io
import json
import os
import random
import re
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine_format import valid   # the synthetic format-4 manifest, defined once

from iwp import engine_format
from iwp.engine_format import EngineManifest
from iwp.runtime import _core
from iwp.runtime.sampler import Sampler

ROOT = Path(__file__).resolve().parents[1]
REBUILD = "; rebuild it with `make engine`"
EXAMPLES = int(os.environ.get("IWP_HYPOTHESIS_EXAMPLES", "200"))  # more for a deeper search


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    """A tiny engine written by the Python exporter."""
    from iwp.export.engine import EngineSpec, build
    spec = EngineSpec("tiny-llava-ov", "iwp", 40, max_text_tokens=48, max_new_tokens=3)
    return build(spec, tmp_path_factory.mktemp("engines"), progress=lambda _: None)


def test_format_and_roles_are_the_python_ones():
    assert _core.MANIFEST_FORMAT == engine_format.FORMAT
    assert _core.role_table() == engine_format.ROLES
    assert tuple(_core.role_table()) == engine_format.KINDS


def _graphs(graphs) -> list:
    return [(g.name, g.kind, g.layers, g.stage, g.layer) for g in graphs]


def _summary(m) -> tuple:
    """What both readers read, in one comparable value (m: a C++ or a Python EngineManifest)."""
    if isinstance(m, EngineManifest):
        fields = (m.model.name, m.method.name, m.dtype, m.select, m.backend, m.model.resolution, m.model.n_layers,
                  m.model.n_kv_heads, m.model.head_dim, m.model.hidden_size, m.model.vocab_size, m.model.n_visual,
                  m.method.budget, m.method.stages, m.method.tokens_per_layer, m.shapes.batch, m.shapes.max_prompt,
                  m.shapes.max_text_tokens, m.shapes.max_new_tokens, m.shapes.cache_len, m.tokens.image,
                  m.tokens.eos, m.tokens.pad, m.files)
    else:
        fields = (m.model, m.method, m.dtype, m.select, m.backend, m.resolution, m.n_layers, m.n_kv_heads,
                  m.head_dim, m.hidden_size, m.vocab_size, m.n_visual, m.budget, m.stages, m.tokens_per_layer,
                  m.batch, m.max_prompt, m.max_text_tokens, m.max_new_tokens, m.cache_len, m.image_token,
                  m.eos_token, m.pad_token, m.files)
    table, weights = m.token_table, m.weights
    tensors = {graph: [[(t.name, tuple(t.shape), t.dtype, t.role, t.layer, t.stage) for t in getattr(io, side)]
                       for side in ("inputs", "outputs")] for graph, io in m.io.items()}
    return (fields, _graphs(m.graphs), (table.file, tuple(table.shape), table.dtype, table.tied),
            (weights.distinct_bytes, weights.stored_bytes, [(c.graph, c.what, c.bytes) for c in weights.copies]),
            tensors)   # a dict: the io section in any order


def _agree(text: str, directory: str = "E"):
    """Both readers read `text` the same, and every lookup a runtime makes gives the same answer."""
    core, python = _core.parse_manifest(text.encode(), directory), EngineManifest.from_json(text, directory)
    assert _summary(core) == _summary(python)
    assert core.directory == directory
    assert _graphs(core.segments()) == _graphs(python.segments())
    assert _graphs(core.selects()) == _graphs(python.selects())
    for graph, graph_io in python.io.items():
        assert _graphs([core.graph(graph)]) == _graphs([python.graph(graph)])
        for side in ("inputs", "outputs"):
            for t in getattr(graph_io, side):                       # find() agrees on every recorded tensor
                found = core.find(graph, side, t.role, layer=t.layer, stage=t.stage)
                assert (found.name, tuple(found.shape), found.dtype) == (t.name, t.shape, t.dtype)
            assert [t.name for t in core.caches(graph, side)] == [t.name for t in python.caches(graph, side)]
    for core_segment, segment in zip(core.segments(), python.segments()):
        for prompt_len in (python.model.n_visual + 1, python.shapes.max_prompt):
            assert core.segment_prefill_len(core_segment, prompt_len) == python.segment_prefill_len(segment, prompt_len)
    return core, python


def test_cpp_reads_a_built_engine_as_python_does(engine):
    core, python = _agree((engine / "manifest.json").read_text(), str(engine))
    assert _core.read_manifest(str(engine)).graphs[2].name == "segment.0"
    assert [g.kind for g in core.graphs] == ["embed", "vision", "segment", "select", "segment"]
    assert core.stages == ((2, 40),) and len(core.cache_len) == core.n_layers == 8
    assert core.segment_prefill_len(core.segments()[1], 350) == 350 - 336 + 40
    with pytest.raises(RuntimeError, match=r"^engine .*: segment.0 has no key \(layer 2\) output; rebuild it"):
        core.find("segment.0", "outputs", "key", layer=2)                 # layer 2 is segment.1's
    with pytest.raises(RuntimeError, match=r"^engine .*: has no graph decode; rebuild it with `make engine`$"):
        core.graph("decode")                                               # format 3's graphs are gone
    with pytest.raises(ValueError, match="side must be 'inputs' or 'outputs'"):
        core.find("segment.1", "output", "logits")
    with pytest.raises(ValueError, match="layer and stage are None or >= 0"):
        core.find("segment.1", "outputs", "logits", layer=-1)


def _tensor(name, role, shape=(1, 4), dtype="float32", **extra):
    return {"name": name, "shape": list(shape), "dtype": dtype, "role": role, **extra}


def _single_segment(stage_at_zero: bool, n_layers: int = 3) -> dict:
    """valid() with one segment over every layer: after a select at layer 0 (DivPrune, random), or unpruned."""
    document = valid(n_layers)
    last = document["io"].pop("segment.1")
    graphs = [{"name": "embed", "kind": "embed"}, {"name": "vision", "kind": "vision"}]
    if stage_at_zero:
        graphs.append({"name": "select.0", "kind": "select", "stage": 0, "layer": 0})
        document["method"].update(stages=[[0, 2]], tokens_per_layer=[2] * n_layers)
    else:
        del document["io"]["select.0"]
        document["method"].update(stages=[], tokens_per_layer=[4] * n_layers, nodes=[], budget=4)
        document["weights"]["copies"] = []
    graphs.append({"name": "segment.0", "kind": "segment", "layers": [0, n_layers]})
    caches = [_tensor(f"{kind}{l}{r}", r, (1, 2, 9, 4), "bool" if r == "valid" else "float32", layer=l)
              for kind in ("past", "pres") for l in range(n_layers) for r in ("key", "value", "valid")]
    document["io"]["segment.0"] = {"inputs": last["inputs"][:4] + caches[:3 * n_layers],
                                   "outputs": last["outputs"][:1] + caches[3 * n_layers:]}
    document["graphs"] = graphs
    document["files"] = {f"{g['name']}.onnx": "0" * 64 for g in graphs} | {"token_table.bin": "0" * 64}
    return document


def test_cpp_reads_synthetic_manifests_as_python_does():
    core, _ = _agree(json.dumps(valid(3)))
    assert core.token_table.tied and core.weights.copies[0].graph == "select.0" and core.resolution == (64, 64)
    core, _ = _agree(json.dumps(_single_segment(stage_at_zero=True)))
    assert [g.name for g in core.graphs] == ["embed", "vision", "select.0", "segment.0"] and core.stages == ((0, 2),)
    assert core.segment_prefill_len(core.segments()[0], 7) == 7 - 4 + 2   # the first segment runs pruned
    core, _ = _agree(json.dumps(_single_segment(stage_at_zero=False)))
    assert not core.selects() and core.segment_prefill_len(core.segments()[0], 7) == 7
    assert [t.layer for t in core.caches("segment.0", "inputs")] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _refusal(text: bytes, directory: str = "E") -> str | None:
    """None if the C++ reader reads `text`; else its error, checked to be the one rebuild line."""
    try:
        _core.parse_manifest(text, directory)
    except RuntimeError as error:
        message = str(error)
        assert message.startswith(f"engine {directory}: ") and message.endswith(REBUILD), message
        assert "\n" not in message and "json.exception" not in message and message.isascii(), message
        return message
    return None


def _python_refusal(text: str) -> str | None:
    try:
        EngineManifest.from_json(text, "E")
    except ValueError as error:
        return str(error)
    return None


def _paths(value, path=()):
    """Every member and element of a JSON document, as key paths."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from _paths(child, path + (key,))


# What the C++ reader reads (a C++ app needs no more): under these both readers refuse the same documents
# with the same line. Elsewhere the C++ reader may read what the Python one refuses, never the reverse.
CPP_READS = {("format",), ("model", "name"), ("model", "resolution"), ("model", "n_visual"), ("model", "n_layers"),
             ("model", "hidden_size"), ("model", "n_kv_heads"), ("model", "head_dim"), ("model", "vocab_size"),
             ("method", "name"), ("method", "budget"), ("method", "stages"), ("method", "tokens_per_layer"),
             ("shapes",), ("dtype",), ("select",), ("backend",), ("tokens",), ("files",), ("graphs",),
             ("token_table",), ("weights",), ("io",)}
# Replacement values: every JSON type, and ints that are in range for some fields and not others.
PALETTE = [None, True, 0, 1, -1, 2, 7, 1.5, "", "s", "fp16", "key", "segment", "select.0", [], [1, 2], [0, 9], {}]


def _read_by_cpp(path) -> bool:
    return any(path[:len(prefix)] == prefix for prefix in CPP_READS)


def _mutations(good: dict, sample: int, seed: int):
    """(path, value): every deletion of a member the C++ reader reads (two tensors a side in io), every
    section deleted, and a fixed random sample of the palette's replacements anywhere."""
    paths = list(_paths(good))
    sampled = [p for p in paths if p[0] != "io" or len(p) < 4 or p[3] in (0, 1, 3)]
    deletions = [(path, ...) for path in sampled if _read_by_cpp(path) and isinstance(path[-1], str)]
    deletions += [((section,), ...) for section in good]
    replacements = [(path, value) for path in paths for value in PALETTE]
    return deletions + random.Random(seed).sample(replacements, min(len(replacements), sample))


def _disagreements(original: str, mutations) -> list:
    disagreements = []
    for path, value in mutations:
        document = json.loads(original)
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if value is ...:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        text = json.dumps(document)
        python, core = _python_refusal(text), _refusal(text.encode())
        if python is None and core is None:
            _agree(text)
        elif python is None or (_read_by_cpp(path) and python != core):
            disagreements.append((path, value, python, core))
    return disagreements


@pytest.mark.parametrize("which", ["built", "synthetic", "stage at layer 0"])
def test_mutations_are_read_or_refused_by_both_with_the_same_line(which, engine):
    """Members deleted, and values replaced from the palette: where the Python reader reads the result, so
    does the C++ one (the same values); in a field the C++ reader reads, both refuse with the same line.
    (The Python reader takes ~20 ms a document; IWP_HYPOTHESIS_EXAMPLES samples more.)"""
    original = {"built": lambda: (engine / "manifest.json").read_text(), "synthetic": lambda: json.dumps(valid(3)),
                "stage at layer 0": lambda: json.dumps(_single_segment(stage_at_zero=True))}[which]()
    mutations = _mutations(json.loads(original), 2 * EXAMPLES, seed=len(which))
    assert len(mutations) > 150
    disagreements = _disagreements(original, mutations)
    assert not disagreements, disagreements[:5]


@pytest.mark.parametrize("change, words", [
    (lambda d: d["graphs"].pop(3), "field graphs[3] is a segment after a segment"),
    (lambda d: d["graphs"][4].update(layers=[1, 5]), "field graphs[4].layers is [1, 5], not a range of layers from 1"),
    (lambda d: d["graphs"][4].pop("layers"), "field graphs[4].layers is null, not a range of layers from 1"),
    (lambda d: d["graphs"][3].update(layer=0), "field graphs[3] is not stage 0 at layer 1"),
    (lambda d: d["graphs"].insert(0, d["graphs"].pop(1)), "field graphs does not start with the embed and vision"),
    (lambda d: d["graphs"].__setitem__(slice(3, 5), []), "graphs' segments end at layer 1, not model.n_layers 3"),
    (lambda d: d["method"].update(stages=[[1, 2], [2, 1]]), "field graphs has 1 selects, not one per method stage (2)"),
    (lambda d: d["io"].update(decode=d["io"]["embed"]), 'field io holds "decode", which is not in graphs'),
    (lambda d: d["io"]["segment.0"]["inputs"][4].update(layer=-1), 'io["segment.0"].inputs[4].layer is -1, not in [0, 2]'),
    (lambda d: d["io"]["segment.0"]["inputs"][0].update(layer=-1), "inputs[0].layer is set, but role hidden takes no"),
    (lambda d: d["io"]["embed"]["inputs"][0].update(shape=[1, ""]), "shape[1] is \"\", not a size or a dimension"),
    (lambda d: [t.update(name="\u00e9\n" * 30) for t in d["io"]["embed"]["inputs"]],   # shown escaped, shortened
     'io.embed.inputs[1].name repeats the name "\\u00e9\\n\\u00e9\\n\\u00e9\\n\\u00e9\\n\\u00...'),
    (lambda d: d["files"].update({"a/b": "0"}), 'field files holds "a/b", not a file name in the engine directory'),
    (lambda d: d["token_table"].update(dtype="int8"), 'token_table.dtype is "int8", not float32 or float16'),
    (lambda d: d["tokens"].update(eos=2 ** 40), "tokens.eos is 1099511627776, not an integer in [-2147483648, "),
    (lambda d: d.update(format=4.0), "field format is a number, not an integer"),
    (lambda d: d.update(format=3), "manifest format 3 is not this iwp's format 4"),
    (lambda d: d.pop("format"), "manifest format null is not this iwp's format 4"),
])
def test_damaged_fields_are_the_python_readers_line(change, words):
    """Damage the checks after the types catch: the C++ line names the field and is Python's own (but for
    token ids past int32, which only the C++ reader refuses)."""
    document = valid(3)
    change(document)
    text = json.dumps(document)
    core = _refusal(text.encode())
    assert core is not None and words in core, core
    if "tokens.eos" not in words:
        assert core == _python_refusal(text)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=30)
SECTIONS = [(), ("io",), ("io", "segment.0"), ("graphs",), ("graphs", 2), ("model",), ("shapes", "cache_len"),
            ("token_table",), ("weights", "copies")]


@settings(max_examples=EXAMPLES, deadline=None)
@given(json_values, st.sampled_from(SECTIONS))
def test_any_json_is_read_or_refused_in_one_line(value, where):
    """Arbitrary JSON, as the whole document or in place of one section of a valid one."""
    document = valid(3) if where else value
    if where:
        target = document
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] = value
    _refusal(json.dumps(document).encode())


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_refused_in_one_line(data):
    assert _refusal(data) is not None


def test_cpp_reader_refuses_files_it_cannot_read_in_one_line(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(RuntimeError, match=r"has no readable manifest.json; rebuild it with `make engine`$"):
        _core.read_manifest(str(tmp_path))
    with pytest.raises(RuntimeError, match="no readable manifest.json"):
        _core.read_manifest(str(tmp_path / "missing"))
    assert "corrupt (not JSON, at line 1, column 2)" in _refusal(b"{x")


# ----------------------------------------------------------------------------------------- seeds

@pytest.mark.parametrize("seed", [-1, 2**64 + 5, 2**70, -(2**64) - 3, 0, 2**64 - 1])
@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.5, 0.9)])
def test_core_sampler_takes_any_python_int_seed_as_the_reference_does(seed, temperature, top_p):
    rng = np.random.default_rng(7)
    python, core = Sampler(temperature, top_p, seed), _core.Sampler(temperature, top_p, seed)
    wrapped = _core.Sampler(temperature, top_p, seed & (2**64 - 1))   # what the wrap means
    drawn = []
    for _ in range(100):
        logits = (rng.standard_normal(300) * 2).astype(np.float32)
        drawn.append(python(logits))
        assert core.sample(logits) == drawn[-1] == wrapped.sample(logits)
    assert len(set(drawn)) > 10                                       # a real draw, not one token


def test_core_sampler_seeds_wrap_modulo_2_64_and_refuse_non_integers():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)

    def stream(seed):
        sampler = _core.Sampler(1.0, 1.0, seed)
        return [sampler.sample(logits) for _ in range(20)]
    assert stream(2**70 + 1) == stream(1) and stream(-1) == stream(2**64 - 1) and stream(-(2**64)) == stream(0)
    assert len({tuple(stream(seed)) for seed in (-1, 1, 2)}) == 3
    assert stream(np.int64(-1)) == stream(-1)                         # numpy ints too, through __index__
    for bad in (1.5, "3", None, [1]):
        with pytest.raises(TypeError, match="seed must be an int"):
            _core.Sampler(1.0, 1.0, bad)


# ----------------------------------------------------------------------------------------- tensor names

# Tensor names are spelled in export/graphs.py only; runtimes find tensors by role in the manifest's io
# section. A literal starting with one of these prefixes, or equal to one of these names, is a spelled name.
NAME_PREFIXES = ("present.", "past.", "kept.")
CPP_NAMES = ("logits", "inputs_embeds", "input_ids", "pixel_values", "image_features")
# Python spells "logits" as a role (find(..., "logits")) and HF's processor keys input_ids and pixel_values.
PYTHON_NAMES = ("inputs_embeds", "image_features")
# C++ spells each role once, as a constant in runtime/core/manifest.h: `constexpr char kLogits[] = "logits";`
ROLE_CONSTANT = re.compile(r'^\s*constexpr char k\w+\[\] = "\w+";')
ROLE_DEFINITIONS = ROOT / "runtime" / "core" / "manifest.h"


def cpp_string_literals(text: str):
    """(line number, line, contents) of each string literal in C++ source, outside comments and char literals."""
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            line += text.count("\n", i, end)
            i = end
        elif c == "'":
            match = re.compile(r"'(?:[^'\\\n]|\\.)*'").match(text, i)
            i = match.end() if match else i + 1
        elif c == '"':
            match = re.compile(r'"((?:[^"\\\n]|\\.)*)"').match(text, i)
            if match is None:
                i += 1
                continue
            start = text.rfind("\n", 0, i) + 1
            yield line, text[start:text.find("\n", i) if "\n" in text[i:] else n], match.group(1)
            i = match.end()
        else:
            line += c == "\n"
            i += 1


def python_string_literals(text: str):
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.STRING:
            body = re.sub(r"^[rbfuRBFU]*", "", token.string).strip("'\"")
            yield token.start[0], token.line, body
        elif sys.version_info >= (3, 12) and token.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            yield token.start[0], token.line, token.string


def spelled_names(text: str, literals, names, defines_roles: bool = False) -> list[tuple[int, str]]:
    """(line number, line) of each spelled tensor name; `defines_roles`: the file whose role constants count."""
    return [(number, line.strip()) for number, line, body in literals(text)
            if (body.startswith(NAME_PREFIXES) or body in names) and not (defines_roles and ROLE_CONSTANT.match(line))]


def _sources(kind: str) -> list[Path]:
    if kind == "cpp":
        return sorted(p for folder in ("runtime", "plugins") for p in (ROOT / folder).rglob("*")
                      if p.suffix in (".cpp", ".h", ".cu", ".cuh") and p.is_file())
    skip = {ROOT / "export" / "graphs.py"}
    return sorted(p for folder in ("iwp", "export", "runtime", "tools", "calibration", "plugins")
                  for p in (ROOT / folder).rglob("*.py") if p not in skip)


@pytest.mark.parametrize("kind", ["cpp", "python"])
def test_no_tensor_name_is_spelled_outside_graphs_py(kind):
    literals, names = (cpp_string_literals, CPP_NAMES) if kind == "cpp" else (python_string_literals, PYTHON_NAMES)
    sources = _sources(kind)
    assert len(sources) > 10
    found = {str(p.relative_to(ROOT)): hits for p in sources
             if (hits := spelled_names(p.read_text(encoding="utf-8"), literals, names, p == ROLE_DEFINITIONS))}
    assert not found, found


def test_the_name_scan_finds_spelled_names():
    """The scan itself: it must see a name in code, and nothing in comments, char literals or role constants."""
    cpp = ('graph.bind("present." + l + ".key", p); // "logits" in a comment\n'
           "char q = '\"'; auto s = \"logits\";\n/* \"past.0.key\"\n */ constexpr char kLogits[] = \"logits\";\n"
           'x("kept.0"); y("pixel_values"); z("\\"logits\\"");\n    constexpr char kLogits[] = "logits";\n')
    assert [n for n, _ in spelled_names(cpp, cpp_string_literals, CPP_NAMES, True)] == [1, 2, 4, 5, 5]
    assert [n for n, _ in spelled_names(cpp, cpp_string_literals, CPP_NAMES)] == [1, 2, 4, 5, 5, 6]
    python = 'a = f"present.{layer}.key"\nb = "logits"  # a role\nc = {"inputs_embeds": x}\n# "past.0.key"\n'
    assert [n for n, _ in spelled_names(python, python_string_literals, PYTHON_NAMES)] == [1, 3]
