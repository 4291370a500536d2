"""transformers models converted with expert parallelism (world 2, gloo) match the model converted
single-process: logits, input-embedding and every parameter gradient (expert shards against the
slices of the global gradient), one training step, and from_flexmoe -> save_pretrained; then
the example's --expert-parallel run."""

import pytest

pytest.importorskip("transformers")

from tests.distributed.launcher import run_distributed
from tests.distributed.transformers_checks import check_all


def test_world_2_converted_models_match_single_process(tmp_path):
    run_distributed(check_all, 2, str(tmp_path))
