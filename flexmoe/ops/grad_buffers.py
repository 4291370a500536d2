"""Reuse the memory of large gradients from one backward pass to the next.

The expert weights are stored stacked (``w1`` is ``[E, model_dim, hidden_dim]``), so their
gradients are large single tensors (64 MB for 64 experts of 256 x 1024 in float32). glibc
serves allocations above its mmap threshold (at most 32 MB) with fresh pages from the kernel
and returns them on free, so every backward pays a page fault per 4 KB of gradient: measured at
~6% of a 64-expert layer's forward+backward on CPU (``benchmarks/layer.py``), time that a model
with one small weight per expert never pays. CUDA's caching allocator already reuses memory;
this does the same for these few tensors on any device.

A buffer is handed out again only when nothing but this cache refers to its memory: after
``optimizer.zero_grad()`` (``set_to_none=True``, PyTorch's default) has dropped the last
gradient. A gradient the user still holds (``g = w.grad``, ``zero_grad(set_to_none=False)``,
gradient accumulation over micro-batches) is never overwritten: a new buffer is allocated
instead. The cost is memory: the cache keeps one gradient's worth per weight between steps
(:meth:`GradientBuffers.clear` frees it).
"""

from __future__ import annotations

import torch

# torch's count of the tensors that share a storage; without it (another torch), never reuse.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _users(tensor: torch.Tensor) -> int:
    return _storage_use_count(tensor.untyped_storage()._cdata)


class GradientBuffers:
    """Named gradient buffers reused across backward passes (see the module docstring).

    Not saved with a module: pickling or copying one gives an empty cache."""

    def __init__(self) -> None:
        # name -> (buffer, storage users counted when only this cache held it)
        self._buffers: dict[str, tuple[torch.Tensor, int]] = {}

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped as ``like``: the cached one for ``name`` when no one
        else uses its memory, else a new one (which the cache keeps from then on)."""
        cached = self._buffers.get(name)
        if cached is not None:
            buffer, alone = cached
            same = buffer.shape == like.shape and buffer.dtype == like.dtype and buffer.device == like.device
            if same and _users(buffer) == alone:
                return buffer.view(buffer.shape)
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        if _storage_use_count is None:
            return buffer
        self._buffers[name] = (buffer, _users(buffer))
        # Hand out a view, never the cached tensor itself: autograd's AccumulateGrad then keeps it
        # as ``.grad`` as it is (a tensor referenced elsewhere would be cloned first).
        return buffer.view(buffer.shape)

    def clear(self) -> None:
        """Free the cached memory (the gradients handed out stay valid)."""
        self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)

    def __getstate__(self) -> dict:
        return {"_buffers": {}}

    def __deepcopy__(self, memo: dict) -> GradientBuffers:
        return GradientBuffers()
