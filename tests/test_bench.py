"""`iwp bench`: one prefill graph per method x budget, timed against unpruned in the same run."""
import json

from iwp.tools.bench import run


def test_bench_measures_every_setting_against_unpruned(tmp_path):
    report = run("tiny-llava-ov", methods=("none", "iwp", "btp"), budgets=(8, 64, 400), repeats=1, warmup=0,
                 random_weights=False, out=tmp_path, progress=lambda _: None)
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("none", 336), ("iwp", 8), ("iwp", 64), ("btp", 8), ("btp", 64)}  # 400 > N is left out
    assert rows[("none", 336)]["speedup"] == 1.0 and rows[("none", 336)]["ideal_speedup"] == 1.0
    assert "below" in rows[("btp", 8)]["note"]
    iwp = rows[("iwp", 64)]
    assert iwp["ideal_speedup"] > 1 and iwp["speedup"] > 0 and iwp["selection_median_ms"] > 0
    assert iwp["measured_over_ideal"] == iwp["speedup"] / iwp["ideal_speedup"]
    assert iwp["ideal_speedup_with_text"] < iwp["ideal_speedup"]   # the padded text slots cost FLOPs too
    out = tmp_path / "tiny-llava-ov-2x2-onnxruntime"
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    assert json.loads((out / "bench.json").read_text())["rows"][0]["method"] == "none"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]   # each graph is deleted after timing


def test_torch_backend_times_the_pytorch_prefill(tmp_path):
    report = run("tiny-llava-ov", methods=("none", "iwp", "fastv"), budgets=(32,), repeats=2, warmup=1,
                 random_weights=False, out=tmp_path, progress=lambda _: None, backend="torch", dtype="bf16")
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("none", 336), ("iwp", 32), ("fastv", 32)}
    assert "torch bf16 on cpu (selection: reference)" == report["backend"]
    assert rows[("iwp", 32)]["selection_median_ms"] > 0 and len(rows[("iwp", 32)]["prefill_ms"]) == 2
    assert (tmp_path / "tiny-llava-ov-2x2-torch" / "bench.png").is_file()


def test_bench_refuses_bad_settings(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="backend 'tensorrt'"):
        run("tiny-llava-ov", backend="tensorrt", out=tmp_path)
    with pytest.raises(ValueError, match="onnxruntime benches fp32"):
        run("tiny-llava-ov", dtype="bf16", out=tmp_path)
