"""Per-language sub-networks of a trained translation model (Kudugunta et al.'s extraction).

Each task-routed stack is reduced with :func:`flexmoe.extract_task` for its own task id (the
target language, or the direction for langpair routing); token- and sentence-routed stacks
stay whole. The result is saved with :func:`flexmoe.save_subnetwork` next to the tokenizer and
the run's description, so it loads without the full model's weights.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from flexmoe.task import extract_task, load_subnetwork, save_subnetwork
from flexmoe.task.extract import count_parameters
from flexmoe_mt.batching import TaskTable
from flexmoe_mt.runconfig import run_config_from_dict
from flexmoe_mt.tokenizer import Tokenizer
from flexmoe_mt.train import CHECKPOINT, TOKENIZER, TrainedModel, build_model, load_trained
from flexmoe_mt.translation import TranslationModel

DESCRIPTION = "translation_run.json"


def stack_task_ids(
    model: TranslationModel, tasks: TaskTable, target_lang: str, source_lang: str | None
) -> dict[str, int]:
    """Task id of each task-routed stack (``"encoder"``/``"decoder"``) for one direction."""
    config = model.config
    ids = {}
    for stack, routing in (("encoder", config.encoder_routing), ("decoder", config.decoder_routing)):
        if routing == "target":
            ids[stack] = tasks.target_id(target_lang)
        elif routing == "langpair":
            if (source_lang, target_lang) not in tasks.lang_pairs:
                pairs = ["-".join(p) for p in tasks.lang_pairs]
                raise ValueError(f"the {stack} is routed by language pair: task must be one of {pairs}")
            ids[stack] = tasks.pair_id(source_lang, target_lang)
    if config.is_dense or not ids:
        raise ValueError("the model has no task-routed MoE stack (routing 'target' or 'langpair'): nothing to extract")
    return ids


def extract_direction(
    model: TranslationModel, tasks: TaskTable, target_lang: str, source_lang: str | None = None
) -> TranslationModel:
    """A new model serving sentences into ``target_lang`` (from ``source_lang`` when a stack is
    langpair-routed): its task-routed MoE layers become dense blocks. ``model`` is unchanged."""
    ids = stack_task_ids(model, tasks, target_lang, source_lang)
    extracted = copy.deepcopy(model)
    for stack, task_id in ids.items():
        setattr(extracted, stack, extract_task(getattr(model, stack), task_id))
    return extracted.eval()


def save_extracted(model: TranslationModel, trained: TrainedModel, directory: str | Path, task: str) -> Path:
    """Write the sub-network (safetensors), the tokenizer and the run description into ``directory``."""
    directory = save_subnetwork(model, directory)
    shutil.copyfile(trained.tokenizer.model_file, directory / TOKENIZER)
    description = {
        "task": task,
        "run_config": trained.run.to_dict(),
        **trained.tasks.to_dict(),
        "parameters": count_parameters(model),
        "parameters_full": count_parameters(trained.model),
    }
    (directory / DESCRIPTION).write_text(json.dumps(description, indent=2))
    return directory


def load_translation_model(path: str | Path) -> TrainedModel:
    """A run directory (``checkpoint.pt``) or an extracted sub-network directory, ready to translate."""
    path = Path(path)
    if (path / CHECKPOINT).is_file():
        return load_trained(path)
    if not (path / DESCRIPTION).is_file():
        raise FileNotFoundError(f"{path} is neither a training run ({CHECKPOINT}) nor an extracted sub-network")
    description = json.loads((path / DESCRIPTION).read_text())
    run = run_config_from_dict(description["run_config"])
    tasks = TaskTable.from_dict(description)
    tokenizer = Tokenizer(path / TOKENIZER, tasks.target_languages)
    model = load_subnetwork(path, lambda: build_model(run, tokenizer, tasks))
    return TrainedModel(model, tokenizer, tasks, run, description["task"])
