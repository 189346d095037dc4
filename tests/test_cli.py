"""The `iwp` command line: what a user sees, and one-line errors with exit code 2."""
import json
import re

import pytest
import torch

from iwp.calibration.layer_similarity import choose_stage_layers
from iwp.tools.cli import main
from iwp.flops import describe_counts, layer_flops, prefill_flops


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_engine_builds_and_reports_kept_tokens_flops_and_answer(capsys, tmp_path):
    code, out, _ = run(capsys, "engine", "--model", "tiny-llava-ov", "--budget", "48", "--max-new-tokens", "4",
                       "--option", "queries=last", "--out", str(tmp_path))
    assert code == 0
    (engine,) = tmp_path.iterdir()
    assert re.fullmatch(r"tiny-llava-ov-iwp-b48-2x2-[0-9a-f]{8}", engine.name) and (engine / "manifest.json").is_file()
    assert f"engine    {engine} (" in out
    assert "kept      layer 2: 48/336 visual tokens" in out
    assert "tokens    per layer 336x2 48x6" in out
    assert "'queries': 'last'" in out
    assert "saved)" in out and "ONNX Runtime" in out
    code, out, err = run(capsys, "run", "--engine", str(engine), "--image", str(_png(tmp_path)),
                         "--prompt", "What is here?", "--max-new-tokens", "3", "--option", "queries=last")
    assert code == 0 and '"queries": "last"' in err          # the resolved options, on stderr beside the answer
    code, _, err = run(capsys, "run", "--engine", str(engine), "--image", str(_png(tmp_path)), "--prompt", "x",
                       "--budget", "64")
    assert code == 2 and "built for budget 48, not 64" in err
    code, _, err = run(capsys, "run", "--engine", str(engine), "--image", str(_png(tmp_path)), "--prompt", "x",
                       "--option", "lam=0.5")
    assert code == 2 and err.count("\n") == 1 and "was built with lam=0.3, not 0.5" in err
    code, _, err = run(capsys, "run", "--engine", str(engine), "--image", str(_png(tmp_path)), "--prompt", "x",
                       "--method", "fastv")
    assert code == 2 and "runs method iwp, not fastv" in err
    code, _, err = run(capsys, "run", "--engine", str(engine), "--image", str(_png(tmp_path)), "--prompt", "x",
                       "--temperature", "inf")
    assert code == 2 and "temperature must be finite" in err
    code, _, err = run(capsys, "run", "--engine", str(engine), "--image", str(_png(tmp_path)), "--prompt", "x",
                       "--temperature", "0.7", "--seed", str(2**70 + 5), "--max-new-tokens", "2")
    assert code == 0, err                                  # any seed: taken modulo 2**64, as in the C++ core


def test_a_default_engine_is_ovqa_small_answering_an_ovqa_test_question(capsys, tmp_path):
    from iwp.calibration import ovqa
    from iwp.tools.build import SMOKE_QUESTION
    example = ovqa.example("test", SMOKE_QUESTION)
    code, out, _ = run(capsys, "engine", "--max-new-tokens", "4", "--out", str(tmp_path))
    assert code == 0
    (engine,) = tmp_path.iterdir()
    assert engine.name.startswith("ovqa-small-iwp-b64-1x1-")
    assert f"question  {example.question!r} about OVQA test scene {SMOKE_QUESTION}" in out
    answer = next(line for line in out.splitlines() if line.startswith("answer"))
    assert f", expected {example.answer!r}" in answer
    code, out, _ = run(capsys, "engine", "--max-new-tokens", "4", "--prompt", "Describe the scene.", "--out", str(tmp_path))
    assert code == 0 and "expected" not in out and "question  " not in out   # a prompt of one's own: no expected answer


def test_engines_that_differ_in_any_input_get_their_own_directory(tmp_path):
    from iwp.export.engine import EngineSpec, engine_name
    base = EngineSpec("tiny-llava-ov", "iwp", 64)
    variants = [base, EngineSpec("tiny-llava-ov", "iwp", 64, options=(("lam", 0.5),)),
                EngineSpec("tiny-llava-ov", "iwp", 64, max_text_tokens=64),
                EngineSpec("tiny-llava-ov", "iwp", 64, max_new_tokens=8),
                EngineSpec("tiny-llava-ov", "iwp", 64, dtype="fp16"), EngineSpec("tiny-llava-ov", "iwp", 64, select="native"),
                EngineSpec("tiny-llava-ov", "iwp", 64, backend="tensorrt"),
                EngineSpec("tiny-llava-ov", "iwp", 64, backend="tensorrt", trt_workspace_gb=2.0),
                EngineSpec("tiny-llava-ov", "iwp", 32)]
    names = [engine_name(v, "2x2") for v in variants]
    assert len(set(names)) == len(names), names
    # the same resolved settings are the same engine, however they were spelled
    assert engine_name(EngineSpec("tiny-llava-ov", "iwp", 64, options=(("lam", 0.3),)), "2x2") == names[0]
    assert engine_name(EngineSpec("tiny-llava-ov", "iwp", 64, model_path="/elsewhere"), "2x2") == names[0]
    assert engine_name(EngineSpec("tiny-llava-ov", "iwp", 64, trt_workspace_gb=2), "2x2") == names[0]  # ORT ignores it


def _png(tmp_path):
    from iwp.demo import demo_image
    path = tmp_path / "scene.png"
    demo_image(1).save(path)
    return path


@pytest.mark.parametrize("argv, words", [
    (["--budget", "0"], "must be a positive integer"),
    (["--budget", "1.5"], "must be a positive integer"),
    (["--budget", "600"], "above the 528 visual tokens"),   # the default model, ovqa-small
    (["--method", "magic"], "unknown method 'magic'"),
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--option", "lam=2"], "lam must be in [0, 1]"),
    (["--option", "nonsense"], "name=value"),
    (["--image", "/nonexistent.png"], "does not exist"),
])
def test_engine_bad_input_is_one_line(capsys, argv, words, tmp_path):
    code, _, err = run(capsys, "engine", "--out", str(tmp_path), *argv)
    assert code == 2
    assert words in err
    assert len(err.strip().splitlines()) == 1 or "usage" in err  # argparse prints usage + one error line
    assert err.strip().splitlines()[-1].count(words) == 1


def test_compare_prints_every_method(capsys):
    code, out, _ = run(capsys, "compare", "--budget", "64", "--images", "2",
                       "--methods", "iwp,btp,transprune,fastv,dart,divprune,random")
    assert code == 0
    for name in ("iwp", "btp", "transprune", "fastv", "dart", "divprune", "random"):
        assert f"| {name} |" in out
    assert "recon error @ layer 2" in out and "KL next-token" in out


def test_calibrate_chooses_btp_layers_and_iwp_options(capsys, tmp_path):
    code, out, _ = run(capsys, "calibrate", "--model", "tiny-llava-ov", "--examples", "3", "--stages", "3",
                       "--fractions", "0.1", "--out", str(tmp_path))
    assert code == 0 and "Chosen stage layers (3 stages)" in out and "| 0.3 |" in out
    result = json.loads((tmp_path / "tiny-llava-ov-2x2" / "calibration.json").read_text())
    layers = result["defaults"]["btp"]["layers"]
    assert len(layers) == 3 and layers == sorted(set(layers))
    tried = result["iwp"]["tried"]
    assert result["defaults"]["iwp"] in [t["options"] for t in tried] and len(tried) >= 15
    assert {t["options"]["lam"] for t in tried} >= {0.0, 0.3, 1.0}
    assert "--option layers=" in out


def test_calibrate_writes_defaults_only_for_bundled_models(capsys):
    code, _, err = run(capsys, "calibrate", "--model", "tiny-llava-ov", "--write-defaults")
    assert code == 2 and "not bundled" in err


def test_layer_choice_prefers_the_earliest_within_tolerance():
    from iwp.calibration.calibrate import choose_layer
    assert choose_layer({1: 0.80, 2: 0.905, 3: 0.91}, 0.01) == 2
    assert choose_layer({1: 0.90, 2: 0.905, 3: 0.91}, 0.01) == 1
    assert choose_layer({1: 0.5, 2: 0.9, 3: 0.8}, 0.0) == 2


def test_flop_model_matches_published_llava15_figures():
    d, m, layers = 4096, 11008, 32  # LLaVA-1.5-7B
    full = prefill_flops((576,) * layers, d, m)
    fastv = prefill_flops((576,) * 2 + (288,) * (layers - 2), d, m)  # K=2, R=50%
    # TransPrune-High (arXiv 2507.20630; its eval scripts): prunes after layers 7, 9 and 12 to 7/8, 5/8 and 1/8
    # of the 576 tokens, i.e. 504, 360 and 72 from 0-indexed layers 7, 9 and 12 on
    transprune_high = prefill_flops((576,) * 7 + (504,) * 2 + (360,) * 3 + (72,) * 20, d, m)
    assert round(full / 1e12, 2) == 3.82
    assert round(fastv / 1e12, 2) == 2.01
    assert round(transprune_high / 1e12, 2) == 1.56
    assert layer_flops(0, d, m) == 0
    assert describe_counts((5, 5, 3)) == "5x2 3x1"


def test_stage_layers_follow_the_change_profile():
    change = torch.tensor([0.5, 0.4, 0.05, 0.05, 0.05, 0.3, 0.01, 0.01])
    layers = choose_stage_layers(change, 3)
    assert layers == tuple(sorted(set(layers))) and len(layers) == 3
    assert all(1 <= layer < 8 for layer in layers)
    flat = choose_stage_layers(torch.full((8,), 0.1), 3)
    assert flat == (2, 4, 6)  # equal quantiles of a uniform profile
    with pytest.raises(ValueError, match="n_stages"):
        choose_stage_layers(change, 8)


def test_ablate_times_real_selections(capsys):
    code, out, _ = run(capsys, "ablate", "--budget", "32", "--images", "1")
    assert code == 0
    default = next(line for line in out.splitlines() if line.startswith("| default |"))
    assert float(default.strip("| ").split("|")[-1]) > 0  # select ms: the recorded views were timed


def test_the_readmes_engine_names_are_the_ones_a_default_build_gets():
    from pathlib import Path
    from iwp.export.engine import EngineSpec, engine_name
    from iwp.tools.options import method_options
    from iwp.zoo import get_spec
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    calibrated = tuple(sorted(method_options(get_spec("ovqa-small"), "iwp", {}).items()))   # as `make engine` does
    assert f"engines/{engine_name(EngineSpec('ovqa-small', 'iwp', 64, options=calibrated), '1x1')} " in readme
    assert f"engines/{engine_name(EngineSpec('tiny-llava-ov', 'iwp', 64), '2x2')} " in readme
    assert f"engines/{engine_name(EngineSpec('tiny-llava-ov', 'none'), '2x2')}" in readme
