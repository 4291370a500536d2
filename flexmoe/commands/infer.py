"""flexmoe infer: run mixed-task inputs through per-task sub-networks (flexmoe.TaskServer).

    flexmoe infer --model pkg.mod:factory [--checkpoint W.pt] --inputs IN --out OUT [--max-subnetworks 4]

Input formats, by suffix:
  .pt     torch.save of a dict: inputs [batch, ...], task_ids [batch] and optionally
          more tensors [batch, ...] passed to the model by keyword (padding_mask, ...).
  .jsonl  one request per line: {"task_id": 3, "inputs": [...], "padding_mask": [...]}, each
          value one example without the batch dimension; integer and bool lists become int64 /
          bool tensors (token ids, masks).
Floating-point inputs take the model's dtype. A .pt batch goes to the server whole
(TaskServer.__call__: each task's rows run as one batch, no per-row split). Each JSON
line is one request: lines of one task with the same shapes run as one batch, so lines may have
different lengths.
Output formats, by suffix: .pt ({"outputs": [batch, ...], "task_ids": [batch]}; a list of
[1, ...] tensors if their shapes differ) or .jsonl ({"task_id": t, "outputs": [...]} per line).
Rows stay in input order. Server statistics go to stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexmoe.cli import CommandParser
from flexmoe.commands.model_source import add_model_arguments, load_model
from flexmoe.serving import CacheBound, Request, TaskServer

FORMATS = (".pt", ".jsonl")


def _check_format(argument: str, path: Path) -> None:
    if path.suffix not in FORMATS:
        raise ValueError(f"{argument} must end in one of {FORMATS}, got {str(path)!r}")


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _tensor_from_json(value: object, float_dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.tensor(value)
    # Parse floats again straight into the model's dtype: a float32 detour would round float64 inputs.
    return torch.tensor(value, dtype=float_dtype) if tensor.is_floating_point() else tensor


def _to_model(tensor: torch.Tensor, float_dtype: torch.dtype, device: str) -> torch.Tensor:
    return (tensor.to(float_dtype) if tensor.is_floating_point() else tensor).to(device)


def _check_inputs_file(path: Path) -> None:
    _check_format("--inputs", path)
    if not path.is_file():
        raise FileNotFoundError(f"--inputs {str(path)!r} does not exist")


@dataclass(frozen=True)
class Batch:
    """A .pt input: ``inputs`` [batch, ...], ``task_ids`` [batch] (int64), ``keyword_inputs``
    further tensors [batch, ...] passed to the model by keyword."""

    inputs: torch.Tensor
    task_ids: torch.Tensor
    keyword_inputs: dict[str, torch.Tensor]


def read_batch(path: Path, float_dtype: torch.dtype, device: str) -> Batch:
    """The .pt input as one :class:`Batch` (on ``device``; floating-point tensors in ``float_dtype``)."""
    _check_inputs_file(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"inputs", "task_ids"} <= data.keys():
        raise ValueError(f"--inputs {str(path)!r} must hold a dict with 'inputs' and 'task_ids' tensors")
    task_ids = torch.as_tensor(data.pop("task_ids"))
    if task_ids.dim() != 1 or task_ids.is_floating_point() or task_ids.dtype == torch.bool:
        raise ValueError(
            f"--inputs: 'task_ids' must be an integer tensor [batch], got {task_ids.dtype} {tuple(task_ids.shape)}"
        )
    for name, tensor in data.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[0] != len(task_ids):
            raise ValueError(f"--inputs: {name!r} must be a tensor [batch={len(task_ids)}, ...] like task_ids")
    tensors = {name: _to_model(tensor, float_dtype, device) for name, tensor in data.items()}
    return Batch(tensors.pop("inputs"), task_ids.long(), tensors)


def read_requests(path: Path, float_dtype: torch.dtype, device: str) -> list[Request]:
    """One :class:`Request` per line of a .jsonl input, each with batch size 1."""
    _check_inputs_file(path)
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or "task_id" not in record or "inputs" not in record:
            raise ValueError(f"--inputs line {number}: expected a JSON object with 'task_id' and 'inputs'")
        task_id = record.pop("task_id")
        row = {k: _tensor_from_json(v, float_dtype).to(device)[None] for k, v in record.items()}
        requests.append(Request(task_id, row.pop("inputs"), row))
    return requests


def write_outputs(path: Path, task_ids: list[int], outputs: torch.Tensor | list[torch.Tensor]) -> None:
    """outputs: one tensor [batch, ...], or one [1, ...] tensor per row (shapes may differ)."""
    if path.suffix == ".jsonl":
        rows = outputs.cpu() if isinstance(outputs, torch.Tensor) else [out[0].cpu() for out in outputs]
        lines = [json.dumps({"task_id": t, "outputs": row.tolist()}) for t, row in zip(task_ids, rows)]
        path.write_text("".join(line + "\n" for line in lines))
        return
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.cpu()
    elif len({out.shape for out in outputs}) == 1:
        outputs = torch.cat(outputs).cpu()
    else:
        outputs = [out.cpu() for out in outputs]
    torch.save({"outputs": outputs, "task_ids": torch.tensor(task_ids)}, path)


def run_server(
    server: TaskServer, path: Path, float_dtype: torch.dtype, device: str
) -> tuple[list[int], torch.Tensor | list[torch.Tensor]]:
    """Serve the --inputs file: (task id per row, outputs as :func:`write_outputs` takes them).
    A .pt batch goes to the server whole (no per-row split and re-concatenation); each .jsonl
    line is one request."""
    if path.suffix == ".pt":
        batch = read_batch(path, float_dtype, device)
        return batch.task_ids.tolist(), server(batch.inputs, batch.task_ids, **batch.keyword_inputs)
    requests = read_requests(path, float_dtype, device)
    return [r.task_id for r in requests], server.serve(requests)


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser("flexmoe infer", description=__doc__.split("\n")[0])
    parser.epilog = __doc__.split("\n\n", 2)[2]
    add_model_arguments(parser)
    parser.add_argument("--inputs", type=Path, required=True, help="requests: .pt or .jsonl (formats below)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the outputs: .pt or .jsonl")
    parser.add_argument("--max-subnetworks", type=int, default=4, help="sub-networks kept loaded (LRU)")
    parser.add_argument("--max-parameter-bytes", type=int, help="bound on resident sub-network parameter bytes")
    args = parser.parse_args(argv)
    try:
        _check_format("--out", args.out)
        bound = CacheBound(args.max_subnetworks, args.max_parameter_bytes)
        model = load_model(args)
        server = TaskServer(model, bound)
        task_ids, outputs = run_server(server, args.inputs, _float_dtype(model), args.device)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    write_outputs(args.out, task_ids, outputs)
    if server.serves_whole_model:
        print(f"note: {server.whole_model_reason}", file=sys.stderr)
    print(f"served {len(task_ids)} rows -> {args.out}; {asdict(server.stats)}", file=sys.stderr)
    return 0
