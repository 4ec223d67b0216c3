"""The ``ds4sci`` command as a user runs it."""

import json
import math
import subprocess
import sys

import pytest


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ds4sci.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_info_lists_backends_and_reasons():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    assert "evoformer_attention" in proc.stdout
    assert "torch      available" in proc.stdout
    assert "auto on cpu/float32 -> torch" in proc.stdout


def test_unknown_command_fails_with_usage():
    proc = _run("frobnicate")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


@pytest.mark.subprocess
def test_bench_quick_writes_results(tmp_path):
    proc = _run("bench", "evoformer-attention", "--quick", "--dtypes", "float32", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "evoformer_attention_quick.json").read_text())
    assert data["machine"]["torch"] and data["machine"]["date"]
    rows = data["results"]
    assert {r["contender"] for r in rows} == {"ds4sci", "naive", "sdpa"}
    assert all(r["status"] == "ok" and r["peak_bytes"] >= 0 for r in rows)
    assert (tmp_path / "evoformer_attention_quick.csv").stat().st_size > 0
    assert (tmp_path / "evoformer_attention_quick.png").stat().st_size > 0


@pytest.mark.subprocess
def test_bench_genslm_memory_quick_writes_fit(tmp_path):
    pytest.importorskip("transformers")
    proc = _run("bench", "genslm-memory", "--quick", "--contenders", "ds4sci", "hf-sdpa", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "genslm_memory_quick.json").read_text())
    assert {r["contender"] for r in data["results"]} == {"ds4sci", "hf-sdpa"}
    assert all(r["status"] == "ok" for r in data["results"])
    fit = data["machine"]["fits"]["ds4sci"]
    # A smoke test of the pipeline: at the quick run's tiny lengths allocator noise can tilt the
    # fitted slope either way, so only check that a fit was made (the physics is in the real run).
    assert all(math.isfinite(fit[k]) for k in ("a", "b", "c"))
    assert (tmp_path / "genslm_memory_quick.png").stat().st_size > 0


def test_bench_evoformer_block_extrapolates_a_contender_that_ran_out(monkeypatch, tmp_path):
    """A naive step that does not fit: its peak is fitted over shallower MSAs and the ratio to
    ours is taken against that prediction, marked as extrapolated."""
    from ds4sci.bench import evoformer_block as bench

    depths = []

    def fake_worker(module, args, timeout, env=None):
        contender = args[1]
        depth = int(args[args.index("--depth") + 1]) if "--depth" in args else 240
        depths.append((contender, depth))
        if contender == "naive" and depth == 240:
            return {"status": "oom", "error": "can't allocate"}
        slope = 1000 if contender == "naive" else 100
        return {"status": "ok", "peak_bytes": 5000 + slope * depth, "time_s": 1.0, "steps": 1}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    monkeypatch.setattr(bench, "plot", lambda rows, path, meta: path)
    configs = {"deep": ("openfold-initial-training", 16, 240, 240, 1)}
    rows = bench.run(configs, ["extra_msa"], ["float32"], tmp_path, "t", quick=False, update=False,
                     contenders=("ds4sci", "naive"), progress=lambda *_: None)
    naive = next(r for r in rows if r["contender"] == "naive")
    ours = next(r for r in rows if r["contender"] == "ds4sci")
    assert naive["status"] == "oom"
    assert sorted(d for c, d in depths if c == "naive") == [12, 24, 48, 240]
    assert naive["predicted_peak_bytes"] == pytest.approx(5000 + 1000 * 240)
    assert naive["fit"]["max_relative_residual"] < 1e-9
    assert ours["naive_peak_over_ours"] == pytest.approx((5000 + 1000 * 240) / (5000 + 100 * 240))
    assert ours["naive_peak_extrapolated"] is True


def test_bench_help_reaches_the_benchmarks_own_options(capsys):
    from ds4sci.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "genslm-init", "--help"])
    assert exit_info.value.code == 0 and "--quick" in capsys.readouterr().out
    assert main(["bench"]) == 0 and "genslm-init" in capsys.readouterr().out


def test_bench_climax_memory_fit_recovers_the_memory_model(tmp_path):
    """The fit behind the projected rows: peaks exactly a_w + b_w L + c F (F: field values per
    process) over two widths give back a, b, c, the longest sequence in the budget at p=2 and its
    ratio to one process, and predict the held-out resolution; OOM rows are left out."""
    from ds4sci.bench.climax_memory import fit_rows

    c, gib = 30.0, 2**30
    ab = {64: (2.0 * gib, 40_000.0), 256: (1.0 * gib, 9_000.0)}
    cases = [("5.625deg-p2", 512, 2), ("1.40625deg-p4", 2048, 4), ("1.40625deg-p2", 8192, 2),
             ("0.25deg-p8", 16_200, 8), ("0.25deg-p4", 64_800, 4)]
    rows = [{"contender": "ours", "processes": p, "width": w, "depth": 2, "resolution": res, "tokens": n,
             "status": "ok", "peak_bytes": ab[w][0] / p + ab[w][1] / p * n + c * n * q * q * 48 / p,
             "time_s": 1e-3 * n} for p in (1, 4) for w in ab for res, n, q in cases]
    rows.append({"contender": "ours", "processes": 1, "width": 64, "depth": 2, "resolution": "0.25deg-p2",
                 "tokens": 259_200, "status": "oom"})
    fits = {(f["processes"], f["width"]): f for f in fit_rows(rows, budget_gib=20.0)}
    one, four = fits[1, 64], fits[4, 64]
    assert one["a_bytes"] == pytest.approx(2 * gib) and one["b_bytes_per_token"] == pytest.approx(40_000)
    assert one["c_bytes_per_field_value"] == pytest.approx(c) and fits[4, 256]["c_bytes_per_field_value"] == pytest.approx(c)
    assert one["max_tokens_in_budget_p2"] == pytest.approx((20 * gib - 2 * gib) / (40_000 + c * 4 * 48))
    assert four["max_tokens_vs_one_process"] == pytest.approx(
        (20 * gib - gib / 2) / (10_000 + c * 4 * 48 / 4) / one["max_tokens_in_budget_p2"])
    held = one["holdout"]
    assert held["resolution"] == "0.25deg-p4" and held["predicted_gib"] == pytest.approx(held["measured_gib"])
    assert one["projected"]["0.25deg-p2"]["tokens"] == 259_200
    assert one["time_per_token_s"] == pytest.approx(1e-3) and one["time_per_token2_s"] == pytest.approx(0, abs=1e-12)
