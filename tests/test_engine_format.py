"""iwp/engine_format.py: the typed manifest round-trips, finds tensors by role, and any JSON (or any bytes)
is either read or refused with the one-line rebuild error, never another exception."""
import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iwp.engine_format import FORMAT, GRAPHS, ROLES, EngineManifest, TensorSpec

EXAMPLES = int(os.environ.get("IWP_HYPOTHESIS_EXAMPLES", "200"))  # deeper searches: IWP_HYPOTHESIS_EXAMPLES=5000


def _tensor(name, role, shape=(1, 4), dtype="float32", **extra):
    return {"name": name, "shape": list(shape), "dtype": dtype, "role": role, **extra}


def valid(n_layers: int = 2, n_stages: int = 1) -> dict:
    """A small, complete format-3 manifest as the exporter writes it (names are arbitrary: a runtime binds by role)."""
    caches = lambda kind: [_tensor(f"{kind}{l}{r}", r, (1, 2, 9, 4), "bool" if r == "valid" else "float32", layer=l)  # noqa: E731
                           for l in range(n_layers) for r in ("key", "value", "valid")]
    return {
        "format": FORMAT, "inputs_hash": "abc",
        "model": {"name": "m", "hf_id": None, "source": "seed:0", "grid": "2x2", "resolution": [64, 64], "n_visual": 4,
                  "n_layers": n_layers, "hidden_size": 8, "n_kv_heads": 2, "head_dim": 4, "vocab_size": 11},
        "method": {"name": "iwp", "budget": 2, "config": {"lam": 0.3}, "stages": [[1, 2]] * n_stages,
                   "nodes": [{"method": "iwp"}] * n_stages, "tokens_per_layer": [4] + [2] * (n_layers - 1),
                   "options": {"lam": 0.3}},
        "flops": {"formula": "f", "unpruned": 10, "pruned": 5.0, "ratio": 0.5},
        "shapes": {"batch": 1, "max_prompt": 8, "max_text_tokens": 4, "max_new_tokens": 2,
                   "prefill_len": [8] * n_layers, "cache_len": [10] * n_layers},
        "dtype": "fp32", "select": "plugin", "backend": "onnxruntime", "tensorrt": None,
        "tokens": {"image": 5, "eos": 1, "pad": 0}, "tools": {"iwp": "0.1"},
        "files": {f"{g}.onnx": "0" * 64 for g in GRAPHS}, "spec": {"model": "m", "options": [["lam", 0.3]]},
        "io": {
            "embed": {"inputs": [_tensor("ids", "token_ids", (1, "tokens"), "int64")],
                      "outputs": [_tensor("emb", "embeddings", (1, "tokens", 8))]},
            "vision": {"inputs": [_tensor("px", "pixels", (1, 5, 3, 8, 8))], "outputs": [_tensor("f", "features")]},
            "prefill": {"inputs": [_tensor(r, r, (1, 8), "int64") for r in ROLES["prefill"]["inputs"]],
                        "outputs": [_tensor("lg", "logits", (1, 1, 11))]
                        + [_tensor(f"k{s}", "kept", (1, 2), "int64", stage=s) for s in range(n_stages)] + caches("p")},
            "decode": {"inputs": [_tensor("e", "embeddings"), _tensor("pos", "position", (1,), "int64"),
                                  _tensor("st", "step", (), "int64")] + caches("past"),
                       "outputs": [_tensor("lg", "logits", (1, 11))] + caches("pres")},
        },
    }


def test_round_trip_and_find_by_role():
    m = EngineManifest.from_dict(valid(), "d")
    assert EngineManifest.from_json(m.to_json(), "d") == m
    assert json.loads(m.to_json()) == valid()                          # written exactly as the exporter's dict
    assert m.find("embed", "inputs", "token_ids") == TensorSpec("ids", (1, "tokens"), "int64", "token_ids")
    assert m.find("prefill", "outputs", "kept", stage=0).name == "k0"
    assert [t.name for t in m.caches("decode", "inputs")] == [f"past{l}{r}" for l in range(2) for r in ("key", "value", "valid")]
    assert m.model.resolution == (64, 64) and m.method.stages == ((1, 2),) and m.shapes.cache_len == (10, 10)
    with pytest.raises(ValueError, match=r"^engine d: decode has no key \(layer 2\) input; rebuild it with `make engine`$"):
        m.find("decode", "inputs", "key", layer=2)


def _refused(document, words: str = "") -> str:
    with pytest.raises(ValueError) as err:
        EngineManifest.from_dict(document, "engines/x")
    message = str(err.value)
    assert "\n" not in message and message.startswith("engine engines/x: ") and message.endswith(
        "; rebuild it with `make engine`"), message
    assert words in message, message
    return message


def _with(change) -> dict:
    document = valid()
    change(document)
    return document


@pytest.mark.parametrize("document, words", [
    ([], "manifest.json is an array, not an object"),
    (3, "manifest.json is an integer, not an object"),
    ({"format": 3, "files": {}}, "field inputs_hash is missing"),
    ({"format": 2, "files": {}}, "manifest format 2 is not this iwp's format 3"),
    ({"format": "3"}, "manifest format \"3\" is not this iwp's format 3"),
    (_with(lambda d: d["model"].update(n_layers="2")), "field model.n_layers is a string, not an integer"),
    (_with(lambda d: d["model"].update(n_layers=True)), "field model.n_layers is a boolean, not an integer"),
    (_with(lambda d: d["model"].update(n_layers=0)), "model.n_layers is 0"),
    (_with(lambda d: d["shapes"].update(cache_len=[10])), "shapes.cache_len has 1 layers, not model.n_layers 2"),
    (_with(lambda d: d["method"].update(stages=[[1, 2, 3]])), "field method.stages[0] has 3 elements, not 2"),
    (_with(lambda d: d["io"].pop("vision")), "field io.vision is missing"),
    (_with(lambda d: d["io"]["decode"]["inputs"][4].update(layer=7)), "io.decode.inputs[4].layer is 7, not in [0, 1]"),
    (_with(lambda d: d["io"]["decode"]["inputs"][4].pop("layer")), "io.decode.inputs[4].layer is missing"),
    (_with(lambda d: d["io"]["embed"]["inputs"][0].update(role="pixels")), "io.embed.inputs[0].role is \"pixels\""),
    (_with(lambda d: d["io"]["embed"]["inputs"][0].update(dtype="float64")), "io.embed.inputs[0].dtype"),
    (_with(lambda d: d["io"]["embed"]["inputs"][0].update(shape=[1, 2.5])),
     "io.embed.inputs[0].shape[1] is a number, not an integer or a string"),
    (_with(lambda d: d["io"]["prefill"]["outputs"][1].update(layer=0)), "layer is set, but role kept takes no layer"),
    (_with(lambda d: d["io"]["decode"]["outputs"].append(d["io"]["decode"]["outputs"][1])), "repeats role key"),
    (_with(lambda d: d["files"].update({"../../etc/passwd": "0"})), "not a file name in the engine directory"),
    (_with(lambda d: d["files"].pop("prefill.onnx")), "files records no prefill.onnx"),
    (_with(lambda d: d.update(dtype="int8")), "field dtype is \"int8\", not one of fp32, fp16"),
    (_with(lambda d: d["flops"].update(ratio=float("inf"))), "flops.ratio is not a finite number"),
    (_with(lambda d: d["model"].update(name="a\nb", n_layers="x\ny")), "field model.n_layers is a string"),
])
def test_wrong_shapes_are_one_line(document, words):
    _refused(document, words)


@pytest.mark.parametrize("text", [b"", b"{not json", b"\xff\xfe", b"[" * 100_000, b'{"format": NaN}', b'{"a": -Infinity}'])
def test_corrupt_text_is_one_line(text):
    with pytest.raises(ValueError, match=r"^engine d: manifest.json is corrupt \(not JSON\); rebuild it") as err:
        EngineManifest.from_json(text, "d")
    assert "\n" not in str(err.value)


# --- fuzz: nothing but the one-line error comes out ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


def _one_line_or_read(call):
    try:
        return call()
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and message.endswith("; rebuild it with `make engine`"), message


@settings(max_examples=EXAMPLES, deadline=None)
@given(json_values)
def test_fuzz_any_json(document):
    _one_line_or_read(lambda: EngineManifest.from_dict(document, "d"))
    _one_line_or_read(lambda: EngineManifest.from_json(json.dumps(document), "d"))


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(valid()) if p]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), json_values | st.just("__delete__")), min_size=1, max_size=3))
def test_fuzz_a_valid_manifest_with_fields_replaced(edits):
    """The valid manifest with up to three fields replaced by arbitrary JSON or deleted: read, or one line."""
    document = copy.deepcopy(valid())
    for path, value in edits:
        parent = document
        try:
            for key in path[:-1]:
                parent = parent[key]
            if value == "__delete__":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue   # an earlier edit removed this path
    manifest = _one_line_or_read(lambda: EngineManifest.from_dict(document, "d"))
    if manifest is not None:   # read: it writes and reads back the same
        assert EngineManifest.from_json(manifest.to_json(), "d") == manifest


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.just(json.dumps(valid()).encode()[:-3]))
def test_fuzz_the_directory_reader_with_arbitrary_bytes(tmp_path, data):
    from iwp.runtime.engine_dir import read_engine
    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(ValueError) as err:   # bytes are never a whole engine (no graphs here)
        read_engine(tmp_path)
    assert "\n" not in str(err.value) and str(err.value).endswith("; rebuild it with `make engine`")
