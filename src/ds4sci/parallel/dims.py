"""The parallel layout of a job: how many ranks go to pipeline, data, sequence and tensor
parallelism, checked against the world size, and the named ``DeviceMesh`` that hands out each
axis's process group (after torchtitan's ``ParallelDims``).

Mesh axes, outermost first: ``pp``, ``dp``, ``sp``, ``tp``. Tensor parallelism is innermost
because it communicates in every layer's forward and backward (neighbouring ranks, same node);
pipeline is outermost because it only passes activations between stages. Sequence parallelism in
``hybrid`` mode is itself two axes, ``ring`` (outer) x ``ulysses`` (inner): the all-to-all of
Ulysses moves the most bytes, so its ranks are the closest. Flattened axes: ``sp`` (ring x
ulysses, hybrid only) and ``dp_sp`` (dp x sp): FSDP shards over ``dp_sp`` (every rank of a
sequence-parallel group holds the same weights) and the loss is reduced over it.

Rank numbering: a rank's sequence-parallel rank is ``ring_rank * ulysses + ulysses_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

SP_MODES = ("ulysses", "ring", "hybrid")
MESH_AXES = ("pp", "dp", "sp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each kind of parallelism; ``dp * sp * tp * pp == world_size``."""

    dp: int = -1
    """Data-parallel degree (FSDP shards over dp x sp); -1 infers it from the others."""
    sp: int = 1
    """Sequence-parallel degree: ranks that share one sequence."""
    tp: int = 1
    """Tensor-parallel degree: ranks that split each layer's heads and MLP columns."""
    pp: int = 1
    """Pipeline-parallel degree: number of stages the layers are split into."""
    world_size: int = 1
    """Number of processes in the job."""
    sp_mode: str = "ulysses"
    """How attention runs on a sequence shard: ``ulysses`` (all-to-all to head shards),
    ``ring`` (K/V passed around a ring) or ``hybrid`` (ring of Ulysses groups)."""
    sp_ulysses: int | None = None
    """Ulysses degree inside ``hybrid`` (must divide sp; the ring degree is sp / sp_ulysses).
    Ignored-but-checked for the other modes: ulysses mode uses sp, ring mode uses 1."""

    def __post_init__(self):
        for name in ("sp", "tp", "pp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelDims: {name}={value!r}; expected an integer >= 1")
        if not isinstance(self.dp, int) or isinstance(self.dp, bool) or (self.dp < 1 and self.dp != -1):
            raise ValueError(f"ParallelDims: dp={self.dp!r}; expected an integer >= 1, or -1 to infer it")
        if self.sp_mode not in SP_MODES:
            raise ValueError(f"ParallelDims: sp_mode={self.sp_mode!r}; expected one of {SP_MODES}")
        ws = self.world_size
        for name in ("pp", "tp", "sp"):
            value = getattr(self, name)
            if ws % value:
                raise ValueError(f"ParallelDims: {name}={value} does not divide world size {ws}: the job has {ws} "
                                 f"processes (torchrun --nproc-per-node) and dp*sp*tp*pp must equal that")
        others = self.sp * self.tp * self.pp
        if self.dp == -1:
            if ws % others:
                raise ValueError(
                    f"ParallelDims: sp*tp*pp = {self.sp}*{self.tp}*{self.pp} = {others} does not divide "
                    f"world size {ws}, so dp cannot be inferred"
                )
            object.__setattr__(self, "dp", ws // others)
        elif ws % self.dp:
            raise ValueError(f"ParallelDims: dp={self.dp} does not divide world size {ws}: the job has {ws} "
                             f"processes (torchrun --nproc-per-node) and dp*sp*tp*pp must equal that")
        if self.dp * others != ws:
            raise ValueError(
                f"ParallelDims: dp*sp*tp*pp = {self.dp}*{self.sp}*{self.tp}*{self.pp} = {self.dp * others}; "
                f"it must equal the world size {ws} (pass dp=-1 to infer dp)"
            )
        if self.sp_mode == "hybrid":
            if self.sp_ulysses is None:
                raise ValueError(
                    f"ParallelDims: sp_mode='hybrid' needs sp_ulysses, the Ulysses degree (a divisor of "
                    f"sp={self.sp}; the ring degree is sp / sp_ulysses)"
                )
            if not isinstance(self.sp_ulysses, int) or self.sp_ulysses < 1 or self.sp % self.sp_ulysses:
                raise ValueError(
                    f"ParallelDims: sp_ulysses={self.sp_ulysses!r} does not divide sp={self.sp}; "
                    "hybrid sequence parallelism needs sp = ring x ulysses"
                )
        elif self.sp_ulysses is not None and self.sp_ulysses != self.ulysses:
            raise ValueError(
                f"ParallelDims: sp_ulysses={self.sp_ulysses} is only chosen freely with sp_mode='hybrid'; "
                f"sp_mode={self.sp_mode!r} with sp={self.sp} implies sp_ulysses={self.ulysses}"
            )

    # ----- degrees -----
    @property
    def ulysses(self) -> int:
        """Ulysses (all-to-all) degree within the sequence-parallel group."""
        if self.sp_mode == "ulysses":
            return self.sp
        if self.sp_mode == "ring":
            return 1
        return self.sp_ulysses

    @property
    def ring(self) -> int:
        """Ring (context-parallel) degree within the sequence-parallel group."""
        return self.sp // self.ulysses

    @property
    def dp_sp(self) -> int:
        """Size of the FSDP / loss-reduction group."""
        return self.dp * self.sp

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def is_single(self) -> bool:
        """True when the job is one process doing everything (no mesh needed)."""
        return self.world_size == 1

    def describe(self) -> str:
        """Short human-readable layout, e.g. ``dp=2 sp=2(ulysses) tp=1 pp=1``."""
        sp = f"{self.sp}({self.sp_mode}"
        sp += f" {self.ring}x{self.ulysses})" if self.sp_mode == "hybrid" else ")"
        return f"dp={self.dp} sp={sp} tp={self.tp} pp={self.pp}"

    # ----- meshes -----
    def build_mesh(self, device_type: str = "cpu") -> ParallelMesh:
        """Create the job's ``DeviceMesh`` (needs an initialised default process group whose size
        is ``world_size``) and return it wrapped with named sub-mesh accessors."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ParallelDims.build_mesh: torch.distributed is not initialised; launch with torchrun "
                "(or call ds4sci.train.distributed.init_distributed first)"
            )
        actual = dist.get_world_size()
        if actual != self.world_size:
            raise ValueError(
                f"ParallelDims.build_mesh: the process group has {actual} ranks but world_size="
                f"{self.world_size}"
            )
        if self.sp_mode == "hybrid":
            names = ("pp", "dp", "ring", "ulysses", "tp")
            shape = (self.pp, self.dp, self.ring, self.ulysses, self.tp)
        else:
            names = MESH_AXES
            shape = (self.pp, self.dp, self.sp, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        # Flattened meshes are kept here rather than sliced from the root later (slicing a
        # flattened axis from the root mesh is deprecated in PyTorch).
        sp_axes = ("ring", "ulysses") if self.sp_mode == "hybrid" else ("sp",)
        flat = {"dp_sp": mesh[("dp", *sp_axes)]._flatten("dp_sp")}
        if self.sp_mode == "hybrid":
            flat["sp"] = mesh[sp_axes]._flatten("sp")
        return ParallelMesh(self, mesh, flat)


@dataclass(frozen=True)
class ParallelMesh:
    """A built mesh with named accessors; ``mesh[name]`` is the 1-D sub-mesh of one axis."""

    dims: ParallelDims
    mesh: DeviceMesh
    """The root mesh: axes ``pp, dp, sp, tp`` (``pp, dp, ring, ulysses, tp`` in hybrid mode)."""
    flat: dict[str, DeviceMesh]
    """Flattened axes: ``dp_sp`` always, ``sp`` in hybrid mode."""

    def __getitem__(self, name: str) -> DeviceMesh:
        if name == "ulysses" and self.dims.sp_mode != "hybrid":
            name = "sp" if self.dims.sp_mode == "ulysses" else None
        if name == "ring" and self.dims.sp_mode != "hybrid":
            name = "sp" if self.dims.sp_mode == "ring" else None
        if name is None:
            raise KeyError(f"ParallelMesh: no such axis in sp_mode={self.dims.sp_mode!r}")
        if name in self.flat:
            return self.flat[name]
        if name not in (self.mesh.mesh_dim_names or ()):
            raise KeyError(f"ParallelMesh: no axis named {name!r}; axes are "
                           f"{tuple(self.mesh.mesh_dim_names) + tuple(self.flat)}")
        return self.mesh[name]

    @property
    def pp(self) -> DeviceMesh:
        return self["pp"]

    @property
    def dp(self) -> DeviceMesh:
        return self["dp"]

    @property
    def sp(self) -> DeviceMesh:
        return self["sp"]

    @property
    def tp(self) -> DeviceMesh:
        return self["tp"]

    @property
    def dp_sp(self) -> DeviceMesh:
        """Flattened dp x sp mesh: FSDP sharding and loss reduction."""
        return self["dp_sp"]

    @property
    def ulysses(self) -> DeviceMesh | None:
        """The Ulysses all-to-all mesh (the whole sp mesh in ulysses mode; None in ring mode)."""
        return None if self.dims.sp_mode == "ring" else self["ulysses"]

    @property
    def ring(self) -> DeviceMesh | None:
        """The ring mesh (the whole sp mesh in ring mode; None in ulysses mode)."""
        return None if self.dims.sp_mode == "ulysses" else self["ring"]

    def group(self, name: str) -> dist.ProcessGroup:
        """Process group of one axis (``pp``, ``dp``, ``sp``, ``tp``, ``dp_sp``, ``ulysses``, ``ring``)."""
        return self[name].get_group()

    def local_rank(self, name: str) -> int:
        """This rank's coordinate along one axis."""
        return self[name].get_local_rank()

    @property
    def sp_rank(self) -> int:
        return self.local_rank("sp")

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")
