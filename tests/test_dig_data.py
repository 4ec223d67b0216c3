"""Alanine-dipeptide data and the metrics of DiG's benchmark, on hand-checked cases."""

import math

import numpy as np
import pytest
import torch

from ds4sci.data import conformations as conf


def test_embedded_reference_loads_and_is_a_valid_md_ensemble():
    xyz, top, dt = conf.load_alanine_dipeptide()
    assert xyz.shape[1:] == (22, 3) and len(xyz) >= 2000 and dt > 0
    mol = conf.molecule_from_topology(top)
    assert mol["atom_types"].shape == (1, 22)
    pairs = conf.bond_pairs(mol)
    assert len(pairs) == 21  # a tree: 22 atoms, 21 bonds
    ref = conf.bond_lengths(xyz, pairs).mean(0)
    assert 0.9 < ref.min() and ref.max() < 1.6  # C-H ~1.09 ... C-C ~1.52 Angstrom
    assert conf.valid_bond_fraction(xyz, pairs, ref) == 1.0
    phi, psi = conf.phi_psi(xyz, top)
    pops = conf.basin_populations(phi, psi)
    assert pops["C7eq"] + pops["C5"] + pops["alpha_R"] > 0.9
    ds = conf.alanine_dipeptide_dataset()
    batch = ds.collate([ds[i] for i in (0, 5, 7)])
    assert batch["x"].shape == (3, 22, 3) and torch.equal(ds[5], ds[5])
    assert batch["x"].mean(1).abs().max() < 1e-4


def _four_points(dihedral_deg):
    """Atoms a-b-c-d with the dihedral a-b-c-d equal to the given angle."""
    t = math.radians(dihedral_deg)
    return np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 1.5], [math.cos(t), math.sin(t), 1.5]])


def test_phi_psi_on_hand_built_backbones():
    """phi = dihedral(C0, N1, CA, C1), psi = dihedral(N1, CA, C1, N2), IUPAC sign (a positive
    angle turns the first bond onto the last counter-clockwise, looking down the middle bond)."""
    _, top, _ = conf.load_alanine_dipeptide()
    names = {(a.residue.index, a.name): a.index for a in top.atoms}
    c0, n1, ca, c1, n2 = (names[(0, "C")], names[(1, "N")], names[(1, "CA")], names[(1, "C")],
                          names[(2, "N")])
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(2, 22, 3)) * 3
    frames[0, [c0, n1, ca, c1]] = _four_points(-60.0)
    frames[1, [n1, ca, c1, n2]] = _four_points(135.0)
    phi, psi = conf.phi_psi(frames.astype(np.float32), top)
    assert phi[0] == pytest.approx(-60.0, abs=1e-3)
    assert psi[1] == pytest.approx(135.0, abs=1e-3)
    # Mirror images have opposite dihedrals (what a racemic model would get wrong).
    phi_m, psi_m = conf.phi_psi((-frames).astype(np.float32), top)
    assert phi_m[0] == pytest.approx(60.0, abs=1e-3) and psi_m[1] == pytest.approx(-135.0,
                                                                                    abs=1e-3)


def test_histogram_js_and_basins_hand_checked():
    h = conf.ramachandran_histogram(np.array([-170.0, -170.0, 10.0]),
                                    np.array([-170.0, -170.0, 10.0]), bins=2)
    np.testing.assert_allclose(h, [[2 / 3, 0], [0, 1 / 3]])
    p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert conf.js_divergence(p, q) == pytest.approx(math.log(2))
    assert conf.js_divergence(p, p) == 0.0
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = 1/2 [1/2 ln(2/3) + 1/2 ln 2] + 1/2 ln(4/3)
    want = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2)) + 0.5 * math.log(4 / 3)
    assert conf.js_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(want)
    pops = conf.basin_populations(np.array([-80.0, -150.0, -70.0, 60.0, 70.0]),
                                  np.array([70.0, 160.0, -40.0, 40.0, -70.0]))
    assert pops == {"C7eq": 0.2, "C5": 0.2, "alpha_R": 0.2, "alpha_L": 0.2, "other": 0.2}
    with pytest.raises(ValueError, match="shapes"):
        conf.js_divergence([1, 0], [1, 0, 0])


def test_bond_validity_and_autocorrelation():
    xyz = np.array([[[0, 0, 0], [1.0, 0, 0]], [[0, 0, 0], [1.3, 0, 0]]])
    pairs = np.array([[0, 1]])
    assert conf.valid_bond_fraction(xyz, pairs, np.array([1.05])) == 0.5
    assert conf.autocorrelation_time(np.random.default_rng(0).normal(size=4000)) < 1.3
    slow = np.repeat(np.random.default_rng(0).normal(size=400), 10)
    assert 8 < conf.autocorrelation_time(slow) < 25


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pdb"):
        conf.load_topology(tmp_path / "nope.pdb")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        conf.load_alanine_dipeptide(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"unknown residue types \['XYZ'\]"):
        conf.residue_types(["ALA", "XYZ"])
    _, top, _ = conf.load_alanine_dipeptide()
    with pytest.raises(ValueError, match="22 atoms; the model accepts at most 10"):
        conf.molecule_from_topology(top, max_atoms=10)
    pdb = tmp_path / "se.pdb"
    pdb.write_text("HETATM    1 SE   SEX A   1       0.000   0.000   0.000  1.00  0.00"
                   "          SE  \nEND\n")
    with pytest.raises(ValueError, match="element 'Se'"):
        conf.molecule_from_topology(conf.load_topology(pdb))
    with pytest.raises(ValueError, match=r"xyz has shape \(4, 21, 3\); expected \[T, 22, 3\]"):
        conf.ConformationDataset(np.zeros((4, 21, 3)), conf.molecule_from_topology(top))


def test_calpha_chirality_of_md_and_its_mirror_image():
    xyz, top, _ = conf.load_alanine_dipeptide()
    vol = conf.calpha_signed_volumes(xyz[:200], top)
    assert vol.shape == (200, 1)  # ALA's C-alpha; ACE and NME have none
    # Hand-checked on one frame: (N - CA) x (C - CA) . (CB - CA)
    names = {a.name: a.index for a in top.atoms if a.residue.name == "ALA"}
    n, ca, c, cb = (xyz[0, names[k]].astype(np.float64) for k in ("N", "CA", "C", "CB"))
    assert vol[0, 0] == pytest.approx(np.dot(np.cross(n - ca, c - ca), cb - ca))
    assert conf.chirality_fraction(xyz[:200], xyz, top) == 1.0  # MD: L throughout
    mirror = xyz[:200] * np.array([1.0, 1.0, -1.0], dtype=np.float32)
    assert conf.chirality_fraction(mirror, xyz, top) == 0.0
    assert conf.chirality_fraction(np.concatenate([xyz[:150], mirror[:50]]), xyz, top) == 0.75
