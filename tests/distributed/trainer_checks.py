"""transformers' Trainer under torch.distributed with a model converted with expert parallelism:
DDP inside the Trainer leaves every rank's experts alone, its gradient clipping takes the global
norm (ranks stay in step), training runs, and a flexmoe checkpoint saved from the Trainer's run
restores every rank's experts and Adam state into the optimizer a resuming Trainer builds."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from flexmoe import load_checkpoint, save_checkpoint
from flexmoe.distributed import local_tensor
from flexmoe.integrations.transformers import to_flexmoe
from flexmoe.parallel import expert_parameters
from tests.test_transformers_integration import COMMON


def _model(group=None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return to_flexmoe(model, group=dist.group.WORLD if group is None else group)


def _arguments(directory: str, learning_rate: float, max_grad_norm: float = 0.0) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        directory,
        max_steps=2,
        learning_rate=learning_rate,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        max_grad_norm=max_grad_norm,
    )


def check_trainer(rank: int, world_size: int, directory: str) -> None:
    # What torchrun sets; the Trainer reads it to run distributed (on the group already made).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    generator = torch.Generator().manual_seed(rank)
    dataset = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 10), generator=generator)]

    # Converted on a DeviceMesh: the experts are DTensors on it, holding the same shards.
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    on_mesh = dict(expert_parameters(_model(mesh)))
    for name, param in expert_parameters(_model()):
        assert on_mesh[name].device_mesh == mesh and on_mesh[name].shape == param.shape, name
        torch.testing.assert_close(local_tensor(on_mesh[name]), local_tensor(param), rtol=0, atol=0, msg=name)

    # Learning rate 0: every rank's experts must come out of the Trainer as they went in (a DDP
    # that managed them would have overwritten them with rank 0's).
    model = _model()
    before = {name: local_tensor(param).detach().clone() for name, param in expert_parameters(model)}
    others = [None] * world_size
    dist.all_gather_object(others, before)
    neighbour = others[(rank + 1) % world_size]
    assert any(not torch.equal(before[name], neighbour[name]) for name in before), "ranks hold the same experts"
    transformers.Trainer(model=model, args=_arguments(directory, 0.0), train_dataset=dataset).train()
    for name, param in expert_parameters(model):
        torch.testing.assert_close(local_tensor(param).detach(), before[name], rtol=0, atol=0, msg=name)

    # Gradient clipping (the Trainer's default is on): the norm is the global one, the DTensor
    # experts' counted over every rank, so every rank scales its replicated gradients alike and
    # the replicated parameters stay identical (a norm over each rank's own experts drifts them).
    model = _model()
    clipped = transformers.Trainer(model=model, args=_arguments(directory, 1e-2, 1e-3), train_dataset=dataset)
    clipped.train()
    replicated = {name: param.detach() for name, param in model.named_parameters() if not isinstance(param, DTensor)}
    others = [None] * world_size
    dist.all_gather_object(others, replicated)
    for name, value in replicated.items():
        torch.testing.assert_close(others[(rank + 1) % world_size][name], value, rtol=0, atol=0, msg=name)
    assert all(isinstance(p, DTensor) for _, p in expert_parameters(model))

    # Training, then a flexmoe checkpoint of the model and the Trainer's optimizer, restored.
    model = _model()
    trainer = transformers.Trainer(model=model, args=_arguments(directory, 1e-2), train_dataset=dataset)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    save_checkpoint(f"{directory}/flexmoe", model, trainer.optimizer, extra={"step": trainer.state.global_step})
    # Resuming: the Trainer builds its optimizer as it would (one parameter group per device mesh:
    # DTensor experts, plain rest), the checkpoint is loaded into it, the Trainer goes on with it.
    restored = _model()
    resumed = transformers.Trainer(model=restored, args=_arguments(directory, 1e-2), train_dataset=dataset)
    restored_optimizer = resumed.create_optimizer()
    assert load_checkpoint(f"{directory}/flexmoe", restored, restored_optimizer) == {"step": 2}
    for (name, param), other in zip(model.named_parameters(), restored.parameters()):
        torch.testing.assert_close(other, param, rtol=0, atol=0, msg=name)
    restored_by_name = dict(restored.named_parameters())
    for name, param in model.named_parameters():
        saved_state, loaded_state = trainer.optimizer.state[param], restored_optimizer.state[restored_by_name[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(loaded_state[key], saved_state[key], rtol=0, atol=0, msg=f"{name} {key}")
    assert torch.isfinite(torch.tensor(resumed.train().training_loss))
