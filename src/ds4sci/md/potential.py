"""A force-field potential for MD: model + Verlet list + input checks, energies/forces/stress.

One ``Potential`` holds the model (eval mode, fixed dtype), the system's atomic numbers, cell
and a ``VerletList``; ``compute(pos)`` returns energy, forces (one backward, no graph kept) and,
for periodic cells, stress. Several molecules/replicas can share one call via ``batch``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ds4sci.md.neighbors import VerletList
from ds4sci.models.visnet import ViSNet, ViSNetConfig, energy_forces, preset
from ds4sci.ops.neighbors import neighbor_list

MIN_DISTANCE = 0.1
"""Atoms closer than this (A) are reported as overlapping."""

ALL_PAIRS_MAX_ATOMS = 64
"""Open-boundary systems up to this many atoms per molecule use every ordered pair as their fixed
pair list in the compiled path (no neighbour search, shapes never change); ViSNet masks pairs
beyond r_c. Above it, the Verlet list (cutoff + skin) padded to a capacity is used."""

FUSED_MAX_ATOMS = 16384
"""``compile=True`` compiles the fused step only up to this many atoms. The compiled
torch.func.grad graph holds every edge intermediate of one step at once (no edge chunks): at
10,125 water atoms (~500k pairs inside r_c) it runs in ~1.5 GiB and 4x the eager step's speed;
larger systems run the eager path, where edge chunking bounds memory (100k atoms in < 5 GiB)."""

PAD_GROWTH = 1.1
"""The padded pair list's capacity grows to this factor times the pairs within r_c, so capacity
changes (and recompiles) are rare (the count fluctuates by ~1% in a liquid); it never shrinks."""


def save_model(path, model: ViSNet) -> None:
    """Checkpoint = {"config": ViSNetConfig dict, "state_dict": ...} (what ``load_model`` reads)."""
    torch.save({"format": "ds4sci-visnet-1", "config": model.cfg.to_dict(),
                "state_dict": model.state_dict()}, path)


def load_model(spec: str) -> ViSNet:
    """A model from a checkpoint path, or ``preset:<name>[:seed]`` (random init; tests/benchmarks)."""
    if spec.startswith("preset:"):
        parts = spec.split(":")
        m = ViSNet(preset(parts[1]))
        m.reset_parameters(torch.Generator().manual_seed(int(parts[2]) if len(parts) > 2 else 0))
        return m.eval()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {spec!r} does not exist (expected a file "
                                "written by ds4sci.md.potential.save_model or 'preset:<name>')")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = ViSNetConfig.from_dict(ckpt["config"])
        m = ViSNet(cfg)
        m.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise ValueError(f"model checkpoint {spec!r} is corrupt or not a ds4sci ViSNet "
                         f"checkpoint ({type(e).__name__}: {e})") from e
    return m.eval()


@dataclass
class Evaluation:
    energy: Tensor
    """[B] eV (float64: the reference energies are added in float64)."""
    forces: Tensor
    """[N, 3] eV/A."""
    stress: Tensor | None
    """[3, 3] eV/A^3 (periodic single system) or None."""


class Potential:
    """Model + neighbour list for one (possibly batched) system.

    Args:
        model: energy model (ViSNet).
        numbers_N: atomic numbers.
        cell_33, pbc_3: periodic cell and flags (None = open boundaries).
        batch_N: molecule index per atom for batched replicas (open boundaries).
        skin: Verlet skin (A).
        dtype: model dtype (float32 default; positions/velocities stay float64 in integrators).
        compile: integrators compile their whole step (fixed-shape pair list, forces by
            torch.func.grad) with ``torch.compile``; up to ``FUSED_MAX_ATOMS`` atoms.
        edge_chunk_size: edges per chunk in the eager evaluations (``compute``: the ASE
            calculator, stress, the first evaluation of a compiled run), each chunk recomputed
            in the backward (memory of one chunk instead of all edges); None keeps the model's
            setting. The compiled step always takes all edges at once.
    """

    def __init__(self, model: ViSNet, numbers_N: Tensor, cell_33: Tensor | None = None,
                 pbc_3: Tensor | None = None, batch_N: Tensor | None = None, skin: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 compile: bool = False, edge_chunk_size: int | None = None):
        # A private copy: the per-element reference energies (atomref, ~ -400 eV per O atom) and
        # the mean are constants, moved out of the float32 model and added in float64, so the
        # reported energy keeps ~1e-9 eV resolution (NVE drift) instead of float32's ~1e-4 eV
        # at -900 eV. Forces are unchanged (constants have no gradient).
        model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.dtype, self.device = dtype, torch.device(device)
        self.net = self.model  # compute() (ASE calculator, stress) runs eagerly
        self.numbers = torch.as_tensor(numbers_N, dtype=torch.long, device=device)
        self.check_elements(self.numbers)
        n = self.numbers.shape[0]
        self.batch = (torch.zeros(n, dtype=torch.long, device=device) if batch_N is None
                      else torch.as_tensor(batch_N, dtype=torch.long, device=device))
        self.num_graphs = int(self.batch.max()) + 1 if n else 0
        ref_N = model.atomref.weight.detach().double()[self.numbers, 0]
        self.e0_B = torch.zeros(max(self.num_graphs, 1), dtype=torch.float64,
                                device=device).index_add_(0, self.batch, ref_N)
        if model.cfg.reduce_op == "mean":
            count_B = torch.bincount(self.batch, minlength=max(self.num_graphs, 1))
            self.e0_B = self.e0_B / count_B.clamp(min=1)
        self.e0_B = self.e0_B + float(model.mean)
        with torch.no_grad():
            model.atomref.weight.zero_()
            model.mean.zero_()
        periodic = cell_33 is not None and pbc_3 is not None and bool(torch.as_tensor(pbc_3).any())
        self.cell = torch.as_tensor(cell_33, dtype=torch.float64, device=device) if periodic else None
        self.pbc = torch.as_tensor(pbc_3, dtype=torch.bool, device=device) if periodic else None
        self.cutoff = float(model.cfg.cutoff)
        self.nlist = VerletList(self.cutoff, skin, self.cell, self.pbc,
                                None if self.num_graphs <= 1 else self.batch)
        self.compile = compile and n <= FUSED_MAX_ATOMS
        counts = torch.bincount(self.batch, minlength=max(self.num_graphs, 1))
        self.all_pairs = (not periodic and n > 1
                          and int(counts.max()) <= ALL_PAIRS_MAX_ATOMS)
        self._static: tuple[Tensor, Tensor] | None = None
        self.capacity = 0
        if edge_chunk_size is not None:
            if edge_chunk_size < 1:
                raise ValueError(f"edge_chunk_size={edge_chunk_size}; expected >= 1 or None")
            model.set_edge_chunk_size(edge_chunk_size)
        if self.compile and model.cfg.edge_chunk_size is not None:
            # the compiled graph traces the plain edge loop; the eager path keeps the chunks
            self.model = copy.deepcopy(model)
            self.model.set_edge_chunk_size(None)

    def check_elements(self, numbers_N: Tensor) -> None:
        cfg = self.model.cfg
        allowed = set(cfg.elements) if cfg.elements is not None else None
        bad = sorted({int(v) for v in numbers_N.unique().tolist()
                      if not 0 < v < cfg.max_z or (allowed is not None and v not in allowed)})
        if bad:
            from ase.data import chemical_symbols
            names = [chemical_symbols[b] if 0 <= b < len(chemical_symbols) else str(b) for b in bad]
            raise ValueError(f"structure contains elements {names} (Z={bad}) the model was not "
                             f"trained on; expected only Z in {sorted(allowed) if allowed else f'1..{cfg.max_z - 1}'}")

    def check_overlap(self, pos_N3: Tensor) -> None:
        ei, sh = neighbor_list(pos_N3.detach().double(), MIN_DISTANCE, self.cell, self.pbc,
                               None if self.num_graphs <= 1 else self.batch)
        if ei.shape[1]:
            j, i = int(ei[0, 0]), int(ei[1, 0])
            vec = pos_N3[j].double() - pos_N3[i].double()
            if self.cell is not None:
                vec = vec + sh[0].double() @ self.cell
            raise ValueError(f"atoms {i} and {j} overlap: distance {float(vec.norm()):.4f} A < "
                             f"{MIN_DISTANCE} A; expected a physical structure")

    def compute(self, pos_N3: Tensor, stress: bool = False) -> Evaluation:
        """Energy, forces (and stress) at ``pos`` (any float dtype; computed in ``self.dtype``)."""
        ei, sh = self.nlist.within_cutoff(pos_N3)
        cell = None if self.cell is None else self.cell.to(self.dtype)[None]
        out = energy_forces(self.net, self.numbers, pos_N3.to(self.dtype), self.batch,
                            self.num_graphs, ei, sh if self.cell is not None else None, cell,
                            forces=True, stress=stress and self.cell is not None)
        return Evaluation(out.energy.detach().double() + self.e0_B, out.forces.detach(),
                          None if out.stress is None else out.stress[0].detach())

    # ------------------------------------------------------------ static-shape (compiled) path
    def static_pairs(self, pos_N3: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Fixed-shape pair list for the compiled path: (edge_index [2, C], offset_C3, rebuilt).

        A superset of the pairs within r_c (ViSNet masks the rest exactly): every ordered pair
        of each small molecule (built once), or the Verlet candidates (cutoff + skin, rebuilt
        when an atom moved > skin/2) that are inside r_c at ``pos``, padded to ``capacity`` C.
        offset_C3 (model dtype) is the periodic image vector, shifts @ cell; padding slots are
        self pairs of atom 0 placed 3 r_c away, so they carry no energy and no force.
        ``rebuilt`` says the list may have changed.
        """
        if self.all_pairs:
            if self._static is None:
                same = self.batch.unsqueeze(0) == self.batch.unsqueeze(1)
                same.fill_diagonal_(False)
                dst, src = same.nonzero(as_tuple=True)
                ei = torch.stack([src, dst])
                self._static = (ei, torch.zeros(ei.shape[1], 3, dtype=self.dtype,
                                                device=self.device))
                return (*self._static, True)
            return (*self._static, False)
        ei, sh = self.nlist.update(pos_N3)  # candidates within cutoff + skin (cached)
        off = (sh.double() @ self.cell if self.cell is not None
               else torch.zeros(ei.shape[1], 3, dtype=torch.float64, device=self.device))
        # Keep only the pairs inside r_c at these positions (the skin's extra pairs would be
        # ~70% more edge work at r_c = 5 A, skin 1 A); the shape stays fixed by padding.
        pos = pos_N3.detach().double()
        vec = pos[ei[0]] - pos[ei[1]] + off
        keep = (vec * vec).sum(-1) < self.cutoff ** 2
        ei, off = ei[:, keep], off[keep]
        E = ei.shape[1]
        if E > self.capacity:
            self.capacity = int(PAD_GROWTH * E) + 16
        pad = self.capacity - E
        pad_off = torch.zeros(pad, 3, dtype=torch.float64, device=self.device)
        pad_off[:, 0] = 3.0 * self.cutoff
        ei = torch.cat([ei, ei.new_zeros(2, pad)], dim=1)
        self._static = (ei, torch.cat([off, pad_off]).to(self.dtype))
        return (*self._static, True)

    def energy_on_pairs(self, pos_N3: Tensor, edge_index_2C: Tensor,
                        offset_C3: Tensor) -> tuple[Tensor, Tensor]:
        """(sum of energies [], energies [B]) for model-dtype positions on a static pair list."""
        vec_C3 = pos_N3[edge_index_2C[0]] - pos_N3[edge_index_2C[1]] + offset_C3
        e_B = self.model(self.numbers, edge_index_2C, vec_C3, self.batch, self.num_graphs)
        return e_B.sum(), e_B.to(torch.float64) + self.e0_B

    def forces_on_pairs(self, pos_N3: Tensor, edge_index_2C: Tensor,
                        offset_C3: Tensor) -> tuple[Tensor, Tensor]:
        """(energies [B], forces [N, 3] float64) by ``torch.func.grad`` (traceable by compile)."""
        grad_fn = torch.func.grad(self.energy_on_pairs, has_aux=True)
        g_N3, e_B = grad_fn(pos_N3.to(self.dtype), edge_index_2C, offset_C3)
        return e_B, -g_N3.to(torch.float64)
