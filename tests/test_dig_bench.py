"""DiG benchmarks' helpers: sampler settings, MD decorrelation, JS noise floor, a + b L^2 fits."""

import pytest

from ds4sci.bench.dig import fit_quadratic
from ds4sci.bench.dig_quality import (md_decorrelation, md_noise_floor, network_evaluations,
                                      parse_setting)
from ds4sci.data import conformations as conf


def test_sampler_settings_and_evaluations():
    assert parse_setting("heun:40") == ("heun", 40)
    assert network_evaluations("heun", 40) == 79 and network_evaluations("ancestral", 500) == 500
    assert parse_setting("edm:10") == ("edm", 10) and network_evaluations("edm", 10) == 19
    with pytest.raises(ValueError, match="'euler:10'; expected 'heun:<steps>', 'edm:<steps>'"):
        parse_setting("euler:10")


def test_md_decorrelation_and_noise_floor_on_the_embedded_md():
    xyz, top, dt = conf.load_alanine_dipeptide()
    g = md_decorrelation(xyz, top)
    # psi is the slow coordinate (C7eq/C5 <-> alpha_R hops), phi relaxes within a basin.
    assert max(g, key=g.get) in ("cos_psi", "basin_alpha_R")
    assert 20 < g["cos_psi"] < 80 and g["cos_phi"] < 15
    floor = md_noise_floor(xyz[::4], top, 200, repeats=2)
    # 200 frames fill a 36 x 36 histogram sparsely: a large finite-sample JS even for MD itself.
    assert 0.05 < floor["js_random_frames_mean"] < 0.5


def test_quadratic_fit_recovers_a_plus_b_L2():
    rows = [{"mode": "train", "contender": "ds4sci", "status": "ok", "residues": L,
             "peak_bytes": 3.0 + 2.0 * L * L} for L in (256, 512)]
    rows.append({"mode": "train", "contender": "ds4sci", "status": "oom", "residues": 1024})
    a, b, Ls = fit_quadratic(rows, "train", "ds4sci", "peak_bytes")
    assert abs(a - 3.0) < 1e-6 and abs(b - 2.0) < 1e-12 and Ls == [256, 512]
    assert fit_quadratic(rows[:1], "train", "ds4sci", "peak_bytes") is None


def test_dig_quality_main_on_a_tiny_untrained_checkpoint(tmp_path):
    import json

    from ds4sci.bench.dig_quality import main
    from ds4sci.models.dig import build_model, get_config
    from ds4sci.models.dig.sample import save_checkpoint

    path = tmp_path / "tiny.pt"
    cfg = get_config("dig-tiny", d_model=16, d_pair=8, num_layers=1, num_heads=2, d_ffn=16,
                     num_rbf=8, num_chiral=2, max_atoms=32, local_chiral_head=True)
    save_checkpoint(build_model(cfg, seed=0), path)
    assert main(["--checkpoint", str(path), "--settings", "heun:2", "ancestral:2",
                 "--num-samples", "8", "--md-seconds", "0", "--out", str(tmp_path),
                 "--stem", "q"]) == 0
    rows = json.loads((tmp_path / "q.json").read_text())["results"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("heun", 2), ("ancestral", 2)]
    for r in rows:
        assert 0 <= r["chirality_fraction"] <= 1
        assert r["mirror_fixed_reflected_fraction"] == 1 - r["chirality_fraction"]
        assert 0 <= r["mirror_fixed_js_nats"] <= 0.7 and 0 <= r["js_divergence_phi_psi_nats"]
