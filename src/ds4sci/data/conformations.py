"""Molecular conformation ensembles for DiG: alanine dipeptide MD, molecule graphs, metrics.

The embedded reference (``files/ala2_md.npz``, made by ``scripts/make_dig_data.py``) is an
OpenMM implicit-solvent (amber99sbildn + OBC) 300 K Langevin trajectory of ACE-ALA-NME,
22 atoms, coordinates in Angstrom, centred. Topology ``files/ala2.pdb`` (from mdtraj's test
structure, LGPL-2.1). Files are read with mdtraj.

Metrics follow the usual Boltzmann-generator benchmarks on alanine dipeptide: (phi, psi)
Ramachandran histograms compared by Jensen-Shannon divergence (natural log, so in [0, ln 2]),
populations of the C7eq / C5 / alpha_R / alpha_L basins, and the fraction of samples whose
bond lengths are all chemically valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILES = Path(__file__).resolve().parent / "files"
ALA2_PDB = FILES / "ala2.pdb"
ALA2_MD = FILES / "ala2_md.npz"

# Index 0 is never an element: it is free for padding. Unknown elements raise.
ELEMENTS = ("PAD", "H", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I")
ELEMENT_INDEX = {sym: i for i, sym in enumerate(ELEMENTS)}
# Proteins: the 20 standard residues (node types of the protein preset).
RESIDUES = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS",
            "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL")
RESIDUE_INDEX = {name: i + 1 for i, name in enumerate(RESIDUES)}  # 0 = padding


def _mdtraj():
    try:
        import mdtraj
    except ImportError as err:  # pragma: no cover - the dig extra brings it
        raise ImportError("ds4sci DiG data needs mdtraj: pip install 'ds4sci[dig]'") from err
    return mdtraj


def load_topology(path: str | Path = ALA2_PDB):
    """An mdtraj Topology from a PDB (or any file mdtraj reads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"topology file {str(path)!r} does not exist")
    return _mdtraj().load_topology(str(path))


def load_alanine_dipeptide(path: str | Path = ALA2_MD) -> tuple[np.ndarray, object, float]:
    """The embedded MD reference: ``(xyz [T, 22, 3] float32 Angstrom, topology, dt_ps)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"alanine-dipeptide reference {str(path)!r} does not exist "
                                "(make it with scripts/make_dig_data.py)")
    with np.load(path) as data:
        xyz = data["xyz"].astype(np.float32)
        dt = float(data["timestep_ps"])
    return xyz, load_topology(ALA2_PDB), dt


def load_trajectory(path: str | Path, topology: str | Path | None = None) -> np.ndarray:
    """Coordinates ``[T, N, 3]`` in Angstrom of a trajectory file (xtc/dcd/pdb... via mdtraj)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {str(path)!r} does not exist")
    if topology is not None and not Path(topology).is_file():
        raise FileNotFoundError(f"topology file {str(topology)!r} does not exist")
    md = _mdtraj()
    traj = md.load(str(path), top=None if topology is None else str(topology))
    return (traj.xyz * 10.0).astype(np.float32)


def shortest_paths(bonds_NN: torch.Tensor) -> torch.Tensor:
    """Graph distances (number of bonds) between all nodes; unreachable = N (Floyd-Warshall)."""
    N = bonds_NN.shape[-1]
    dist = torch.where(bonds_NN > 0, 1, N).long()
    dist.fill_diagonal_(0)
    for k in range(N):
        dist = torch.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :])
    return dist


def torsion_quadruples(bonds_BNN: torch.Tensor) -> torch.Tensor:
    """Every bonded chain ``i-j-k-l`` (four distinct atoms) of each molecule in the batch:
    ``[Q, 5]`` rows ``(b, i, j, k, l)``, each chain in both directions (so the pair features
    built on them are symmetric in i and l). Empty ``[0, 5]`` if there is none."""
    adj = bonds_BNN > 0
    N = adj.shape[-1]
    b, j, k = torch.nonzero(adj, as_tuple=True)  # directed bonds j -> k
    ends = adj[b, j].unsqueeze(2) & adj[b, k].unsqueeze(1)  # [E, i, l]: i-j and k-l bonded
    n = torch.arange(N, device=adj.device)
    ends &= (n != k[:, None]).unsqueeze(2) & (n != j[:, None]).unsqueeze(1)
    ends &= (n[:, None] != n[None, :]).unsqueeze(0)  # i != l (three-membered rings)
    e, i, l = torch.nonzero(ends, as_tuple=True)
    return torch.stack([b[e], i, j[e], k[e], l], dim=1)


def molecule_from_topology(topology, max_atoms: int | None = None) -> dict:
    """Small-molecule conditioning (batch dim 1): element types, bonds, graph distances, mask
    and the bonded chains of :func:`torsion_quadruples` (``"torsions"``).

    Raises ValueError for an element outside :data:`ELEMENTS` or more atoms than ``max_atoms``.
    """
    atoms = list(topology.atoms)
    N = len(atoms)
    if N == 0:
        raise ValueError("molecule_from_topology: the topology has no atoms")
    if max_atoms is not None and N > max_atoms:
        raise ValueError(f"molecule has {N} atoms; the model accepts at most {max_atoms}")
    types = []
    for atom in atoms:
        symbol = atom.element.symbol if atom.element is not None else None
        if symbol not in ELEMENT_INDEX or symbol == "PAD":
            raise ValueError(f"atom {atom} has element {symbol!r}; supported elements are "
                             f"{ELEMENTS[1:]}")
        types.append(ELEMENT_INDEX[symbol])
    bonds = torch.zeros(N, N, dtype=torch.long)
    for bond in topology.bonds:
        i, j = bond.atom1.index, bond.atom2.index
        order = int(bond.order) if bond.order else 1
        bonds[i, j] = bonds[j, i] = min(order, 4)
    if N > 1 and not (bonds > 0).any():
        raise ValueError(f"topology with {N} atoms has no bonds; DiG needs the bond graph "
                         "(give a PDB with CONECT records or standard residues)")
    return {
        "atom_types": torch.tensor(types).unsqueeze(0),
        "bonds": bonds.unsqueeze(0),
        "path": shortest_paths(bonds).unsqueeze(0),
        "mask": torch.ones(1, N, dtype=torch.bool),
        "torsions": torsion_quadruples(bonds.unsqueeze(0)),
    }


def residue_types(names: list[str]) -> torch.Tensor:
    """Protein node types ``[1, L]`` from residue names; unknown residues raise."""
    unknown = sorted({n for n in names if n not in RESIDUE_INDEX})
    if unknown:
        raise ValueError(f"unknown residue types {unknown}; expected standard residues "
                         f"{RESIDUES}")
    return torch.tensor([RESIDUE_INDEX[n] for n in names]).unsqueeze(0)


def bond_pairs(molecule: dict) -> np.ndarray:
    """``[n_bonds, 2]`` atom index pairs (i < j) of the molecule's bonds."""
    b = molecule["bonds"][0].numpy()
    i, j = np.nonzero(np.triu(b > 0))
    return np.stack([i, j], axis=1)


@dataclass
class ConformationDataset:
    """Indexable, deterministic: item ``i`` is frame ``i`` of ``xyz`` (centred), one molecule."""

    xyz: np.ndarray
    """``[T, N, 3]`` coordinates in Angstrom."""
    molecule: dict
    """Conditioning of :func:`molecule_from_topology` (batch dim 1)."""

    def __post_init__(self) -> None:
        n = self.molecule["mask"].shape[-1]
        if self.xyz.ndim != 3 or self.xyz.shape[1:] != (n, 3):
            raise ValueError(f"ConformationDataset: xyz has shape {self.xyz.shape}; expected "
                             f"[T, {n}, 3] for this {n}-atom molecule")

    def __len__(self) -> int:
        return len(self.xyz)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(self.xyz[index], dtype=np.float32))
        return x - x.mean(0, keepdim=True)

    def collate(self, items: list[torch.Tensor]) -> dict:
        """``{"x": [B, N, 3]}`` plus the molecule keys with batch dim 1 (broadcast)."""
        return {"x": torch.stack(items), **self.molecule}


def alanine_dipeptide_dataset(path: str | Path = ALA2_MD) -> ConformationDataset:
    xyz, top, _ = load_alanine_dipeptide(path)
    return ConformationDataset(xyz, molecule_from_topology(top))


# ---------------------------------------------------------------- metrics
def phi_psi(xyz: np.ndarray, topology) -> tuple[np.ndarray, np.ndarray]:
    """Backbone dihedrals (degrees, in (-180, 180]) of alanine: ``(phi [T], psi [T])``."""
    md = _mdtraj()
    traj = md.Trajectory(np.asarray(xyz, dtype=np.float32) / 10.0, topology)
    _, phi = md.compute_phi(traj)
    _, psi = md.compute_psi(traj)
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        raise ValueError("phi_psi: the topology has no phi/psi dihedral (not a peptide?)")
    return np.degrees(phi[:, 0]), np.degrees(psi[:, 0])


def ramachandran_histogram(phi: np.ndarray, psi: np.ndarray, bins: int = 36) -> np.ndarray:
    """Normalised ``[bins, bins]`` histogram on [-180, 180)^2 (rows phi, columns psi)."""
    edges = np.linspace(-180.0, 180.0, bins + 1)
    hist, _, _ = np.histogram2d(np.asarray(phi), np.asarray(psi), bins=[edges, edges])
    total = hist.sum()
    if total == 0:
        raise ValueError("ramachandran_histogram: no samples")
    return hist / total


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats) of two histograms (normalised here)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"js_divergence: shapes {p.shape} and {q.shape} differ")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


BASINS = ("C7eq", "C5", "alpha_R", "alpha_L", "other")


def basin(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Basin label index (into :data:`BASINS`) per frame.

    phi < 0: alpha_R if -120 <= psi < 50, else the extended region, split at phi = -120 into
    C5 (phi < -120) and C7eq; phi >= 0: alpha_L if -60 <= psi < 120 (includes nothing of
    C7ax, psi ~ -70), else other (C7ax and the rest).
    """
    phi, psi = np.asarray(phi), np.asarray(psi)
    label = np.full(phi.shape, 4)
    neg = phi < 0
    helix = (psi >= -120) & (psi < 50)
    label[neg & helix] = 2
    label[neg & ~helix & (phi < -120)] = 1
    label[neg & ~helix & (phi >= -120)] = 0
    label[~neg & (psi >= -60) & (psi < 120)] = 3
    return label


def basin_populations(phi: np.ndarray, psi: np.ndarray) -> dict[str, float]:
    """Fraction of frames in each of :data:`BASINS`."""
    counts = np.bincount(basin(phi, psi).ravel(), minlength=len(BASINS))
    return {name: float(c) / max(1, counts.sum()) for name, c in zip(BASINS, counts)}


def bond_lengths(xyz: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``[T, n_bonds]`` bond lengths."""
    xyz = np.asarray(xyz)
    return np.linalg.norm(xyz[:, pairs[:, 0]] - xyz[:, pairs[:, 1]], axis=-1)


def valid_bond_fraction(xyz: np.ndarray, pairs: np.ndarray, reference: np.ndarray,
                        rel_tol: float = 0.1) -> float:
    """Fraction of frames whose every bond is within ``rel_tol`` of its reference length."""
    lengths = bond_lengths(xyz, pairs)
    ok = np.abs(lengths - reference[None, :]) <= rel_tol * reference[None, :]
    return float(ok.all(axis=1).mean())


def calpha_signed_volumes(xyz: np.ndarray, topology) -> np.ndarray:
    """``det[N - CA, C - CA, CB - CA]`` per frame and residue having N, CA, C and CB:
    ``[T, R]`` (R = 0 for a topology without such residues, e.g. glycine only).

    Its sign is the residue's C-alpha handedness (L or D): the same in every frame of an MD
    run, flipped in a mirror-image sample."""
    xyz = np.asarray(xyz, dtype=np.float64)
    quads = []
    for residue in topology.residues:
        names = {atom.name: atom.index for atom in residue.atoms}
        if all(n in names for n in ("N", "CA", "C", "CB")):
            quads.append([names[n] for n in ("N", "CA", "C", "CB")])
    if not quads:
        return np.zeros((len(xyz), 0))
    n, ca, c, cb = np.asarray(quads).T
    a, b, d = xyz[:, n] - xyz[:, ca], xyz[:, c] - xyz[:, ca], xyz[:, cb] - xyz[:, ca]
    return np.einsum("trk,trk->tr", np.cross(a, b), d)


def reference_handedness(reference: np.ndarray, topology) -> np.ndarray:
    """[R] the sign of each C-alpha's signed volume in the majority of ``reference`` frames."""
    return np.sign(np.sign(calpha_signed_volumes(reference, topology)).sum(0))


def chirality_fraction(xyz: np.ndarray, reference: np.ndarray, topology) -> float | None:
    """Fraction of frames of ``xyz`` whose every C-alpha has the handedness that the majority
    of ``reference`` frames have (None when the topology has no C-alpha with a CB)."""
    vol = calpha_signed_volumes(xyz, topology)
    if vol.shape[1] == 0:
        return None
    return float((vol * reference_handedness(reference, topology) > 0).all(axis=1).mean())


def autocorrelation_time(signal: np.ndarray, max_lag: int | None = None) -> float:
    """Integrated autocorrelation time (in frames) of a 1-D signal, summed to the first zero."""
    x = np.asarray(signal, dtype=np.float64)
    x = x - x.mean()
    var = x.var()
    if var == 0:
        return 1.0
    max_lag = max_lag or len(x) // 4
    tau = 1.0
    for lag in range(1, max_lag):
        c = float(np.mean(x[:-lag] * x[lag:])) / var
        if c <= 0:
            break
        tau += 2 * c
    return tau
