"""iwp/engine_format.py: the typed manifest round-trips, finds tensors by role, and any JSON (or any bytes)
is either read or refused with the one-line rebuild error, never another exception."""
import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iwp.engine_format import FORMAT, EngineManifest, TensorSpec

EXAMPLES = int(os.environ.get("IWP_HYPOTHESIS_EXAMPLES", "200"))  # deeper searches: IWP_HYPOTHESIS_EXAMPLES=5000


def _tensor(name, role, shape=(1, 4), dtype="float32", **extra):
    return {"name": name, "shape": list(shape), "dtype": dtype, "role": role, **extra}


def valid(n_layers: int = 2) -> dict:
    """A small, complete format-4 manifest as the exporter writes it: embed, vision, segment.0 (layer 0), a
    selection at layer 1, segment.1 (layer 1). Names are arbitrary: a runtime binds by role."""
    def caches(kind, layers):
        return [_tensor(f"{kind}{l}{r}", r, (1, 2, 9, 4), "bool" if r == "valid" else "float32", layer=l)
                for l in layers for r in ("key", "value", "valid")]
    hidden = [_tensor("h", "hidden", (1, "tokens", 8)), _tensor("p", "positions", (1, "tokens"), "int64")]
    graphs = [{"name": "embed", "kind": "embed"}, {"name": "vision", "kind": "vision"},
              {"name": "segment.0", "kind": "segment", "layers": [0, 1]},
              {"name": "select.0", "kind": "select", "stage": 0, "layer": 1},
              {"name": "segment.1", "kind": "segment", "layers": [1, n_layers]}]
    return {
        "format": FORMAT, "inputs_hash": "abc",
        "model": {"name": "m", "hf_id": None, "source": "seed:0", "grid": "2x2", "resolution": [64, 64], "n_visual": 4,
                  "n_layers": n_layers, "hidden_size": 8, "n_kv_heads": 2, "head_dim": 4, "vocab_size": 11},
        "method": {"name": "iwp", "budget": 2, "config": {"lam": 0.3}, "stages": [[1, 2]],
                   "nodes": [{"method": "iwp"}], "tokens_per_layer": [4] + [2] * (n_layers - 1),
                   "options": {"lam": 0.3}},
        "flops": {"formula": "f", "unpruned": 10, "pruned": 5.0, "ratio": 0.5},
        "shapes": {"batch": 1, "max_prompt": 8, "max_text_tokens": 4, "max_new_tokens": 2,
                   "cache_len": [10] * n_layers},
        "dtype": "fp32", "select": "plugin", "backend": "onnxruntime", "tensorrt": None,
        "tokens": {"image": 5, "eos": 1, "pad": 0}, "tools": {"iwp": "0.1"},
        "files": {**{f"{g['name']}.onnx": "0" * 64 for g in graphs}, "token_table.bin": "0" * 64},
        "spec": {"model": "m", "options": [["lam", 0.3]]},
        "graphs": graphs,
        "token_table": {"file": "token_table.bin", "shape": [11, 8], "dtype": "float32", "tied": True},
        "weights": {"distinct_bytes": 100, "stored_bytes": 104,
                    "copies": [{"graph": "select.0", "what": "layer 1 q/k/v", "bytes": 4}]},
        "build": {"seconds": 12.5, "peak_rss_bytes": {"export": 1 << 30}},
        "io": {
            "embed": {"inputs": [_tensor("ids", "token_ids", (1, "tokens"), "int64"),
                                 _tensor("table", "token_table", (11, 8))],
                      "outputs": [_tensor("emb", "embeddings", (1, "tokens", 8))]},
            "vision": {"inputs": [_tensor("px", "pixels", (1, 5, 3, 8, 8))], "outputs": [_tensor("f", "features")]},
            "segment.0": {"inputs": hidden + [_tensor("o", "offset", (), "int64")] + caches("past", [0]),
                          "outputs": [_tensor("nh", "hidden", (1, "tokens", 8))] + caches("pres", [0])},
            "select.0": {"inputs": hidden + [_tensor(r, r, (1, 4), "int64") for r in
                                             ("visual_start", "query_idx", "query_mask", "last_idx")],
                         "outputs": [_tensor("k0", "kept", (1, 2), "int64", stage=0),
                                     _tensor("kh", "hidden", (1, "tokens - 2", 8))]},
            "segment.1": {"inputs": hidden + [_tensor("o", "offset", (), "int64"), _tensor("t", "token_table", (11, 8))]
                          + caches("past", range(1, n_layers)),
                          "outputs": [_tensor("lg", "logits", (1, 11))] + caches("pres", range(1, n_layers))},
        },
    }


def test_round_trip_and_find_by_role():
    m = EngineManifest.from_dict(valid(3), "d")
    assert EngineManifest.from_json(m.to_json(), "d") == m
    assert json.loads(m.to_json()) == valid(3)                         # written exactly as the exporter's dict
    assert m.find("embed", "inputs", "token_ids") == TensorSpec("ids", (1, "tokens"), "int64", "token_ids")
    assert m.find("select.0", "outputs", "kept", stage=0).name == "k0"
    assert [t.name for t in m.caches("segment.1", "inputs")] == [f"past{l}{r}" for l in (1, 2)
                                                                  for r in ("key", "value", "valid")]
    assert [g.name for g in m.segments()] == ["segment.0", "segment.1"] and m.selects()[0].layer == 1
    assert m.segment_prefill_len(m.segments()[1], 7) == 7 - 4 + 2 and m.segment_prefill_len(m.segments()[0], 7) == 7
    assert m.model.resolution == (64, 64) and m.method.stages == ((1, 2),) and m.shapes.cache_len == (10, 10, 10)
    assert m.token_table.tied and m.weights.copies[0].graph == "select.0"
    with pytest.raises(ValueError, match=r"^engine d: segment.0 has no key \(layer 2\) input; rebuild it with `make engine`$"):
        m.find("segment.0", "inputs", "key", layer=2)


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
    ({"format": 4, "files": {}}, "field inputs_hash is missing"),
    ({"format": 3, "files": {}}, "manifest format 3 is not this iwp's format 4"),     # the prefill/decode layout
    ({"format": "4"}, "manifest format \"4\" is not this iwp's format 4"),
    (_with(lambda d: d["model"].update(n_layers="2")), "field model.n_layers is a string, not an integer"),
    (_with(lambda d: d["model"].update(n_layers=True)), "field model.n_layers is a boolean, not an integer"),
    (_with(lambda d: d["model"].update(n_layers=0)), "model.n_layers is 0"),
    (_with(lambda d: d["shapes"].update(cache_len=[10])), "shapes.cache_len has 1 layers, not model.n_layers 2"),
    (_with(lambda d: d["method"].update(stages=[[1, 2, 3]])), "field method.stages[0] has 3 elements, not 2"),
    (_with(lambda d: d["io"].pop("vision")), "field io.vision is missing"),
    (_with(lambda d: d["io"]["segment.0"]["inputs"][4].update(layer=7)),
     'io["segment.0"].inputs[4].layer is 7, not in [0, 1]'),
    (_with(lambda d: d["io"]["segment.0"]["inputs"][4].pop("layer")), 'io["segment.0"].inputs[4].layer is missing'),
    (_with(lambda d: d["io"]["segment.0"]["inputs"][0].update(role="token_ids")),
     'io["segment.0"].inputs[0].role is "token_ids", not one of hidden'),   # roles are checked by graph kind
    (_with(lambda d: d["io"].pop("select.0")), 'field io["select.0"] is missing'),
    (_with(lambda d: d["graphs"].pop(3)), "graphs[3] is a segment after a segment"),
    (_with(lambda d: d["graphs"][4].update(layers=[1, 5])), "graphs[4].layers is [1, 5], not a range of layers from 1"),
    (_with(lambda d: d["graphs"][3].update(layer=0)), "graphs[3] is not stage 0 at layer 1"),
    (_with(lambda d: d["graphs"].insert(0, d["graphs"].pop(1))), "does not start with the embed and vision graphs"),
    (_with(lambda d: d["graphs"][2].update(kind="encoder")), "graphs[2].kind is \"encoder\""),
    (_with(lambda d: d["graphs"].__setitem__(slice(3, 5), [])), "graphs' segments end at layer 1, not model.n_layers 2"),
    (_with(lambda d: d["token_table"].update(shape=[8, 11])), "token_table.shape is [8, 11], not [model.vocab_size"),
    (_with(lambda d: d["files"].pop("token_table.bin")), "files records no token table \"token_table.bin\""),
    (_with(lambda d: d["weights"].pop("copies")), "field weights.copies is missing"),
    (_with(lambda d: d["io"]["embed"]["inputs"][0].update(role="pixels")), "io.embed.inputs[0].role is \"pixels\""),
    (_with(lambda d: d["io"]["embed"]["inputs"][0].update(dtype="float64")), "io.embed.inputs[0].dtype"),
    (_with(lambda d: d["io"]["embed"]["inputs"][0].update(shape=[1, 2.5])),
     "io.embed.inputs[0].shape[1] is a number, not an integer or a string"),
    (_with(lambda d: d["io"]["select.0"]["outputs"][0].update(layer=0)), "layer is set, but role kept takes no layer"),
    (_with(lambda d: d["io"]["segment.1"]["outputs"].append(d["io"]["segment.1"]["outputs"][1])), "repeats role key"),
    (_with(lambda d: d["files"].update({"../../etc/passwd": "0"})), "not a file name in the engine directory"),
    (_with(lambda d: d["files"].pop("segment.1.onnx")), "files records no segment.1.onnx"),
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
