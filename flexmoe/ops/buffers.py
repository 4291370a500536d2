"""Reuse the memory of large tensors from one training step to the next.

CPU PyTorch has no caching allocator: glibc serves allocations above its mmap threshold (at
most 32 MB) with fresh pages from the kernel, and trims the top of its heap when much memory is
freed at once, so the large tensors of every step come back as fresh pages, a page fault per
4 KB. Two kinds of tensor of the per-expert kernel are large:

* the stacked expert weight gradients (``w1.grad`` is ``[E, model_dim, hidden_dim]``: 64 MB for
  64 experts of 256 x 1024 in float32), measured at ~6% of a 64-expert layer's forward+backward
  (``benchmarks/layer.py``), time that a model with one small weight per expert never pays;
* each expert's ``[rows, hidden_dim]`` activations (pre-activation, activation, gate input,
  saved for backward) and the same-sized temporaries of its backward: 32 MB each for an expert
  that receives 4000 rows of hidden 2048, measured at ~3% of a skewed 8-expert layer's step.

CUDA's caching allocator already reuses memory; this does the same for these tensors on any
device. A buffer is handed out again only when nothing but this cache refers to its memory:
a gradient after ``optimizer.zero_grad()`` (``set_to_none=True``, PyTorch's default) has dropped
it, an activation after the backward that used it. A gradient the user still holds (``g =
w.grad``, ``zero_grad(set_to_none=False)``, accumulation over micro-batches) or activations
still saved for a pending backward (two forwards before one backward, ``retain_graph=True``)
are never overwritten: a new buffer is allocated instead. The cost is memory: the cache keeps
one step's worth of these tensors between steps (:meth:`BufferCache.clear` frees it; the experts'
``eval()`` does).
"""

from __future__ import annotations

import torch

# torch's count of the tensors that share a storage; without it (another torch), never reuse.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

# Row buffers grow with this slack, so that a load that wanders up by a few rows per step does
# not reallocate every time.
_GROWTH = 1.25


def _users(tensor: torch.Tensor) -> int:
    return _storage_use_count(tensor.untyped_storage()._cdata)


class BufferCache:
    """Named buffers reused across steps (see the module docstring).

    Not saved with a module: pickling or copying one gives an empty cache."""

    def __init__(self) -> None:
        # name -> (buffer, storage users counted when only this cache held it)
        self._buffers: dict[object, tuple[torch.Tensor, int]] = {}

    def _free(self, name: object) -> torch.Tensor | None:
        cached = self._buffers.get(name)
        if cached is None:
            return None
        buffer, alone = cached
        return buffer if _users(buffer) == alone else None

    def _keep(self, name: object, buffer: torch.Tensor) -> None:
        if _storage_use_count is not None:
            self._buffers[name] = (buffer, _users(buffer))

    def take(self, name: object, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped as ``like``: the cached one for ``name`` when no one
        else uses its memory, else a new one (which the cache keeps from then on)."""
        buffer = self._free(name)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
            self._keep(name, buffer)
        # Hand out a view, never the cached tensor itself: autograd's AccumulateGrad then keeps it
        # as ``.grad`` as it is (a tensor referenced elsewhere would be cloned first).
        return buffer.view(buffer.shape)

    def take_rows(self, name: object, rows: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``[rows, like.shape[-1]]`` tensor of ``like``'s dtype and device, a
        view of the cached buffer for ``name`` when it is free and large enough, else of a new
        one with some room to grow (which the cache keeps from then on)."""
        cols = like.shape[-1]
        buffer = self._free(name)
        if buffer is None or buffer.numel() < rows * cols or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = like.new_empty(int(rows * _GROWTH) * cols)
            self._keep(name, buffer)
        return buffer[: rows * cols].view(rows, cols)

    def clear(self) -> None:
        """Free the cached memory (the tensors handed out stay valid)."""
        self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)

    def __getstate__(self) -> dict:
        return {"_buffers": {}}

    def __deepcopy__(self, memo: dict) -> BufferCache:
        return BufferCache()
