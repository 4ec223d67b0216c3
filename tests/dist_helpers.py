"""Test helper: run a function in N local gloo processes and collect what each rank returns.

Shared by the distributed tests (sequence, FSDP/TP/PP, training). Processes are forked, not
spawned, so a case costs milliseconds to start rather than a fresh ``import torch`` per rank
(DataLoader workers fork the same way after the parent has run torch ops). The function may be a
closure or a lambda for that reason.

    results = run_distributed(fn, 2, x)   # fn(rank, world_size, x) on ranks 0 and 1
    results[1]                             # what rank 1 returned (tensors, dicts, ...)

A rank that raises fails the call with a ``RuntimeError`` carrying every failed rank's traceback,
the first failure first, and the other ranks are killed; a
job that does not finish within ``timeout`` seconds is killed and raises ``TimeoutError``, so a
collective that never completes cannot hang the suite.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, fn, world_size, store_dir, args, kwargs, pg_timeout):
    # One intra-op thread per rank: several ranks share the machine's few cores.
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=pg_timeout))
    try:
        result = fn(rank, world_size, *args, **kwargs)
        torch.save(result, os.path.join(store_dir, f"result{rank}.pt"))
    except BaseException:
        # Time-stamped, so the parent can report the rank that failed first (the others usually
        # fail after it, with "connection closed by peer").
        with open(os.path.join(store_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _first_errors(store_dir, world_size, grace=2.0):
    """The ranks' tracebacks, earliest failure first (waiting up to ``grace`` seconds for the
    ranks still failing to write theirs)."""
    paths = [os.path.join(store_dir, f"error{r}.txt") for r in range(world_size)]
    end = time.monotonic() + grace
    while time.monotonic() < end and not all(os.path.exists(p) for p in paths):
        time.sleep(0.05)
    errors = []
    for rank, path in enumerate(paths):
        if os.path.exists(path):
            with open(path) as f:
                stamp, _, text = f.read().partition("\n")
            errors.append((float(stamp), rank, text))
    errors.sort()
    return "\n".join(f"rank {rank} failed{' first' if i == 0 else ''}:\n{text}"
                     for i, (_, rank, text) in enumerate(errors))


def run_distributed(fn, world_size: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0,
                    **kwargs) -> list:
    """``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; returns the list of
    their return values, by rank.

    ``timeout``: seconds for the whole job before every rank is killed; ``pg_timeout``: the
    process group's collective timeout, so a rank waiting on a dead peer raises instead of waiting.
    """
    with tempfile.TemporaryDirectory(prefix="ds4sci_dist_") as store_dir:
        ctx = mp.start_processes(_entry, args=(fn, world_size, store_dir, args, kwargs, pg_timeout),
                                 nprocs=world_size, join=False, start_method="fork")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.05, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"run_distributed: {world_size} ranks of {fn!r} did not "
                                       f"finish within {timeout:.0f} s")
        except mp.ProcessRaisedException as e:
            raise RuntimeError(_first_errors(store_dir, world_size)) from e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(os.path.join(store_dir, f"result{r}.pt"), weights_only=False)
                for r in range(world_size)]


# ----- comparing whole training runs (the trainer's layouts against one process) ---------------

# Parameters after the steps: Adam turns a rounding-level difference in a gradient that is zero
# in exact arithmetic (e.g. a key bias: softmax ignores a constant shift) into an update of up to
# lr, so parameters are compared at a few lr (a wrong gradient shows in the losses first).
PARAM_ATOL = 1e-2


def run_summary(trainer, rows, metric: str) -> dict:
    """Losses, gradient norms, the last validation ``metric`` and the whole parameters of a run
    (gathered from shards; a pipeline stage's rank holds only its stage's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = trainer._trained_module()
    if hasattr(trainer, "dims"):
        params = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    else:
        params = module.state_dict()
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
            metric: rows[-1].get(metric), "params": {k: v.detach().clone() for k, v in params.items()}}


def assert_same_run(ref: dict, results: list[dict], metric: str, min_steps: int = 3) -> None:
    """Every rank's run equals the one-process ``ref`` (losses, norms, metric, parameters)."""
    import pytest

    assert ref[metric] is not None and len(ref["loss"]) >= min_steps
    params = {}
    for res in results:  # pipeline stages each hold some of the parameters
        params.update(res["params"])
    for res in results:
        assert res["loss"] == pytest.approx(ref["loss"], rel=2e-5), "loss curve differs"
        assert res["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert res[metric] == pytest.approx(ref[metric], rel=2e-5)
    assert params.keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        torch.testing.assert_close(params[name], value, atol=PARAM_ATOL, rtol=0, msg=name)
