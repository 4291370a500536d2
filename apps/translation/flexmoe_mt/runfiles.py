"""The files of a run directory: their names, the manifest that marks a directory as a run's,
the finished marker, and ``metrics.jsonl`` read back (a torn last line repaired).

A run writes only the names in :data:`RUN_FILES` (and ``eval-*.json`` through ``flexmoe-mt
eval``); ``flexmoe-mt train --fresh`` deletes those and nothing else, and only in a directory
whose :data:`MANIFEST` says it is a run's. :data:`FINISHED` is written last, atomically, after
the final checkpoint, validation and plots: a run without it is not finished, whatever its step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flexmoe.files import read_json_document, write_text_atomically

CHECKPOINT = "checkpoint.pt"
SHARDS = "shards"  # under torchrun: each rank's part of the latest checkpoint (flexmoe.checkpoint)
METRICS = "metrics.jsonl"
TOKENIZER = "tokenizer.model"
MANIFEST = "flexmoe_run.json"
FINISHED = "finished.json"
PLOTS = ("loss.png", "chrf.png", "expert_load.png", "expert_load.json")
RUN_FILES = (CHECKPOINT, CHECKPOINT + ".partial", SHARDS, METRICS, TOKENIZER, FINISHED, *PLOTS)
MANIFEST_FORMAT = "flexmoe-mt run"


def write_manifest(run_dir: Path) -> None:
    """Mark ``run_dir`` as a run's directory, listing the names the run may write there."""
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": list(RUN_FILES)}
    write_text_atomically(run_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run's directory: it holds the manifest, or (a run that predates
    manifests) the checkpoint, tokenizer and metrics a run writes together; one of these names
    alone is common enough to be a user's own file."""
    if (path / MANIFEST).is_file():
        return True
    return all((path / name).is_file() for name in (CHECKPOINT, TOKENIZER, METRICS))


def files_to_clear(run_dir: Path) -> list[Path]:
    """What ``--fresh`` deletes in ``run_dir``: the run's own files (the manifest stays: the directory
    is still the run's, and may hold the user's files beside it). ``ValueError``
    naming ``train.run_dir`` when the directory holds files but is not a run's."""
    if not run_dir.exists():
        return []
    if not run_dir.is_dir():
        raise ValueError(f"train.run_dir {str(run_dir)!r} is a file, not a directory; choose another train.run_dir")
    if not is_run_dir(run_dir):
        if not any(run_dir.iterdir()):
            return []
        raise ValueError(
            f"train.run_dir {str(run_dir)!r} is not a training run (it holds no {MANIFEST}): --fresh deletes only "
            "a run's own files; choose another train.run_dir"
        )
    manifest = run_dir / MANIFEST
    listed = (
        read_json_document(manifest, MANIFEST_FORMAT, "run manifest").get("files", [])
        if manifest.is_file()
        else RUN_FILES
    )
    # Only names this program writes, whatever the manifest lists: it is a file a user could edit.
    names = [name for name in RUN_FILES if name in listed]
    scores = sorted(run_dir.glob("eval-*.json"))  # flexmoe-mt eval's scores of the model being deleted
    return [run_dir / name for name in names if (run_dir / name).exists()] + scores


def clear_run(run_dir: Path, paths: list[Path]) -> None:
    """Delete :func:`files_to_clear`'s result; the directory stays marked as the run's (a run from
    before manifests gets one), since the user's files beside the run's may remain."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if paths and run_dir.is_dir():
        write_manifest(run_dir)


def finished_step(run_dir: Path) -> int | None:
    """The step the run finished at (its final checkpoint, validation and plots all written), else None."""
    path = run_dir / FINISHED
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a damaged marker: finish the run again rather than trust it


def mark_finished(run_dir: Path, step: int) -> None:
    write_text_atomically(run_dir / FINISHED, json.dumps({"step": step}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A torn last line (a kill mid-write) is dropped: the run
    logs that record again. A damaged line before it is a ``ValueError`` naming file and line."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a 'step'")
        except ValueError as error:  # JSONDecodeError included
            if number == len(lines):
                break
            raise ValueError(
                f"{path}:{number}: damaged metrics record ({error}); delete that line, or start over with --fresh"
            ) from None
        records.append(record)
    return records


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
