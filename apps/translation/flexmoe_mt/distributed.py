"""Training the translation model under ``torchrun``: who does what, and the checkpoint bridge.

Under ``torchrun`` (``torch.distributed`` initialised with more than one rank) every MoE layer
of the model shards its experts over the world group (expert parallelism: the trainer passes
the world group to :class:`flexmoe.MoELayer`), and each rank trains on its share of every batch:

* every rank draws the same global batch of ``train.batch_size`` pairs (one sampler, one seed)
  and takes every ``world_size``-th pair from its rank on, so the run sees the same data as a
  single-process run with the same batch size;
* each rank scales its mean token loss by ``world_size * its tokens / all tokens``; replicated
  gradients are averaged (:func:`flexmoe.parallel.allreduce_non_expert_grads`) and expert
  gradients arrive averaged from the layers, so the update is the single-process update on the
  whole batch (up to the order of sums; the balance loss is each rank's own, averaged);
* gradient clipping uses the norm of the whole gradient (:func:`flexmoe.parallel.clip_grad_norm_`);
* the step budget is agreed: all ranks stop at the same step.

Checkpoints stay in the single-process format (``checkpoint.pt``, full experts), so evaluation,
extraction and a resume at any world size (single-process included) read them unchanged: every
rank writes its shards with :func:`flexmoe.checkpoint.save_checkpoint` into ``shards/`` and rank
0 reads them back into a single-process copy of the model, which it also validates and plots.
Rank 0 alone writes files; ``train.run_dir`` must be on a filesystem every rank sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from flexmoe.parallel.data_parallel import non_expert_parameters

T = TypeVar("T")


@dataclass(frozen=True)
class RunGroup:
    """This process's place in the run: rank 0 of 1 without ``torch.distributed``."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> RunGroup:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the others (which then find what rank 0 built and cached)."""
        if self.is_main:
            result = fn()
            self.barrier()
            return result
        self.barrier()
        return fn()

    def totals(self, *values: float) -> list[float]:
        """Each value summed over the ranks (one collective)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any."""
        return self.totals(float(bool(flag)))[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        objects: list[Any] = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def broadcast_replicated(self, model: nn.Module) -> None:
        """Rank 0's replicated parameters and buffers on every rank (the experts stay each rank's own)."""
        if not self.distributed:
            return
        for _, param in non_expert_parameters(model):
            dist.broadcast(param.data, 0)
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
