"""ParallelDims: validation messages and the mesh it builds (4 gloo ranks)."""

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_distributed
from ds4sci.parallel import ParallelDims


def test_infers_dp_and_degrees():
    d = ParallelDims(world_size=8, sp=2, tp=2)
    assert (d.dp, d.dp_sp, d.ulysses, d.ring) == (2, 4, 2, 1)
    r = ParallelDims(world_size=4, sp=4, sp_mode="ring")
    assert (r.dp, r.ulysses, r.ring) == (1, 1, 4)
    h = ParallelDims(world_size=8, sp=8, sp_mode="hybrid", sp_ulysses=2)
    assert (h.ulysses, h.ring) == (2, 4)
    assert h.describe() == "dp=1 sp=8(hybrid 4x2) tp=1 pp=1"


@pytest.mark.parametrize("kwargs, message", [
    (dict(sp=3), "sp=3 does not divide world size 4"),
    (dict(tp=3), "tp=3 does not divide world size 4"),
    (dict(pp=8), "pp=8 does not divide world size 4"),
    (dict(dp=3), "dp=3 does not divide world size 4"),
    (dict(dp=2, sp=4), "dp*sp*tp*pp = 2*4*1*1 = 8; it must equal the world size 4"),
    (dict(dp=1, sp=2), "dp*sp*tp*pp = 1*2*1*1 = 2; it must equal the world size 4"),
    (dict(tp=0), "tp=0; expected an integer >= 1"),
    (dict(dp=0), "dp=0; expected an integer >= 1, or -1"),
    (dict(sp_mode="zigzag"), "sp_mode='zigzag'; expected one of"),
    (dict(sp=4, sp_mode="hybrid"), "sp_mode='hybrid' needs sp_ulysses"),
    (dict(sp=4, sp_mode="hybrid", sp_ulysses=3), "sp_ulysses=3 does not divide sp=4"),
    (dict(sp=2, sp_mode="ring", sp_ulysses=2), "sp_mode='ring' with sp=2 implies sp_ulysses=1"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        ParallelDims(world_size=4, **kwargs)


def _mesh_report(rank, world_size, kwargs):
    dims = ParallelDims(world_size=world_size, **kwargs)
    pm = dims.build_mesh("cpu")
    names = ["pp", "dp", "sp", "tp", "dp_sp"] + (["ring", "ulysses"] if dims.sp_mode == "hybrid" else [])
    sizes = {n: pm[n].size() for n in names}
    ranks = {n: pm.local_rank(n) for n in names}
    # members of each group, found by an all-gather of global ranks within it
    members = {}
    for n in names:
        out = [torch.zeros(1) for _ in range(pm[n].size())]
        dist.all_gather(out, torch.tensor([float(rank)]), group=pm.group(n))
        members[n] = [int(t.item()) for t in out]
    return sizes, ranks, members


@pytest.mark.parametrize("kwargs, expect_members", [
    # dp x sp: sp groups are neighbouring ranks; dp_sp is everyone
    (dict(sp=2), {"sp": [[0, 1], [0, 1], [2, 3], [2, 3]], "dp": [[0, 2], [1, 3], [0, 2], [1, 3]],
                  "dp_sp": [[0, 1, 2, 3]] * 4}),
    # pp outermost, tp innermost
    (dict(pp=2, tp=2), {"pp": [[0, 2], [1, 3], [0, 2], [1, 3]], "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
                        "dp_sp": [[0], [1], [2], [3]]}),
    # hybrid: ring outer, ulysses inner, sp rank = ring_rank * ulysses + ulysses_rank
    (dict(sp=4, sp_mode="hybrid", sp_ulysses=2),
     {"ulysses": [[0, 1], [0, 1], [2, 3], [2, 3]], "ring": [[0, 2], [1, 3], [0, 2], [1, 3]],
      "sp": [[0, 1, 2, 3]] * 4}),
])
def test_mesh_groups(kwargs, expect_members):
    results = run_distributed(_mesh_report, 4, kwargs)
    for rank, (sizes, ranks, members) in enumerate(results):
        dims = ParallelDims(world_size=4, **kwargs)
        assert sizes["dp_sp"] == dims.dp_sp and sizes["sp"] == dims.sp and sizes["tp"] == dims.tp
        for name, per_rank in expect_members.items():
            assert members[name] == per_rank[rank], (name, rank)
            assert ranks[name] == per_rank[rank].index(rank)
        if dims.sp_mode == "hybrid":
            assert ranks["sp"] == ranks["ring"] * dims.ulysses + ranks["ulysses"]


def test_build_mesh_needs_matching_world():
    with pytest.raises(RuntimeError, match="not initialised"):
        ParallelDims().build_mesh()
    # the rank's ValueError comes back wrapped (with its traceback) by the helper
    with pytest.raises(Exception, match="process group has 2 ranks but world_size=4"):
        run_distributed(lambda r, w: ParallelDims(world_size=4, dp=4).build_mesh(), 2)


def test_every_lazy_export_resolves():
    import ds4sci.parallel as parallel

    for name in parallel.__all__:
        assert callable(getattr(parallel, name)) or name == "SP_MODES", name


def test_hybrid_ulysses_degree_defaults_to_largest_divisor_of_heads():
    from ds4sci.models.genslm.config import preset
    from ds4sci.models.genslm.parallelize import default_sp_ulysses, make_dims
    from ds4sci.train.config import ParallelConfig

    assert default_sp_ulysses(8, 4) == 4    # 4 heads: Ulysses over 4, ring of 2
    assert default_sp_ulysses(6, 4) == 2    # 3 does not divide 4 heads
    assert default_sp_ulysses(2, 4) == 1    # a proper divisor: hybrid keeps a ring
    dims = make_dims(ParallelConfig(sp=8, sp_mode="hybrid"), 8, preset("genslm-tiny"))
    assert (dims.ulysses, dims.ring) == (4, 2)
    dims = make_dims(ParallelConfig(sp=4, tp=2, sp_mode="hybrid"), 8, preset("genslm-tiny"))
    assert (dims.ulysses, dims.ring) == (2, 2)  # 2 heads per tensor-parallel rank
