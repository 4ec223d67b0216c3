"""``ds4sci sample`` (DiG): outputs, metrics, errors, on a tiny untrained model."""

import json

import mdtraj
import numpy as np
import pytest
import torch

from ds4sci.data import conformations as conf
from ds4sci.models.dig import build_model, get_config
from ds4sci.models.dig.sample import load_checkpoint, main, save_checkpoint

TINY = get_config("dig-tiny", d_model=16, d_pair=8, num_layers=1, num_heads=2, d_ffn=16,
                  num_rbf=8, num_chiral=2, max_atoms=32)


@pytest.fixture()
def checkpoint(tmp_path):
    path = tmp_path / "tiny.pt"
    save_checkpoint(build_model(TINY, seed=0), path)
    return path


def test_sample_cli_writes_conformations_plot_and_metrics(tmp_path, checkpoint):
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--num-samples", "12", "--steps", "3",
                 "--batch-size", "5", "--out", str(out)]) == 0
    traj = mdtraj.load(str(out / "samples.pdb"))
    assert traj.n_frames == 12 and traj.n_atoms == 22
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["js_divergence_phi_psi_nats"] <= np.log(2) + 1e-9
    assert set(metrics["basins_samples"]) == set(conf.BASINS)
    assert (out / "ramachandran.png").stat().st_size > 1000
    main(["--checkpoint", str(checkpoint), "--num-samples", "4", "--steps", "2",
          "--sampler", "ancestral", "--format", "dcd", "--out", str(out)])
    assert mdtraj.load(str(out / "samples.dcd"), top=str(out / "topology.pdb")).n_frames == 4
    main(["--checkpoint", str(checkpoint), "--num-samples", "2", "--steps", "2",
          "--format", "extxyz", "--out", str(out)])
    text = (out / "samples.extxyz").read_text().splitlines()
    assert text[0] == "22" and len(text) == 2 * 24


def test_checkpoint_roundtrip(tmp_path, checkpoint):
    model = load_checkpoint(checkpoint)
    ref = build_model(TINY, seed=0)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_sample_cli_bad_inputs(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        main(["--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(FileNotFoundError, match="nope.pdb"):
        main(["--checkpoint", str(checkpoint), "--topology", str(tmp_path / "nope.pdb")])
    small = tmp_path / "small.pt"
    save_checkpoint(build_model(TINY.replace(max_atoms=10)), small)
    with pytest.raises(ValueError, match="22 atoms; the model accepts at most 10"):
        main(["--checkpoint", str(small), "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not a DiG checkpoint"):
        main(["--checkpoint", str(bad)])


def test_fix_mirror_images_reflects_only_mirror_samples(tmp_path, checkpoint):
    from ds4sci.models.dig.sample import fix_mirror_images

    ref, top, _ = conf.load_alanine_dipeptide()
    frames = ref[:40].astype(np.float64)
    mirror = frames * np.array([-1.0, 1.0, 1.0])  # any mirror: x -> -x
    mixed = np.concatenate([frames[:25], mirror[25:]])
    fixed, reflected = fix_mirror_images(mixed, ref, top)
    assert reflected.tolist() == [False] * 25 + [True] * 15
    np.testing.assert_array_equal(fixed[:25], frames[:25])
    assert conf.chirality_fraction(fixed, ref, top) == 1.0
    # the reflected ones are the originals up to a rigid motion: same internal distances
    def dist(x):
        return np.linalg.norm(x[:, :, None] - x[:, None], axis=-1)

    np.testing.assert_allclose(dist(fixed[25:]), dist(frames[25:]), atol=1e-9)
    # (phi, psi) of a reflected mirror image are the original's
    np.testing.assert_allclose(np.array(conf.phi_psi(fixed[25:], top)),
                               np.array(conf.phi_psi(frames[25:], top)), atol=1e-3)
    out = tmp_path / "fixed"
    main(["--checkpoint", str(checkpoint), "--num-samples", "6", "--steps", "2",
          "--out", str(out), "--fix-mirror"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mirror_fixed"] and metrics["chirality_fraction"] == 1.0
