"""Spatial domain decomposition of MD over torch.distributed ranks (gloo on CPU, NCCL on GPU).

The atoms are sharded: rank r owns the atoms of slab r (slabs along the first lattice vector's
fractional coordinate for a periodic cell, along x between bounds fixed at the start for open
boundaries) and holds only their positions, velocities, masses and forces. One force evaluation:

1. migration: atoms that drifted out of a rank's slab are sent to their new owner;
2. halo exchange: every rank sends each other rank its owned atoms within H = L r_c of that
   rank's slab (L message-passing layers: the model's receptive field, so the features of the
   receiver's owned atoms are exact). Only neighbouring slabs exchange unless H spans several
   slabs; one ``all_to_all`` with per-pair counts carries all the pairs;
3. each rank builds its graph over owned + halo atoms and differentiates the energy of its owned
   atoms with respect to all its local positions;
4. reverse halo exchange: the forces on halo atoms go back to their owners and are added.

So F = -d(sum_r E_r)/dx equals one process's forces up to summation order. Per rank, memory is
O(N/P + halo) and a step moves O(halo) atoms; energies and the instability check are one
all-reduce of two scalars. Positions are gathered to rank 0 only when the trajectory is written.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ds4sci.md.integrators import check_stability
from ds4sci.md.potential import Potential
from ds4sci.md.units import FS, KB
from ds4sci.ops.neighbors import cell_heights, neighbor_list


class Slabs:
    """P slabs: fractional coordinate f in [r/P, (r+1)/P) of the first lattice vector (periodic),
    or x in [lo + r w, lo + (r+1) w) with w = (hi - lo)/P (open; the end slabs extend to
    infinity, so atoms leaving the initial extent stay owned)."""

    def __init__(self, world: int, cell_33: Tensor | None = None,
                 bounds: tuple[float, float] | None = None):
        if world < 1:
            raise ValueError(f"world={world}; expected >= 1 process")
        self.world = world
        self.cell = None if cell_33 is None else cell_33.double()
        if self.cell is not None:
            self.inv = torch.linalg.inv(self.cell)
            self.height = float(cell_heights(self.cell)[0])
        else:
            if bounds is None:
                raise ValueError("Slabs: open boundaries need bounds=(lo, hi); got None")
            lo, hi = bounds
            self.lo, self.width = lo, (hi - lo) / world or 1.0

    @classmethod
    def for_system(cls, pos_N3: Tensor, world: int, cell_33: Tensor | None) -> Slabs:
        if cell_33 is not None:
            return cls(world, cell_33)
        x = pos_N3.double()[:, 0]
        return cls(world, bounds=(float(x.min()), float(x.max())))

    def _coord(self, pos_n3: Tensor) -> Tensor:
        """Slab coordinate in slab widths: [0, P) periodic; unbounded for open boundaries."""
        if self.cell is not None:
            f = torch.remainder((pos_n3.double() @ self.inv)[:, 0], 1.0)
            return f * self.world
        return (pos_n3.double()[:, 0] - self.lo) / self.width

    def owner(self, pos_n3: Tensor) -> Tensor:
        return torch.clamp(self._coord(pos_n3).floor().long(), 0, self.world - 1)

    def distance(self, pos_n3: Tensor, rank: int) -> Tensor:
        """[n] distance (A) along the slab normal from each position to slab ``rank`` (0 inside;
        a lower bound of the Cartesian distance, so a halo chosen by it is complete)."""
        s = self._coord(pos_n3)
        if self.cell is not None:
            P = self.world
            up = torch.remainder(rank - s, P)          # from s up to the slab start
            down = torch.remainder(s - (rank + 1), P)  # from the slab end up to s
            inside = self.owner(pos_n3) == rank
            return torch.where(inside, 0.0, torch.minimum(up, down)) * (self.height / P)
        below = rank - s if rank > 0 else torch.full_like(s, -math.inf)
        above = s - (rank + 1) if rank < self.world - 1 else torch.full_like(s, -math.inf)
        return torch.clamp(torch.maximum(below, above), min=0.0) * self.width


def _all_to_all(rows_nK: Tensor, dest_n: Tensor, world: int,
                group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Send row i to rank dest[i]. Returns (received rows grouped by source rank, counts received
    per source [P], counts sent per destination [P], the send order: sent rows are rows[order],
    grouped by destination)."""
    order = torch.argsort(dest_n, stable=True)
    send = torch.bincount(dest_n, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    out = rows_nK.new_empty(int(recv.sum()), rows_nK.shape[1])
    dist.all_to_all_single(out, rows_nK[order].contiguous(), recv.tolist(), send.tolist(),
                           group=group)
    return out, recv, send, order


def _send_back(rows_mK: Tensor, recv_P: Tensor, send_P: Tensor, group) -> Tensor:
    """The reverse of ``_all_to_all``: rows received grouped by source go back to their
    sources, which get them in the order they sent them."""
    out = rows_mK.new_empty(int(send_P.sum()), rows_mK.shape[1])
    dist.all_to_all_single(out, rows_mK.contiguous(), send_P.tolist(), recv_P.tolist(),
                           group=group)
    return out


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sharded_energy_forces(net, z_n: Tensor, x_n3: Tensor, slabs: Slabs, halo: float,
                          cell_33: Tensor | None, pbc_3: Tensor | None, dtype: torch.dtype,
                          group=None) -> tuple[Tensor, Tensor]:
    """(energy of this rank's owned atoms [] , forces on them [n, 3] float64): halo exchange,
    local graph, one backward, reverse halo exchange. Collective over ``group``."""
    rank, world = _rank_world(group)
    n = x_n3.shape[0]
    idx = [torch.zeros(0, dtype=torch.long)]
    dest = [torch.zeros(0, dtype=torch.long)]
    for r in range(world):
        if r != rank:
            sel = (slabs.distance(x_n3, r) <= halo).nonzero().squeeze(1)
            idx.append(sel)
            dest.append(torch.full_like(sel, r))
    idx_h, dest_h = torch.cat(idx), torch.cat(dest)
    rows = torch.cat([x_n3[idx_h].double(), z_n[idx_h].double().unsqueeze(1)], dim=1)
    got = rows  # one rank: no halo (rows is empty)
    if world > 1:
        got, recv, send, order = _all_to_all(rows, dest_h, world, group)
    pos_l = torch.cat([x_n3.double(), got[:, :3]]).to(dtype).requires_grad_(True)
    z_l = torch.cat([z_n, got[:, 3].long()])
    ei, sh = neighbor_list(pos_l.detach().double(), net.cfg.cutoff, cell_33, pbc_3)
    vec = pos_l[ei[0]] - pos_l[ei[1]]
    if cell_33 is not None:
        vec = vec + sh.to(dtype) @ cell_33.to(dtype)
    e_owned = net.atomic_energies(z_l, ei, vec)[:n].sum()
    (g,) = torch.autograd.grad(e_owned, [pos_l])
    f = -g.double()
    f_owned = f[:n].clone()
    if world > 1:
        back = _send_back(f[n:], recv, send, group)
        f_owned.index_add_(0, idx_h[order], back)
    return e_owned.detach().double(), f_owned


def _check_decomposable(cfg, who: str) -> None:
    # a per-molecule mean of atomic energies is not a sum of per-rank parts
    if cfg.reduce_op == "mean":
        raise ValueError(f"{who}: reduce_op='mean' is not decomposable; expected 'add' or 'sum'")


def domain_energy_forces(model, z_N: Tensor, pos_N3: Tensor, cell_33: Tensor | None = None,
                         pbc_3: Tensor | None = None, group=None) -> tuple[Tensor, Tensor]:
    """Total energy [] and forces [N, 3] of one system given on every rank, computed sharded
    over the process group (each rank keeps its slab's atoms, ``sharded_energy_forces``)."""
    _check_decomposable(model.cfg, "domain_energy_forces")
    periodic = cell_33 is not None and pbc_3 is not None and bool(torch.as_tensor(pbc_3).any())
    cell = cell_33.double() if periodic else None
    rank, world = _rank_world(group)
    slabs = Slabs.for_system(pos_N3, world, cell)
    mine = (slabs.owner(pos_N3) == rank).nonzero().squeeze(1)
    e, f = sharded_energy_forces(model, z_N[mine], pos_N3[mine], slabs,
                                 model.cfg.num_layers * model.cfg.cutoff, cell,
                                 pbc_3 if periodic else None, pos_N3.dtype, group)
    forces = pos_N3.new_zeros(pos_N3.shape, dtype=torch.float64).index_add_(0, mine, f)
    energy = e.reshape(1)
    if world > 1:
        dist.all_reduce(forces, group=group)
        dist.all_reduce(energy, group=group)
    return energy[0] + model.mean, forces.to(pos_N3.dtype)


class DomainMD:
    """MD with the atoms sharded over the ranks of ``group`` (module docstring): velocity Verlet
    (``ensemble="nve"``) or Langevin BAOAB (``"nvt"``), the same updates as
    ``integrators.VelocityVerlet`` / ``LangevinBAOAB`` applied to each rank's atoms. The
    Langevin noise of atom i is row i of the one-process draw ``randn(N, 3)``, so the trajectory
    equals one process's for any number of ranks.

    ``run(n)`` is collective; ``step``, ``epot``, ``ekin``, ``temperature`` are then global on
    every rank (no communication when read); ``x``,
    ``v``, ``f`` (whole system, atom order of the input) after ``gather()``, a collective that
    leaves them on rank 0 only.

    Args:
        potential: model, elements, cell and dtype (its neighbour list is not used: each rank
            builds its own local graph per evaluation); eager evaluation, edge chunks apply.
        positions_N3, masses_N, velocities_N3: the whole system, identical on every rank.
        generator: Langevin noise (every rank holds the same generator state).
    """

    def __init__(self, potential: Potential, positions_N3: Tensor, masses_N: Tensor,
                 velocities_N3: Tensor | None, dt_fs: float, ensemble: str = "nve",
                 temperature_K: float = 0.0, friction_per_fs: float = 0.01,
                 generator: torch.Generator | None = None, max_force: float = 1e3, group=None):
        if not dt_fs > 0:
            raise ValueError(f"dt={dt_fs} fs; expected > 0")
        if ensemble not in ("nve", "nvt"):
            raise ValueError(f"ensemble={ensemble!r}; expected 'nve' or 'nvt'")
        if potential.num_graphs > 1:
            raise ValueError(f"DomainMD: {potential.num_graphs} molecules in batch_N; expected "
                             "one system")
        _check_decomposable(potential.model.cfg, "DomainMD")
        self.pot, self.group = potential, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        x = torch.as_tensor(positions_N3, dtype=torch.float64)
        self.N = x.shape[0]
        self.slabs = Slabs.for_system(x, self.world, potential.cell)
        self.halo = potential.model.cfg.num_layers * potential.cutoff
        mine = (self.slabs.owner(x) == self.rank).nonzero().squeeze(1)
        m = torch.as_tensor(masses_N, dtype=torch.float64)
        v = (torch.zeros_like(x) if velocities_N3 is None
             else torch.as_tensor(velocities_N3, dtype=torch.float64))
        # owned state: global id, atomic number, mass [n, 1], position, velocity, force
        self.gid, self.z, self.m = mine, potential.numbers[mine], m[mine].unsqueeze(1)
        self.xo, self.vo = x[mine].clone(), v[mine].clone()
        self.dt, self.dt_fs, self.max_force = dt_fs * FS, dt_fs, max_force
        self.nvt = ensemble == "nvt"
        if self.nvt:
            if temperature_K < 0:
                raise ValueError(f"temperature={temperature_K} K; expected >= 0")
            if friction_per_fs < 0:
                raise ValueError(f"friction={friction_per_fs} 1/fs; expected >= 0")
            self.c1 = math.exp(-friction_per_fs * dt_fs)
            self.c2 = math.sqrt(1.0 - self.c1 ** 2)
            self.kT = KB * temperature_K
            self.gen = generator
        self.step = 0
        self.x = self.v = self.f = None
        self._evaluate()
        self._sum_ekin()

    # ------------------------------------------------------------------ collectives
    def _migrate(self) -> None:
        owner = self.slabs.owner(self.xo)
        if self.world > 1:
            rows = torch.cat([self.gid.double().unsqueeze(1), self.z.double().unsqueeze(1),
                              self.m, self.xo, self.vo], dim=1)
            got = _all_to_all(rows, owner, self.world, self.group)[0]
            self.gid, self.z, self.m = got[:, 0].long(), got[:, 1].long(), got[:, 2:3]
            self.xo, self.vo = got[:, 3:6].contiguous(), got[:, 6:9].contiguous()

    def _evaluate(self) -> None:
        self._migrate()
        pot = self.pot
        e, self.fo = sharded_energy_forces(pot.net, self.z, self.xo, self.slabs, self.halo,
                                           pot.cell, pot.pbc, pot.dtype, self.group)
        pot.nlist.builds += 1  # one fresh local graph per evaluation
        fmax = float(self.fo.abs().max()) if self.fo.numel() else 0.0
        stats = torch.tensor([fmax if math.isfinite(fmax) else math.inf], dtype=torch.float64)
        energy = e.reshape(1).clone()
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(energy, group=self.group)
        fmax, self._epot = float(stats[0]), float(energy[0] + pot.e0_B[0])
        check_stability(self.step, fmax, self._epot, self.max_force)  # same on every rank

    def gather(self) -> None:
        """Collect x, v, f of the whole system on rank 0 (None on the others)."""
        rows = torch.cat([self.gid.double().unsqueeze(1), self.xo, self.vo, self.fo], dim=1)
        count = torch.tensor([rows.shape[0]])
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count, group=self.group)
        cap = max(int(c) for c in counts)
        padded = torch.cat([rows, rows.new_zeros(cap - rows.shape[0], rows.shape[1])])
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, 0)
                    if self.group is not None else 0, group=self.group)
        if self.rank != 0:
            self.x = self.v = self.f = None
            return
        allrows = torch.cat([p[:int(c)] for p, c in zip(parts, counts)])
        full = allrows.new_empty(self.N, allrows.shape[1])
        full[allrows[:, 0].long()] = allrows
        self.x, self.v, self.f = full[:, 1:4], full[:, 4:7], full[:, 7:10]

    # ------------------------------------------------------------------ integration
    @property
    def epot(self) -> float:
        return self._epot

    @property
    def ekin(self) -> float:
        return self._ekin

    def _sum_ekin(self) -> None:
        e = (0.5 * self.m * self.vo * self.vo).sum().reshape(1)
        dist.all_reduce(e, group=self.group)
        self._ekin = float(e[0])

    @property
    def temperature(self) -> float:
        return 2.0 * self.ekin / (3 * self.N * KB) if self.N else 0.0

    def _step(self) -> None:
        h = 0.5 * self.dt
        self.vo += h * self.fo / self.m                                  # B
        if self.nvt:
            self.xo += h * self.vo                                       # A
            noise = torch.randn((self.N, 3), generator=self.gen, dtype=torch.float64)[self.gid]
            sigma = torch.sqrt(self.kT / self.m)
            self.vo = self.c1 * self.vo + self.c2 * sigma * noise        # O
            self.xo += h * self.vo                                       # A
        else:
            self.xo += self.dt * self.vo                                 # drift
        self._evaluate()                                                 # migrate + forces
        self.vo += h * self.fo / self.m                                  # B
        self._sum_ekin()

    def run(self, n_steps: int) -> None:
        for _ in range(n_steps):
            self._step()
            self.step += 1
