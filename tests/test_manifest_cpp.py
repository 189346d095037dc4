"""The C++ manifest reader (runtime/core/manifest.cpp, through iwp.runtime._core) against the Python one
(iwp/engine_format.py): the same format number and role vocabulary; a freshly built engine read the same;
every mutation of its manifest read by both or refused by both, the C++ side with one line; any JSON or
bytes refused in one line, never a crash. Also: the C++ sampler takes the seeds Python takes, and no runtime
source spells a tensor name (names live in export/graphs.py and the manifest's io section)."""
from __future__ import annotations

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
    assert tuple(_core.role_table()) == engine_format.GRAPHS


def _summary(m) -> tuple:
    """What both readers read, in one comparable value (m: a C++ or a Python EngineManifest)."""
    if isinstance(m, EngineManifest):
        fields = (m.model.name, m.method.name, m.dtype, m.model.n_layers, m.model.n_kv_heads, m.model.head_dim,
                  m.model.hidden_size, m.model.vocab_size, m.model.n_visual, m.shapes.max_prompt,
                  m.shapes.max_new_tokens, list(m.shapes.prefill_len), list(m.shapes.cache_len), len(m.method.stages),
                  m.tokens.image, m.tokens.eos, m.tokens.pad)
    else:
        fields = (m.model, m.method, m.dtype, m.n_layers, m.n_kv_heads, m.head_dim, m.hidden_size, m.vocab_size,
                  m.n_visual, m.max_prompt, m.max_new_tokens, m.prefill_len, m.cache_len, m.stages, m.image_token,
                  m.eos_token, m.pad_token)
    tensors = {graph: [[(t.name, list(t.shape), t.dtype, t.role, t.layer, t.stage) for t in getattr(io, side)]
                       for side in ("inputs", "outputs")] for graph, io in m.io.items()}
    return fields, list(tensors.items())


def test_cpp_reads_a_built_engine_as_python_does(engine):
    core, python = _core.read_manifest(str(engine)), EngineManifest.read(engine)
    assert _summary(core) == _summary(python)
    assert core.directory == str(engine) and core.stages == 1 and len(core.cache_len) == core.n_layers
    for graph, graph_io in python.io.items():               # find() agrees on every recorded tensor
        for side in ("inputs", "outputs"):
            for t in getattr(graph_io, side):
                found = core.find(graph, side, t.role, layer=t.layer, stage=t.stage)
                assert (found.name, found.shape, found.dtype) == (t.name, list(t.shape), t.dtype)
    with pytest.raises(RuntimeError, match=r"^engine .*: decode has no key \(layer 99\) output; rebuild it"):
        core.find("decode", "outputs", "key", layer=99)
    with pytest.raises(ValueError, match="side must be 'inputs' or 'outputs'"):
        core.find("decode", "output", "logits")
    with pytest.raises(ValueError, match="layer and stage are None or >= 0"):
        core.find("decode", "outputs", "logits", layer=-1)


def _one_line_refusal(text: bytes, directory: str = "E") -> str | None:
    """None if the C++ reader reads `text`; else its error, checked to be the one rebuild line."""
    try:
        _core.parse_manifest(text, directory)
    except RuntimeError as error:
        message = str(error)
        assert message.startswith(f"engine {directory}: ") and message.endswith(REBUILD), message
        assert "\n" not in message and "json.exception" not in message and message.isascii(), message
        return message
    return None


def _paths(value, path=()):
    """Every member and element of a JSON document, as key paths."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from _paths(child, path + (key,))


# What the C++ reader reads (a C++ app needs no more); under these both readers must agree both ways.
CPP_READS = {("format",), ("dtype",), ("model", "name"), ("model", "n_layers"), ("model", "n_kv_heads"),
             ("model", "head_dim"), ("model", "hidden_size"), ("model", "vocab_size"), ("model", "n_visual"),
             ("method", "name"), ("method", "stages"), ("shapes", "max_prompt"), ("shapes", "max_new_tokens"),
             ("shapes", "prefill_len"), ("shapes", "cache_len"), ("tokens",), ("io",)}
# Replacement values: every JSON type, and ints that are in range for some fields and not others.
PALETTE = [None, True, 0, 1, -1, 7, 1.5, "", "s", "fp16", "key", [], [1, 2], {}]


def _reads_both(text: str) -> tuple[bool, bool]:
    try:
        python = EngineManifest.from_json(text, "E")
    except ValueError:
        python = None
    core = None if _one_line_refusal(text.encode()) else _core.parse_manifest(text.encode(), "E")
    if python is not None and core is not None:
        assert _summary(core) == _summary(python)
    return python is not None, core is not None


def test_mutations_of_a_real_manifest_are_read_or_refused_by_both(engine):
    """Members deleted, and values replaced from the palette: where the Python reader reads the result, so
    does the C++ one (the same values); in a field the C++ reader reads, it refuses what the Python one
    refuses. Every deletion in what C++ reads, plus a fixed random sample of all replacements (the Python
    reader takes ~20 ms a document; IWP_HYPOTHESIS_EXAMPLES samples more)."""
    original = (engine / "manifest.json").read_text()
    good = json.loads(original)
    assert _reads_both(original) == (True, True)

    def read_by_cpp(path):
        return any(path[:len(prefix)] == prefix for prefix in CPP_READS)

    paths = list(_paths(good))
    sampled = [p for p in paths if p[0] != "io" or len(p) < 4 or p[3] in (0, 1)]   # two tensors a side
    deletions = [(path, ...) for path in sampled if read_by_cpp(path) and isinstance(path[-1], str)]
    deletions += [((section,), ...) for section in good]
    replacements = [(path, value) for path in paths for value in PALETTE]
    mutations = deletions + random.Random(0).sample(replacements, min(len(replacements), 2 * EXAMPLES))
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
        python, core = _reads_both(json.dumps(document))
        if (python and not core) or (read_by_cpp(path) and core and not python):
            disagreements.append((path, value, python, core))
    assert len(mutations) > 150 and not disagreements, disagreements[:10]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=30)


@settings(max_examples=EXAMPLES, deadline=None)
@given(json_values, st.sampled_from([(), ("io",), ("io", "prefill"), ("model",), ("shapes", "cache_len")]))
def test_any_json_is_read_or_refused_in_one_line(value, where):
    """Arbitrary JSON, as the whole document or in place of one section of a valid one."""
    document = {"format": engine_format.FORMAT, "model": {}, "shapes": {}, "io": {}} if where else value
    if where:
        target = document
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] = value
    _one_line_refusal(json.dumps(document).encode())


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_refused_in_one_line(data):
    assert _one_line_refusal(data) is not None


def test_cpp_reader_refuses_files_it_cannot_read_in_one_line(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(RuntimeError, match=r"has no readable manifest.json; rebuild it with `make engine`$"):
        _core.read_manifest(str(tmp_path))
    with pytest.raises(RuntimeError, match="no readable manifest.json"):
        _core.read_manifest(str(tmp_path / "missing"))


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
