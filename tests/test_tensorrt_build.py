"""TensorRT engine builds: what can be checked without TensorRT (backend choice, version checks, profiles,
the error a user gets), plus the plan build itself where TensorRT is installed."""
import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from iwp.engine_format import EngineManifest, GraphInfo
from iwp.export import tensorrt as trt_build
from iwp.export.engine import EngineSpec, engine_name
from iwp.tools.cli import main

no_tensorrt = pytest.mark.skipif(trt_build.unavailable_reason() is None, reason="TensorRT is installed here")


@no_tensorrt
def test_backend_choice_without_tensorrt():
    said = []
    assert trt_build.resolve_backend("onnxruntime") == "onnxruntime"
    assert trt_build.resolve_backend("auto", say=said.append) == "onnxruntime"
    assert "BACKEND=auto: TensorRT is not available" in said[0]
    with pytest.raises(ValueError, match="BACKEND=tensorrt needs TensorRT.*or use BACKEND=onnxruntime"):
        trt_build.resolve_backend("tensorrt")
    with pytest.raises(ValueError, match="BACKEND=tvm is not one of"):
        trt_build.resolve_backend("tvm")


@no_tensorrt
def test_engine_with_tensorrt_backend_fails_in_one_line_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["engine", "--model", "tiny-llava-ov", "--backend", "tensorrt", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "BACKEND=tensorrt needs TensorRT" in err
    assert not any(tmp_path.iterdir())


def test_spec_and_directory_name_carry_the_backend():
    assert re.fullmatch(r"m-iwp-b64-2x2-trt-[0-9a-f]{8}", engine_name(EngineSpec("m", "iwp", 64, backend="tensorrt"), "2x2"))
    assert re.fullmatch(r"m-iwp-b64-2x2-[0-9a-f]{8}", engine_name(EngineSpec("m", "iwp", 64), "2x2"))
    with pytest.raises(ValueError, match="BACKEND=auto is not one of onnxruntime, tensorrt"):
        EngineSpec("m", "iwp", 64, backend="auto")


def test_plugin_version_checks():
    info = "VisualTokenSelect 1 iwp; TensorRT 10.3.0; kernel ABI 1"
    assert trt_build.built_for(info) == "10.3.0"
    with pytest.raises(ValueError, match="describes itself as"):
        trt_build.built_for("something else")
    trt_build.check_plugin_version("10.3.0", "10.8.1")           # same major: the plugin ABI holds
    with pytest.raises(ValueError, match="built for TensorRT 10.3.0 but TensorRT 11.1.0 is installed; rebuild"):
        trt_build.check_plugin_version("10.3.0", "11.1.0", "libiwp_trt_plugins.so")


def test_plans_of_another_tensorrt_are_refused():
    from iwp.engine_format import TensorRTInfo
    entry = TensorRTInfo("10.3.0", "VisualTokenSelect 1 iwp; TensorRT 10.3.0", "lib.so", True, {})
    with pytest.raises(ValueError, match="no TensorRT plans"):
        trt_build.check_plans(None, "10.3.0")
    with pytest.raises(ValueError, match="built with TensorRT 10.3.0 but 10.4.0 is installed"):
        trt_build.check_plans(entry, "10.4.0")
    trt_build.check_plans(entry, "10.3.0")


def test_strongly_typed_flag_only_below_tensorrt_11():
    assert trt_build.strongly_typed_flag("10.3.0") and trt_build.strongly_typed_flag("10.16.1")
    assert not trt_build.strongly_typed_flag("11.0.0") and not trt_build.strongly_typed_flag("11.1.0")


def test_workspace_cap_is_an_engine_option(tmp_path, capsys):
    class FakeTrt:
        class MemoryPoolType:
            WORKSPACE = "workspace"
    assert trt_build.workspace_limit(FakeTrt, None) is None
    assert trt_build.workspace_limit(FakeTrt, EngineSpec("m", "iwp", 64, trt_workspace_gb=1.5).trt_workspace_gb) == {
        "workspace": 3 << 29}
    for bad in (0, -1.0, float("inf"), float("nan"), "2", True):
        with pytest.raises(ValueError, match="--trt-workspace-gb .* must be a positive number of GiB"):
            EngineSpec("m", "iwp", 64, trt_workspace_gb=bad)
    for flag in ("0", "-2", "inf", "lots"):   # the flag: one line, exit 2, before any work
        with pytest.raises(SystemExit) as exit_info:
            main(["engine", "--model", "tiny-llava-ov", "--trt-workspace-gb", flag, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert "--trt-workspace-gb" in err.strip().splitlines()[-1], err   # argparse's usage lines, then one error
    assert not any(tmp_path.iterdir())


def _identity(shape, name="input_ids"):
    x = helper.make_tensor_value_info(name, TensorProto.INT64, shape)
    y = helper.make_tensor_value_info("out", TensorProto.INT64, shape)
    return helper.make_model(helper.make_graph([helper.make_node("Identity", [name], ["out"])], "g", [x], [y]))


LIMITS = trt_build.Limits(max_prompt=464, n_visual=336, tokens_per_layer=(336, 336, 64, 64))


def test_profiles_put_t_for_the_tokens_dimension_only():
    embed, segment = GraphInfo("embed", "embed"), GraphInfo("segment.1", "segment", layers=(2, 4))
    assert trt_build.profiles(_identity([1, "tokens"]), embed, LIMITS) == ({"input_ids": ((1, 1), (1, 464), (1, 464))},)
    assert trt_build.profiles(_identity([1, "tokens", 8], "hidden"), segment, LIMITS) == (
        {"hidden": ((1, 1, 8), (1, 192, 8), (1, 192, 8))},          # prefill: 128 text + 64 visual tokens at most
        {"hidden": ((1, 1, 8), (1, 1, 8), (1, 1, 8))})              # decode: one token
    assert trt_build.profiles(_identity([1, 464]), embed, LIMITS) == ()   # static: no profile
    with pytest.raises(ValueError, match="embed.onnx input input_ids has dimension 'batch', not 'tokens'.*make engine"):
        trt_build.profiles(_identity(["batch", "tokens"]), embed, LIMITS)
    with pytest.raises(ValueError, match="vision.onnx has dynamic inputs \\(input_ids\\) but a vision graph is static"):
        trt_build.profiles(_identity([1, "tokens"]), GraphInfo("vision", "vision"), LIMITS)


def test_select_ranges_follow_the_tokens_alive_at_its_stage():
    at_zero = GraphInfo("select.0", "select", stage=0, layer=0)
    later = GraphInfo("select.1", "select", stage=1, layer=2)
    assert trt_build.token_ranges(at_zero, LIMITS) == ((337, 464, 464),)   # every visual token and one text token
    assert trt_build.token_ranges(later, LIMITS) == ((337, 464, 464),)     # layer 1 still has all 336
    assert trt_build.token_ranges(GraphInfo("select.1", "select", stage=1, layer=3), LIMITS) == ((65, 192, 192),)


@pytest.fixture(scope="module", params=[("iwp", 48), ("divprune", 48), ("none", None)], ids=["iwp", "divprune", "none"])
def engine(request, tmp_path_factory):
    from iwp.export.engine import build
    method, budget = request.param
    directory = build(EngineSpec("tiny-llava-ov", method, budget, max_new_tokens=2), tmp_path_factory.mktemp(method),
                      progress=lambda _: None)
    return EngineManifest.read(directory)


def test_profiles_of_a_real_engine(engine):
    """Each graph's profiles, derived from its .onnx: embed one range, vision none, a segment its prefill
    (profile 0) and one decode token (profile 1), a select its stage's prompt; caches and the token table static."""
    m, directory = engine, Path(engine.directory)
    limits = trt_build.Limits(m.shapes.max_prompt, m.model.n_visual, m.method.tokens_per_layer)
    prompt, d = m.shapes.max_prompt, m.model.hidden_size
    shapes = {g.name: trt_build.plan_profiles(directory, g, limits) for g in m.graphs}
    ids = m.find("embed", "inputs", "token_ids").name
    assert shapes["embed"] == ({ids: ((1, 1), (1, prompt), (1, prompt))},)
    assert shapes["vision"] == ()
    for segment in m.segments():
        most = m.segment_prefill_len(segment, prompt)   # the runtime's own count of the prefill's tokens
        hidden = m.find(segment.name, "inputs", "hidden").name
        positions = m.find(segment.name, "inputs", "positions").name
        assert shapes[segment.name] == (
            {hidden: ((1, 1, d), (1, most, d), (1, most, d)), positions: ((1, 1), (1, most), (1, most))},
            {hidden: ((1, 1, d),) * 3, positions: ((1, 1),) * 3})
        for cache in m.caches(segment.name, "inputs"):   # fixed capacity, written at `offset`: no range
            slots = cache.shape[-1 if cache.role == "valid" else -2]
            assert cache.static_shape and slots == m.shapes.cache_len[cache.layer]
    for select in m.selects():
        alive = m.model.n_visual if select.stage == 0 else m.method.stages[select.stage - 1][1]
        most = prompt - m.model.n_visual + alive
        hidden = m.find(select.name, "inputs", "hidden").name
        assert shapes[select.name][0][hidden] == ((1, alive + 1, d), (1, most, d), (1, most, d))
        assert len(shapes[select.name]) == 1
    table = m.find("embed", "inputs", "token_table")   # an input of the plan, never baked into it
    assert table.static_shape and all(table.name not in p for profile in shapes.values() for p in profile)
    if m.method.name == "divprune":   # a stage at layer 0 runs before the first segment
        assert [g.kind for g in m.graphs] == ["embed", "vision", "select", "segment"]
    # what build_plans records is what the manifest reader takes
    plans = {g.name: {"file": f"{g.name}.plan", "profiles": trt_build.plan_entry(shapes[g.name])} for g in m.graphs}
    document = m.to_dict()
    document.update(backend="tensorrt", tensorrt={"version": "10.3.0", "plugin": "p", "plugin_library": "l",
                                                  "strongly_typed_flag": True, "plans": plans})
    typed = EngineManifest.from_dict(document, directory)
    assert {name: plan.profiles for name, plan in typed.tensorrt.plans.items()} == shapes
    assert [len(p) for p in trt_build.polygraphy_profiles(shapes[m.segments()[0].name])] == [2, 2]


def test_select_masks_reach_the_plugin_as_int32(engine):
    """TensorRT plugins take no bool tensors: the node's masks arrive as int32 casts."""
    for select in engine.selects():
        graph = onnx.load(Path(engine.directory) / f"{select.name}.onnx", load_external_data=False).graph
        node = next(n for n in graph.node if n.op_type == "VisualTokenSelect")
        producers = {out: n for n in graph.node for out in n.output}
        for index in (6, 9):   # key_mask, query_mask
            cast = producers[node.input[index]]
            assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.INT32


@no_tensorrt
def test_plan_build_without_tensorrt_is_one_plain_line(tmp_path):
    with pytest.raises(ValueError) as error:
        trt_build.build_plans(tmp_path, [GraphInfo("embed", "embed")], {"max_prompt": 8, "n_visual": 4,
                                                                         "tokens_per_layer": [4]})
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("BACKEND=tensorrt needs TensorRT")
    assert str(error.value).endswith("or use BACKEND=onnxruntime")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(trt_build.unavailable_reason() is not None,
                    reason=f"TensorRT is not installed here ({trt_build.unavailable_reason()})")
def test_tensorrt_engine_builds_and_matches_onnxruntime(tmp_path):
    from iwp.export.engine import build
    from iwp.tools.compare_trt import compare
    for dtype in ("fp32", "fp16"):
        directory = build(EngineSpec("tiny-llava-ov", "iwp", 48, max_new_tokens=2, dtype=dtype, backend="tensorrt"),
                          tmp_path)
        m = EngineManifest.read(directory)
        assert sorted(m.tensorrt.plans) == sorted(g.name for g in m.graphs)
        assert all((directory / plan.file).is_file() for plan in m.tensorrt.plans.values())
        assert all(compare(directory).values())
