"""TensorRT engine builds: what can be checked without TensorRT (backend choice, version checks, profiles,
the error a user gets), plus the plan build itself where TensorRT is installed."""
import re

import onnx
import pytest
from onnx import TensorProto, helper

from iwp.tools.cli import main
from iwp.export import tensorrt as trt_build
from iwp.export.engine import EngineSpec, engine_name

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


def _identity(shape):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, shape)
    y = helper.make_tensor_value_info("out", TensorProto.INT64, shape)
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g", [x], [y]))


def test_profiles_cover_only_the_free_token_dimension():
    assert trt_build.profile_shapes(_identity([1, "tokens"]), 464) == {"input_ids": ((1, 1), (1, 464), (1, 464))}
    assert trt_build.profile_shapes(_identity([1, 464]), 464) == {}


def test_profiles_of_a_real_engine(tmp_path):
    """The exported graphs: only embed has a free dimension (1 for a decode step up to the prompt)."""
    from iwp.export.engine import build
    directory = build(EngineSpec("tiny-llava-ov", "iwp", 48, max_new_tokens=2), tmp_path, progress=lambda _: None)
    from iwp.engine_format import EngineManifest
    length = EngineManifest.read(directory).shapes.max_prompt
    shapes = {name: trt_build.profile_shapes(onnx.load(directory / f"{name}.onnx", load_external_data=False), length)
              for name in ("embed", "vision", "prefill", "decode")}
    assert shapes == {"embed": {"input_ids": ((1, 1), (1, length), (1, length))}, "vision": {}, "prefill": {},
                      "decode": {}}
    # TensorRT plugins take no bool tensors: the node's masks arrive as int32 casts
    graph = onnx.load(directory / "prefill.onnx", load_external_data=False).graph
    node = next(n for n in graph.node if n.op_type == "VisualTokenSelect")
    producers = {out: n for n in graph.node for out in n.output}
    for index in (6, 9):   # key_mask, query_mask
        cast = producers[node.input[index]]
        assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.INT32


@pytest.mark.skipif(trt_build.unavailable_reason() is not None, reason="TensorRT is not installed")
def test_tensorrt_engine_builds_and_matches_onnxruntime(tmp_path):
    from iwp.export.engine import build
    for dtype in ("fp32", "fp16"):
        directory = build(EngineSpec("tiny-llava-ov", "iwp", 48, max_new_tokens=2, dtype=dtype, backend="tensorrt"),
                          tmp_path)
        assert all((directory / f"{g}.plan").is_file() for g in ("embed", "vision", "prefill", "decode"))
        from iwp.tools.compare_trt import compare
        assert all(compare(directory).values())
