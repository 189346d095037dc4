"""`iwp profile`: per-stage timings with spread, memory, FLOP-ideal ratio against an unpruned baseline, the
three report files written all-or-nothing, and tegrastats sampling where present."""
import json
import os
import stat

import pytest

from iwp.tools import profile
from iwp.tools.cli import main
from iwp.export.engine import EngineSpec, build


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    quiet = dict(progress=lambda _: None)
    pruned = build(EngineSpec("tiny-llava-ov", "iwp", 48, max_text_tokens=64, max_new_tokens=6), root, **quiet)
    unpruned = build(EngineSpec("tiny-llava-ov", "none", None, max_text_tokens=64, max_new_tokens=6), root, **quiet)
    return pruned, unpruned


def test_profile_reports_stages_memory_and_the_flop_ideal_ratio(engines, tmp_path, capsys):
    pruned, unpruned = engines
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--engine", str(pruned), "--baseline", str(unpruned), "--repeats", "2",
              "--new-tokens", "4", "--out", str(tmp_path)])
        raise SystemExit(0)
    assert exit_info.value.code == 0
    out = tmp_path / pruned.name
    report = json.loads((out / "profile.json").read_text())
    for stage in profile.STAGES:
        s = report["stages"][stage]
        assert s["min_ms"] <= s["p25_ms"] <= s["median_ms"] <= s["p75_ms"] <= s["max_ms"] and s["min_ms"] > 0
    assert report["stages"]["decode_per_token"]["n"] == 2 * 3        # 4 tokens: 3 decode steps per run
    assert report["stages"]["selection"]["median_ms"] < report["stages"]["prefill"]["median_ms"]
    assert report["memory"]["kv_set_bytes"] < report["memory"]["kv_set_bytes_unpruned"]
    assert report["memory"]["peak_rss_mb"] > 0
    assert report["flops"]["ideal_speedup"] == pytest.approx(report["flops"]["prefill_visual_unpruned"]
                                                             / report["flops"]["prefill_visual"])
    speedup = report["speedup"]
    assert speedup["measured_over_ideal"] == pytest.approx(speedup["prefill_speedup"] / speedup["flop_ideal_speedup"])
    assert 0 < speedup["selection_share_of_prefill"] < 1
    assert report["baseline_report"]["method"] == "none" and report["baseline_report"]["stages"]["selection"] is None
    assert "| prefill |" in (out / "profile.md").read_text()
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FLOP-ideal" in capsys.readouterr().out


def test_baseline_must_be_unpruned(engines):
    pruned, _ = engines
    report = profile.profile_engine(pruned, repeats=1, warmup=0, new_tokens=2, progress=lambda _: None)
    with pytest.raises(ValueError, match="baseline must be an unpruned engine"):
        profile.compare_to_baseline(report, report)
    with pytest.raises(ValueError, match="exceeds this engine's 6"):
        profile.profile_engine(pruned, new_tokens=7, progress=lambda _: None)


def test_interrupted_report_leaves_nothing(engines, tmp_path, monkeypatch):
    pruned, _ = engines
    report = profile.profile_engine(pruned, repeats=1, warmup=0, new_tokens=2, progress=lambda _: None)

    def killed(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(profile, "plot", killed)
    with pytest.raises(KeyboardInterrupt):
        profile.write_report(report, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []                              # no report, no staging directory


def test_tegrastats_is_sampled_when_present(engines, tmp_path, monkeypatch):
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\nwhile true; do echo 'RAM 2100/30000MB EMC_FREQ 12% GR3D_FREQ 40% VDD_IN 5200mW'; "
                    "sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with profile.Tegrastats(interval_ms=50) as tegra:
        profile.profile_engine(engines[0], repeats=1, warmup=0, new_tokens=2, progress=lambda _: None)
    summary = tegra.summary()
    assert summary["samples"] >= 1 and summary["gpu_load_pct"]["max"] == 40 and summary["power_in_mw"]["mean"] == 5200


def test_soak_samples_memory_over_generations(engines):
    from iwp.tools import soak
    result = soak.run(engines[0], generations=10, new_tokens=3, every=5, warmup=2, progress=lambda _: None)
    assert [done for done, _ in result["rss_mb"]] == [0, 5, 10]
    assert result["growth_mb"] == result["rss_mb"][-1][1] - result["rss_mb"][0][1]
