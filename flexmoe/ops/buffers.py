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
device. A buffer is handed out again only when the tensor last handed out for it is gone: a
gradient after ``optimizer.zero_grad()`` (``set_to_none=True``, PyTorch's default) has dropped
it, an activation after the backward that used it. Weak references say so: autograd keeps the
very tensor it saved; a parameter's ``.grad`` is an alias of the tensor handed out, seen by a
post-accumulate-grad hook the cache puts on the parameter. A gradient the user still holds (``g =
w.grad``, ``zero_grad(set_to_none=False)``, accumulation over micro-batches) or activations
still saved for a pending backward (two forwards before one backward, ``retain_graph=True``)
are never overwritten: a new buffer is allocated instead. Only the handed-out tensor is tracked:
a view of it kept after the tensor itself is gone (``g = w.grad[0]``, then ``zero_grad()``)
may be overwritten by a later step.

The cost is memory, bounded by the last step's needs: :meth:`BufferCache.new_step` (called at
each training forward) forgets the buffers the previous step did not use and those more than
twice as large as it asked for (a long batch does not keep its memory for the short ones after
it). :meth:`BufferCache.clear` frees everything (the experts'
``eval()`` does).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

# Row buffers grow with this slack, so that a load that wanders up by a few rows per step does
# not reallocate every time; one more than _SHRINK times larger than a step asked for is dropped.
_GROWTH = 1.25
_SHRINK = 2.0


class BufferCache:
    """Named buffers reused across steps (see the module docstring).

    Not saved with a module: pickling or copying one gives an empty cache."""

    def __init__(self) -> None:
        # name -> (buffer, weak references to its users: the tensor handed out, the .grad alias)
        self._buffers: dict[object, tuple[torch.Tensor, list[weakref.ref]]] = {}
        self._taken: dict[object, int] = {}  # name -> most elements asked for since new_step()
        self._hooked: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameters whose .grad is tracked

    def _free(self, name: object) -> torch.Tensor | None:
        cached = self._buffers.get(name)
        if cached is None:
            return None
        buffer, users = cached
        return buffer if all(user() is None for user in users) else None

    def _hand_out(self, name: object, buffer: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        self._buffers[name] = (buffer, [weakref.ref(view)])
        self._taken[name] = max(self._taken.get(name, 0), view.numel())
        return view

    def take(self, name: object, like: torch.Tensor, grad_of: torch.Tensor | None = None) -> torch.Tensor:
        """An uninitialised tensor shaped as ``like``: the cached one for ``name`` when no one
        else uses its memory, else a new one (which the cache keeps from then on).
        ``grad_of``: the tensor whose gradient this is; when it is a leaf, its ``.grad`` (an
        alias autograd makes of the tensor handed out) keeps the buffer in use while it lives."""
        buffer = self._free(name)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        if grad_of is not None and grad_of.is_leaf and grad_of.requires_grad and grad_of not in self._hooked:
            track = lambda parameter, name=name: self._track(name, parameter)  # noqa: E731
            self._hooked[grad_of] = grad_of.register_post_accumulate_grad_hook(track)
        # Hand out a view, never the cached tensor itself: autograd's AccumulateGrad then keeps it
        # (as an alias) as ``.grad`` (a tensor referenced elsewhere would be cloned first).
        return self._hand_out(name, buffer, buffer.view(buffer.shape))

    def _track(self, name: object, parameter: torch.Tensor) -> None:
        # The .grad just accumulated: the alias of the buffer handed out, or (accumulation onto
        # an existing gradient) another tensor, whose tracking only delays the buffer's reuse.
        cached, grad = self._buffers.get(name), parameter.grad
        if cached is not None and grad is not None:
            cached[1].append(weakref.ref(grad))

    def take_rows(self, name: object, rows: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``[rows, like.shape[-1]]`` tensor of ``like``'s dtype and device, a
        view of the cached buffer for ``name`` when it is free and large enough, else of a new one
        with some room to grow (which the cache keeps from then on)."""
        cols = like.shape[-1]
        size = rows * cols
        buffer = self._free(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = like.new_empty(int(rows * _GROWTH) * cols)
        return self._hand_out(name, buffer, buffer[:size].view(rows, cols))

    def new_step(self) -> None:
        """Forget the buffers not taken since the last call (an expert that got no rows, names a
        larger step used) and those more than twice as large as asked for since then: the cache
        holds about what one step uses, not the largest step's."""
        for name, (buffer, _) in list(self._buffers.items()):
            if buffer.numel() > _SHRINK * _GROWTH * self._taken.get(name, 0):
                del self._buffers[name]
        self._taken = {}

    def nbytes(self) -> int:
        """Bytes of the cached buffers."""
        return sum(buffer.nbytes for buffer, _ in self._buffers.values())

    def clear(self) -> None:
        """Free the cached memory (the tensors handed out stay valid)."""
        self._buffers.clear()
        self._taken = {}
        for handle in self._hooked.values():
            handle.remove()
        self._hooked = WeakIdKeyDictionary()

    def __len__(self) -> int:
        return len(self._buffers)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> BufferCache:
        return BufferCache()
