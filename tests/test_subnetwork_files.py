"""Saved sub-networks load complete or not at all: corruption, truncation and an interrupted
overwrite are refused with a message naming the file, never loaded as a mix."""

import json

import pytest
import torch

from flexmoe.serving import TaskServer
from flexmoe.task import load_subnetwork, save_subnetwork
from flexmoe.task.io import DESCRIPTION_FILE, WEIGHTS_FILE
from tests.task_models import MODEL_DIM, tiny_task_model


def _saved(tmp_path, task=1, seed=0):
    model = tiny_task_model(seed=seed)
    directory = save_subnetwork(TaskServer(model).subnetwork(task), tmp_path / "sub")
    return model, directory


def _load(directory):
    return load_subnetwork(directory, lambda: tiny_task_model(seed=5))


def test_round_trip_still_exact(tmp_path):
    model, directory = _saved(tmp_path)
    x = torch.randn(2, 3, MODEL_DIM, dtype=torch.float64)
    ids = torch.tensor([1, 1])
    torch.testing.assert_close(_load(directory)(x, ids), model(x, ids), rtol=1e-12, atol=1e-12)
    assert not list(directory.glob("*.tmp")), "no temporary file left behind"


def test_flipped_byte_is_refused(tmp_path):
    _, directory = _saved(tmp_path)
    weights = directory / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes: safetensors itself cannot notice
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}.*checksum"):
        _load(directory)


def test_truncated_weights_are_refused(tmp_path):
    _, directory = _saved(tmp_path)
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}.*size"):
        _load(directory)


def test_weights_of_another_save_are_refused(tmp_path):
    """An overwrite interrupted after the weights were replaced but before the description:
    the weights of one save beside the description of another."""
    _, first = _saved(tmp_path / "a", seed=0)
    _, second = _saved(tmp_path / "b", seed=3)
    (first / WEIGHTS_FILE).write_bytes((second / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"another save|checksum"):
        _load(first)


def test_corrupted_description_names_the_file(tmp_path):
    _, directory = _saved(tmp_path)
    (directory / DESCRIPTION_FILE).write_text('{"format": ')
    with pytest.raises(ValueError, match=DESCRIPTION_FILE):
        _load(directory)


def test_description_without_checksum_from_an_older_save_still_loads(tmp_path):
    model, directory = _saved(tmp_path)
    description = json.loads((directory / DESCRIPTION_FILE).read_text())
    old = {"format": 1, "dense_blocks": description["dense_blocks"], "task_id": description["task_id"]}
    (directory / DESCRIPTION_FILE).write_text(json.dumps(old))
    x = torch.randn(1, 2, MODEL_DIM, dtype=torch.float64)
    torch.testing.assert_close(_load(directory)(x, torch.tensor([1])), model(x, torch.tensor([1])))
