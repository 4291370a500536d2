"""flexmoe inside PyTorch's distributed stack: DTensor experts on a DeviceMesh, FSDP2, DDP.

Checkpoints go through ``torch.distributed.checkpoint`` (:mod:`flexmoe.checkpoint`).
"""

from flexmoe.distributed.ddp import exclude_experts_from_ddp
from flexmoe.distributed.experts import distribute_experts
from flexmoe.distributed.fsdp import apply_fsdp
from flexmoe.distributed.optim import parameter_groups
from flexmoe.distributed.placements import ExpertPlacement, expert_mesh, expert_placement, local_tensor

__all__ = [
    "ExpertPlacement",
    "apply_fsdp",
    "distribute_experts",
    "exclude_experts_from_ddp",
    "expert_mesh",
    "expert_placement",
    "local_tensor",
    "parameter_groups",
]
