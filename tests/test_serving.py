"""TaskServer: per-task sub-networks give the full model's outputs, in order, within the bound."""

import pytest
import torch

from flexmoe.serving import CacheBound, Request, TaskServer
from flexmoe.task import load_subnetwork, save_subnetwork
from tests.task_models import MODEL_DIM, NUM_TASKS, tiny_task_model

EXACT = dict(rtol=1e-10, atol=1e-12)


def test_mixed_batch_equals_full_model_in_row_order():
    model = tiny_task_model()
    x = torch.randn(9, 6, MODEL_DIM, dtype=torch.float64)
    task_ids = torch.tensor([3, 0, 3, 1, 4, 0, 3, 2, 1])
    server = TaskServer(model, CacheBound(max_subnetworks=NUM_TASKS))
    out = server(x, task_ids)
    torch.testing.assert_close(out, model(x, task_ids), **EXACT)
    assert server.stats.misses == NUM_TASKS and server.stats.hits == 0 and server.stats.requests == 9
    assert server.stats.resident_subnetworks == NUM_TASKS and not server.serves_whole_model
    # Second batch: every task is resident.
    torch.testing.assert_close(server(x.flip(0), task_ids.flip(0)), model(x, task_ids).flip(0), **EXACT)
    assert server.stats.hits == NUM_TASKS and server.stats.misses == NUM_TASKS


def test_requests_of_mixed_tasks_and_shapes_keep_their_order():
    model = tiny_task_model()
    requests = []
    for i, (task, n, seq) in enumerate([(2, 1, 5), (0, 3, 5), (2, 2, 5), (2, 1, 3), (1, 2, 4), (0, 1, 5)]):
        x = torch.randn(n, seq, MODEL_DIM, dtype=torch.float64)
        mask = torch.zeros(n, seq, dtype=torch.bool)
        mask[0, seq - 1 - i % 2 :] = True  # some padding, different per request
        requests.append(Request(task, x, {"padding_mask": mask}))
    server = TaskServer(model)
    outputs = server.serve(requests)
    assert len(outputs) == len(requests)
    for request, out in zip(requests, outputs):
        ids = torch.full((request.inputs.shape[0],), request.task_id)
        torch.testing.assert_close(out, model(request.inputs, ids, **request.keyword_inputs), **EXACT)
    # Tasks 2 (two shapes), 0 and 1: four model calls, three extractions.
    assert server.stats.groups == 4 and server.stats.misses == 3 and server.stats.requests == len(requests)


def test_float32_mixed_batch():
    model = tiny_task_model(dtype="float32")
    x = torch.randn(6, 4, MODEL_DIM)
    task_ids = torch.tensor([1, 4, 1, 0, 4, 4])
    torch.testing.assert_close(TaskServer(model)(x, task_ids), model(x, task_ids), rtol=1e-5, atol=1e-5)


def test_count_bound_evicts_least_recently_used_and_reextraction_is_identical():
    model = tiny_task_model()
    server = TaskServer(model, CacheBound(max_subnetworks=2))
    x = torch.randn(2, 3, MODEL_DIM, dtype=torch.float64)
    first = {task: server(x, [task, task]) for task in (0, 1)}
    assert server.resident_tasks == [0, 1]
    server(x, [0, 0])  # 0 becomes the most recently used
    server(x, [2, 2])  # evicts 1, not 0
    assert server.resident_tasks == [0, 2] and server.stats.evictions == 1
    again = server(x, [1, 1])  # re-extracted, evicts 0
    assert server.resident_tasks == [2, 1] and server.stats.evictions == 2
    assert server.stats.misses == 4 and server.stats.hits == 1
    torch.testing.assert_close(again, first[1], rtol=0, atol=0)
    one_subnetwork = server.stats.resident_parameter_bytes // 2
    assert server.stats.resident_parameters * 8 == server.stats.resident_parameter_bytes  # float64
    assert one_subnetwork < sum(p.numel() * 8 for p in model.parameters())


def test_resident_tasks_run_before_misses_can_evict_them():
    server = TaskServer(tiny_task_model(), CacheBound(max_subnetworks=1))
    x = torch.randn(2, 3, MODEL_DIM, dtype=torch.float64)
    server(x, [0, 0])
    server(x, [3, 0])  # 0 served from the cache first, then 3 replaces it
    assert (server.stats.hits, server.stats.misses, server.stats.evictions) == (1, 2, 1)


def test_byte_bound():
    model = tiny_task_model()
    probe = TaskServer(model)
    probe.subnetwork(0)
    size = probe.stats.resident_parameter_bytes
    server = TaskServer(model, CacheBound(max_subnetworks=None, max_parameter_bytes=int(2.5 * size)))
    x = torch.randn(1, 3, MODEL_DIM, dtype=torch.float64)
    for task in (0, 1, 2, 3, 1):
        server(x, [task])
        assert server.stats.resident_parameter_bytes <= 2.5 * size
    assert server.resident_tasks == [3, 1] and (server.stats.misses, server.stats.evictions) == (5, 3)
    too_small = TaskServer(model, CacheBound(max_parameter_bytes=size - 1))
    with pytest.raises(ValueError, match="max_parameter_bytes"):
        too_small(x, [0])


def test_subnetworks_loaded_from_disk(tmp_path):
    model = tiny_task_model()
    for task in range(NUM_TASKS):
        save_subnetwork(TaskServer(model).subnetwork(task), tmp_path / str(task))

    def load(_model, task):
        return load_subnetwork(tmp_path / str(task), lambda: tiny_task_model(seed=1))

    x = torch.randn(4, 3, MODEL_DIM, dtype=torch.float64)
    task_ids = torch.tensor([4, 2, 4, 0])
    torch.testing.assert_close(TaskServer(model, extract=load)(x, task_ids), model(x, task_ids), **EXACT)


def test_model_without_task_layers_is_served_whole():
    model = tiny_task_model(task_routed=False)
    server = TaskServer(model)
    assert server.serves_whole_model and "no task-routed" in server.whole_model_reason
    x = torch.randn(5, 3, MODEL_DIM, dtype=torch.float64)
    task_ids = torch.tensor([7, 0, 7, 1, 0])  # the model has no task layer: any id >= 0
    torch.testing.assert_close(server(x, task_ids), model(x, task_ids), **EXACT)
    assert server.stats.resident_subnetworks == 0 and server.stats.misses == 0 and server.stats.groups == 3


def test_bad_input():
    with pytest.raises(ValueError, match="max_subnetworks"):
        CacheBound(max_subnetworks=0)
    with pytest.raises(ValueError, match="max_parameter_bytes"):
        CacheBound(max_parameter_bytes=-5)
    with pytest.raises(TypeError, match="max_subnetworks"):
        CacheBound(max_subnetworks=True)
    with pytest.raises(TypeError, match="bound"):
        TaskServer(tiny_task_model(), bound=3)
    server = TaskServer(tiny_task_model())
    x = torch.randn(2, 3, MODEL_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"task_ids must be in 0\.\.4"):
        server(x, [0, NUM_TASKS])
    with pytest.raises(ValueError, match=r"task_ids must be in 0\.\.4"):
        server(x, [-1, 0])
    with pytest.raises(ValueError, match=r"requests\[1\]\.task_id"):
        server.serve([Request(0, x), Request(9, x)])
    with pytest.raises(TypeError, match=r"requests\[0\]\.task_id"):
        server.serve([Request(1.0, x)])
    with pytest.raises(ValueError, match="shape \\[batch\\]"):
        server(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\[batch\\]"):
        server(x, torch.zeros(2))
    with pytest.raises(ValueError, match="batch size n"):
        server.serve([Request(0, x, {"padding_mask": torch.zeros(1, 3, dtype=torch.bool)})])
    assert server.stats.misses == 0  # rejected before any extraction


def _perturbed_state(model):
    generator = torch.Generator().manual_seed(7)
    return {
        k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }


def test_weight_change_invalidates_the_cached_subnetworks():
    model = tiny_task_model()
    x = torch.randn(4, 3, MODEL_DIM, dtype=torch.float64)
    task_ids = torch.tensor([0, 1, 0, 1])
    server = TaskServer(model)
    server(x, task_ids)
    model.load_state_dict(_perturbed_state(model))  # in-place copies into the same parameters
    torch.testing.assert_close(server(x, task_ids), model(x, task_ids), **EXACT)
    assert server.stats.misses == 4 and server.stats.invalidations == 1
    with torch.no_grad():  # an optimizer step is an in-place update too
        next(model.parameters()).add_(1.0)
    torch.testing.assert_close(server(x, task_ids), model(x, task_ids), **EXACT)
    assert server.stats.invalidations == 2


def test_replaced_parameter_invalidates_and_clear_empties_the_cache():
    model = tiny_task_model()
    x = torch.randn(2, 3, MODEL_DIM, dtype=torch.float64)
    server = TaskServer(model)
    server(x, [2, 2])
    layer = next(m for m in model.modules() if hasattr(m, "task_embedding") and m.task_embedding is not None)
    layer.task_embedding.weight = torch.nn.Parameter(layer.task_embedding.weight.detach() * 3)
    torch.testing.assert_close(server(x, [2, 2]), model(x, torch.tensor([2, 2])), **EXACT)
    server.clear()
    assert server.resident_tasks == [] and server.stats.resident_subnetworks == 0
    server(x, [2, 2])
    assert server.resident_tasks == [2]
