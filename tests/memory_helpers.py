"""Test helper: the largest tensor any aten op creates while a block runs."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestAllocation(TorchDispatchMode):
    """``with LargestAllocation() as mode: ...``; then ``mode.largest`` is the largest numel."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class PeakLiveBytes(TorchDispatchMode):
    """``with PeakLiveBytes() as mode: ...``; then ``mode.peak`` is the most bytes of tensor storage
    created inside the block that were alive at one time (freed storages are seen through
    finalizers, so this counts what autograd keeps, not only what ops return)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key, nbytes):
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self._tracked:
                    self._tracked.add(id(storage))
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out
