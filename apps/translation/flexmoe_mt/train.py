"""Training: ``flexmoe-mt train --config apps/translation/configs/<name>.toml``.

A run directory holds ``checkpoint.pt`` (the run config, model, optimizer, sampler and RNG
state, step, elapsed time and the open logging window: a killed run resumes on the same loss
curve), ``tokenizer.model``, ``metrics.jsonl``, PNG plots, and the markers of
:mod:`flexmoe_mt.runfiles` (which files are the run's; whether it finished). Under ``torchrun`` the MoE layers shard
their experts over the ranks and the checkpoint keeps this format (:mod:`flexmoe_mt.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flexmoe.checkpoint import load_checkpoint, save_checkpoint
from flexmoe.parallel import SINGLE_PROCESS, allreduce_non_expert_grads, clip_grad_norm_
from flexmoe_mt.batching import (
    TaskTable,
    collate,
    encode_pairs,
    in_order_batches,
    model_inputs,
)
from flexmoe_mt.data.corpus import Corpus, Pair, load_tsv
from flexmoe_mt.data.sampler import TemperatureSampler
from flexmoe_mt.distributed import RunGroup
from flexmoe_mt.evaluate import generate_ids, score
from flexmoe_mt.runconfig import BUDGET_CLOCKS, DataConfig, RunConfig, run_config_from_dict
from flexmoe_mt.runfiles import (
    CHECKPOINT,
    FINISHED,
    MANIFEST,
    METRICS,
    SHARDS,
    TOKENIZER,
    finished_step,
    is_run_dir,
    mark_finished,
    read_metrics,
    write_manifest,
    write_metrics,
)
from flexmoe_mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer
from flexmoe_mt.translation import TranslationModel

__all__ = ["CHECKPOINT", "TOKENIZER", "TrainedModel", "Trainer", "load_trained", "read_checkpoint", "train"]


def load_corpus(data: DataConfig) -> Corpus:
    """The corpus a run trains on: the embedded one (built and cached on first use) or TSV files."""
    if data.source == "cldr_demo":
        from flexmoe_mt.data.cldr import CorpusConfig, build_corpus  # heavy: babel data; only when used

        preset = CorpusConfig.demo(**({"languages": data.languages} if data.languages else {}))
        return build_corpus(preset, cache_dir=Path(data.cache_dir) / "corpus", progress=True)
    files = {name: path for name, path in (("train", data.train), ("valid", data.valid), ("test", data.test)) if path}
    return load_tsv(files)


@dataclass
class TrainedModel:
    """A model with everything needed to use it: tokenizer, task names, the run's config;
    ``task``: the direction an extracted sub-network serves (``"fr"``, ``"en-fr"``), else None."""

    model: TranslationModel
    tokenizer: Tokenizer
    tasks: TaskTable
    run: RunConfig
    task: str | None = None


def build_model(run: RunConfig, tokenizer: Tokenizer, tasks: TaskTable, group: Any = None) -> TranslationModel:
    """The run's model; ``group``: its MoE layers' process group (see :class:`TranslationModel`)."""
    config = run.model_config(
        vocab_size=tokenizer.vocab_size,
        num_target_langs=len(tasks.target_languages),
        num_lang_pairs=len(tasks.lang_pairs),
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
    )
    return TranslationModel(config, group)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train a model first (flexmoe-mt train --config ...)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        # Written atomically, so damaged afterwards (a copy cut short, a full disk elsewhere).
        raise ValueError(
            f"{path} is truncated or corrupted ({type(error).__name__}: {error}); restore it from a copy, "
            "or start the run over with flexmoe-mt train --fresh"
        ) from None
    if not isinstance(state, dict) or not {"run_config", "model", "step"} <= state.keys():
        raise ValueError(f"{path} is not a checkpoint written by flexmoe-mt train (no run_config, model, step)")
    return state


def load_trained(run_dir: str | Path) -> TrainedModel:
    """The model saved in ``run_dir`` (its ``checkpoint.pt`` and ``tokenizer.model``; the path of
    the ``checkpoint.pt`` itself is accepted too), in eval mode."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    state = read_checkpoint(run_dir)
    run = run_config_from_dict(state["run_config"])
    tasks = TaskTable.from_dict(state)
    tokenizer = Tokenizer(Path(run_dir) / TOKENIZER, tasks.target_languages)
    model = build_model(run, tokenizer, tasks, SINGLE_PROCESS)  # every expert, even under torchrun
    model.load_state_dict(state["model"])
    return TrainedModel(model.eval(), tokenizer, tasks, run)


def fingerprint(pairs: list[Pair]) -> str:
    """SHA-256 of the pairs' text and languages, in order: tells a corpus edited in place."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update("\t".join((pair.source_lang, pair.target_lang, pair.source, pair.target)).encode() + b"\n")
    return digest.hexdigest()


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then inverse square root decay (needs no total step count,
    so a wall-time budget can end training anywhere)."""
    if warmup == 0:
        return peak
    return peak * min(step / warmup, math.sqrt(warmup / max(step, 1)))


def sequence_loss(logits: torch.Tensor, target_out: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean token cross-entropy over non-padding targets. logits [B, T, V], target_out [B, T]."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), target_out.flatten(), ignore_index=PAD_ID, label_smoothing=label_smoothing
    )


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target_out: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per non-padding token, averaged. logits: [B, T, V]."""
    real = target_out != PAD_ID
    student = F.log_softmax(logits[real].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[real].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class Trainer:
    """One run: data, model, optimizer, sampler; :meth:`run` trains to the configured limit."""

    def __init__(self, run: RunConfig, corpus: Corpus | None = None, progress: bool = True) -> None:
        self.run_config, self.config = run, run.train
        self.ranks = RunGroup.current()  # under torchrun: expert parallelism, see flexmoe_mt.distributed
        self.progress = progress and self.ranks.is_main
        self.run_dir = Path(self.config.run_dir)
        check_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        self.device = self._device()  # before the data work: a wrong device is a setup error
        corpus = corpus if corpus is not None else self.ranks.main_first(lambda: load_corpus(run.data))
        self.teacher: TranslationModel | None = None
        teacher = load_trained(self.config.distill_from) if self.config.distill_from else None
        resume = (self.run_dir / CHECKPOINT).is_file()
        read_metrics(self.run_dir / METRICS)  # a damaged record is an error now, not after the setup
        self.ranks.barrier()  # no rank writes the run directory before every rank has looked
        if self.ranks.is_main and not (self.run_dir / MANIFEST).is_file():
            write_manifest(self.run_dir)  # first, so that --fresh knows the files that follow as the run's
        if resume:
            state = read_checkpoint(self.run_dir)
            tasks = TaskTable.from_dict(state)
        elif teacher is not None:
            tasks = teacher.tasks
            if self.ranks.is_main:
                shutil.copyfile(teacher.tokenizer.model_file, self.run_dir / TOKENIZER)
        else:
            tasks = TaskTable.from_pairs(corpus["train"])

            def tokenizer_file() -> None:  # trained once (and cached), copied by rank 0
                tokenizer = train_tokenizer(corpus, run.data.vocab_size, Path(run.data.cache_dir) / "tokenizers")
                if self.ranks.is_main:
                    shutil.copyfile(tokenizer.model_file, self.run_dir / TOKENIZER)

            self.ranks.main_first(tokenizer_file)
        self.ranks.barrier()
        self.tokenizer = Tokenizer(self.run_dir / TOKENIZER, tasks.target_languages)
        self.tasks = tasks
        # Under torchrun the MoE layers shard their experts over the world group.
        expert_group = torch.distributed.group.WORLD if self.ranks.distributed else None
        self.model = build_model(run, self.tokenizer, tasks, expert_group)
        self.ranks.broadcast_replicated(self.model)  # the experts are each rank's own
        if teacher is not None:
            self.teacher = teacher.model.to(self.device)
            if not resume:
                self._init_from_teacher()
        self.model.to(self.device)
        max_len = self.model.config.max_len
        self.train_data = encode_pairs(corpus["train"], self.tokenizer, tasks, max_len)
        self.data_fingerprint = fingerprint(corpus["train"])
        valid: list[Pair] = corpus.splits.get("valid") or corpus["train"]
        # A seeded random subset: the corpus lists pairs kind by kind, so a prefix would be one kind.
        picked = sorted(random.Random(0).sample(range(len(valid)), min(self.config.valid_sentences, len(valid))))
        self.valid_data = encode_pairs([valid[i] for i in picked], self.tokenizer, tasks, max_len)
        # Temperature sampling over translation directions (T = 5 in the paper), then uniform within
        # one. Every rank draws the same global batch and trains on its share of it.
        self.sampler = TemperatureSampler(
            self.train_data.pairs, run.data.temperature, self.config.seed, groups=self.train_data.lang_pair
        )
        self.optimizer = self._optimizer(self.model)
        self.step, self.elapsed_s = 0, 0.0
        # Train losses since the last logged record: saved with a checkpoint, so the first record
        # after a resume averages the same steps as without the interruption.
        self.log_window: dict[str, list[float]] = {"loss": [], "aux_loss": []}
        if resume:
            self._restore(state)

    def _device(self) -> torch.device:
        device = torch.device(self.config.device)
        if self.ranks.distributed and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun's GPU for this rank
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"train.device {self.config.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s) visible to torch; use 'cpu' or another index"
            )
        return device

    def _optimizer(self, model: TranslationModel) -> torch.optim.Optimizer:
        # Under torchrun the experts are DTensors beside plain tensors in one group: the multi-tensor
        # (foreach) kernels, CUDA's default, refuse such a mix, so they are off there.
        foreach = False if self.ranks.distributed else None
        return torch.optim.AdamW(
            model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay, foreach=foreach
        )

    def _init_from_teacher(self) -> None:
        """Copy every teacher tensor whose name and shape the student shares (all but the experts)."""
        own = self.model.state_dict()
        shared = {k: v for k, v in self.teacher.state_dict().items() if k in own and own[k].shape == v.shape}
        self.model.load_state_dict(shared, strict=False)

    # --- checkpoints ------------------------------------------------------------------------

    def _restore(self, state: dict[str, Any]) -> None:
        if state["run_config"]["model"] != self.run_config.to_dict()["model"]:
            raise ValueError(
                f"{self.run_dir} holds a checkpoint of a different [model]; use another train.run_dir or --fresh"
            )
        self._check_same_data(state)
        if self.ranks.distributed:  # the full checkpoint, resharded to this world through flexmoe.checkpoint
            if self.ranks.is_main:
                local, optimizer = self._single_process_copy()
                local.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                save_checkpoint(self.run_dir / SHARDS, local, optimizer)  # a local model: this rank alone
            self.ranks.barrier()
            load_checkpoint(self.run_dir / SHARDS, self.model, self.optimizer)
            self.ranks.barrier()  # every rank has read the shards before a checkpoint overwrites them
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])  # follows the parameters' device
        self.sampler.load_state_dict(state["sampler"])
        by_rank = state.get("torch_rng_by_rank")
        same_world = by_rank is not None and len(by_rank) == self.ranks.world_size
        torch.set_rng_state(by_rank[self.ranks.rank] if same_world else state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.elapsed_s = state["step"], state["elapsed_s"]
        # Checkpoints written before the logging window was saved resume with an empty window
        # (the first logged loss then averages only the steps since the checkpoint).
        self.log_window = state.get("log_window", {"loss": [], "aux_loss": []})

    def _check_same_data(self, state: dict[str, Any]) -> None:
        """Refuse to resume on another corpus: the sampler state and the tokenizer belong to the
        checkpoint's data, so a resume on other data would train a model no one asked for."""
        saved, current = state["run_config"]["data"], self.run_config.to_dict()["data"]
        differing = sorted(key for key in current if key != "cache_dir" and saved.get(key) != current[key])
        if differing:
            changes = ", ".join(f"data.{key} {saved.get(key)!r} -> {current[key]!r}" for key in differing)
            raise ValueError(
                f"{self.run_dir} holds a checkpoint trained on other data ({changes}); restore the run file, "
                "or use another train.run_dir or --fresh"
            )
        if "data_fingerprint" not in state:
            raise ValueError(
                f"{self.run_dir}'s checkpoint records no fingerprint of its training pairs, so flexmoe-mt "
                "cannot tell whether today's corpus is the one it trained on; use --fresh (or another "
                "train.run_dir) to train again"
            )
        if state["data_fingerprint"] != self.data_fingerprint:
            source = self.run_config.data.train or "the corpus"
            raise ValueError(
                f"the training pairs in {source} changed since {self.run_dir}'s checkpoint; restore them, "
                "or use another train.run_dir or --fresh"
            )

    def _single_process_copy(self) -> tuple[TranslationModel, torch.optim.Optimizer]:
        """A model holding every expert (and its optimizer), on the CPU: what rank 0 validates,
        plots and writes as ``checkpoint.pt`` under torchrun."""
        model = build_model(self.run_config, self.tokenizer, self.tasks, SINGLE_PROCESS)
        return model, self._optimizer(model)

    def _gathered(self) -> tuple[TranslationModel, torch.optim.Optimizer] | None:
        """Under torchrun (every rank calls it): the current model and optimizer with every expert,
        on rank 0 (None on the others); else the model and optimizer themselves."""
        if not self.ranks.distributed:
            return self.model, self.optimizer
        save_checkpoint(self.run_dir / SHARDS, self.model, self.optimizer)
        gathered = None
        if self.ranks.is_main:
            model, optimizer = self._single_process_copy()
            load_checkpoint(self.run_dir / SHARDS, model, optimizer)
            gathered = model.to(self.device), optimizer
        return gathered

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` (every rank calls it under torchrun; rank 0 writes)."""
        return self._write_checkpoint(self._gathered())

    def _write_checkpoint(self, gathered: tuple[TranslationModel, torch.optim.Optimizer] | None) -> Path:
        """:meth:`save_checkpoint` with :meth:`_gathered`'s result already at hand."""
        rngs = self.ranks.gather(torch.get_rng_state())
        if self.ranks.is_main:
            model, optimizer = gathered
            state = {
                "run_config": self.run_config.to_dict(),
                **self.tasks.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "torch_rng": rngs[0],
                "torch_rng_by_rank": rngs,
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "step": self.step,
                "elapsed_s": self.elapsed_s,
                "log_window": self.log_window,
                "data_fingerprint": self.data_fingerprint,
            }
            partial = self.run_dir / (CHECKPOINT + ".partial")
            torch.save(state, partial)
            partial.replace(self.run_dir / CHECKPOINT)  # a kill mid-write leaves the last good checkpoint
        self.ranks.barrier()  # rank 0 has read the shards before any rank writes new ones
        return self.run_dir / CHECKPOINT

    def _truncate_metrics(self, step: int, keep_final_validation: bool = True) -> None:
        """Drop records logged after the checkpoint at ``step`` (the resumed run logs them again),
        and a torn last line; ``keep_final_validation=False`` drops ``step``'s validation too."""
        path = self.run_dir / METRICS
        if path.is_file():
            records = read_metrics(path)
            kept = [
                r
                for r in records
                if r["step"] < step or (r["step"] == step and (keep_final_validation or r["split"] != "valid"))
            ]
            write_metrics(path, kept)

    def log(self, record: dict[str, Any]) -> None:
        with (self.run_dir / METRICS).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    # --- training ---------------------------------------------------------------------------

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def done(self) -> bool:
        """Whether the step or time budget is spent (under torchrun: on any rank, agreed by all)."""
        config = self.config
        spent = (config.max_steps and self.step >= config.max_steps) or (
            config.max_minutes and self.elapsed_s >= config.max_minutes * 60
        )
        return self.ranks.any(spent) if self.ranks.distributed else bool(spent)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step on a sampled batch -> (loss, aux loss, tokens in the batch); under
        torchrun on this rank's share of the batch, with the loss and token count of the whole."""
        picked = self.sampler.sample(self.config.batch_size).tolist()
        batch = self.to_device(collate(self.train_data, picked[self.ranks.rank :: self.ranks.world_size]))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step + 1, self.config.lr, self.config.warmup_steps)
        self.model.train()
        logits = self.model(**model_inputs(batch))
        aux = self.model.aux_loss()
        loss = sequence_loss(logits, batch["target_out"], self.config.label_smoothing)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**model_inputs(batch))
            kd = distillation_loss(logits, teacher_logits, batch["target_out"])
            loss = (1 - self.config.distill_weight) * loss + self.config.distill_weight * kd
        targets = int((batch["target_out"] != PAD_ID).sum())
        if self.ranks.distributed:
            # Gradients are averaged over ranks: weigh each rank's mean by its share of the targets,
            # so the update is the one of the whole batch's mean.
            (all_targets,) = self.ranks.totals(targets)
            loss = loss * (targets * self.ranks.world_size / max(all_targets, 1))
        self.optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        if self.ranks.distributed:
            allreduce_non_expert_grads(self.model)
        if self.config.clip_norm:
            clip_grad_norm_(self.model, self.config.clip_norm)
        self.optimizer.step()
        self.step += 1
        tokens = int((batch["source"] != PAD_ID).sum()) + targets
        if self.ranks.distributed:
            world = self.ranks.world_size
            loss_sum, aux_sum, all_tokens = self.ranks.totals(loss.item(), aux.item(), tokens)
            return loss_sum / world, aux_sum / world, int(all_tokens)
        return loss.item(), aux.item(), tokens

    @torch.no_grad()
    def validate(self, model: TranslationModel | None = None) -> dict[str, Any]:
        """Loss (no label smoothing) and greedy chrF on the validation subset, with ``model``
        (default: the trained one; under torchrun, rank 0's gathered copy)."""
        model = self.model if model is None else model
        model.eval()
        data, losses, weights = self.valid_data, [], []
        for batch in map(self.to_device, in_order_batches(data, self.config.batch_size)):
            logits = model(**model_inputs(batch))
            losses.append(float(sequence_loss(logits, batch["target_out"], 0.0)))
            weights.append(int((batch["target_out"] != PAD_ID).sum()))
        hypotheses = [
            self.tokenizer.decode(ids)
            for ids in generate_ids(model, data, self.config.batch_size, self.config.max_new_tokens)
        ]
        scores = score(data.pairs, hypotheses)
        loss = sum(part * w for part, w in zip(losses, weights)) / max(sum(weights), 1)
        return {"step": self.step, "split": "valid", "loss": loss, "chrf": scores.mean_chrf, "chrf_by": scores.chrf}

    def _validate_everywhere(
        self,
    ) -> tuple[dict[str, Any] | None, tuple[TranslationModel, torch.optim.Optimizer] | None]:
        """:meth:`validate` on every rank's behalf (every rank calls it): rank 0 validates and logs
        (under torchrun on the gathered model, the others waiting). Returns the record and
        :meth:`_gathered`'s result (both None on the other ranks)."""
        gathered = self._gathered()
        record = None
        if self.ranks.is_main:
            record = self.validate(gathered[0])
            self.log(record)
        self.ranks.barrier()
        return record, gathered

    def run(self) -> Path:
        """Train until ``max_steps`` or ``max_minutes``, then validate, checkpoint, plot and mark the
        run finished (in that order: a run killed before the mark finishes them when resumed);
        returns the run directory."""
        config = self.config
        first_step = self.step
        finished = self.done()
        complete = finished and finished_step(self.run_dir) == self.step
        if first_step and self.ranks.is_main:
            # Said even without a progress bar: a rerun must not silently pass for a new run.
            state = (
                "already trained to its budget: reusing it"
                if complete
                else "trained to its budget, finishing its validation and plots"
                if finished
                else "resuming it"
            )
            print(f"{self.run_dir}: checkpoint at step {first_step}, {state} (--fresh starts over)", flush=True)
        if complete:
            return self.run_dir
        if self.ranks.is_main:
            # Records after the checkpoint (from step 0: of an attempt killed before its first one)
            # are logged again; so is the final validation of a run killed before its mark.
            self._truncate_metrics(self.step, keep_final_validation=not finished)
            (self.run_dir / FINISHED).unlink(missing_ok=True)  # training on: not finished any more
        self.ranks.barrier()
        bar = tqdm(total=config.max_steps or None, initial=self.step, disable=not self.progress, unit="step")
        window_tokens, window_start = 0, time.perf_counter()
        clock = BUDGET_CLOCKS[config.budget_clock]
        while not finished:
            started = clock()
            loss, aux, tokens = self.train_step()
            self.elapsed_s += clock() - started
            finished = self.done()  # every rank stops at the same step
            self.log_window["loss"].append(loss)
            self.log_window["aux_loss"].append(aux)
            window_tokens += tokens
            bar.update(1)
            if self.step % config.log_every == 0:
                seconds = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "split": "train",
                    **{name: sum(values) / len(values) for name, values in self.log_window.items()},
                    "tokens_per_s": window_tokens / max(seconds, 1e-9),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "elapsed_s": self.elapsed_s,
                }
                if self.ranks.is_main:
                    self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                self.log_window = {name: [] for name in self.log_window}
                window_tokens, window_start = 0, time.perf_counter()
            validated = self.step % config.eval_every == 0 and not finished
            if validated:
                _, gathered = self._validate_everywhere()
                window_start = time.perf_counter()  # tokens/s measures training only
            if self.step % config.checkpoint_every == 0 and validated:
                self._write_checkpoint(gathered)
            elif self.step % config.checkpoint_every == 0 and not finished:
                self.save_checkpoint()
        bar.close()
        record, gathered = self._validate_everywhere()
        if self.step != first_step:
            self._write_checkpoint(gathered)
        if self.ranks.is_main:
            if self.progress:
                print(f"step {self.step}: valid loss {record['loss']:.3f}, chrF {record['chrf']:.1f}")
            from flexmoe_mt.plots import plot_run  # matplotlib only once there is something to draw

            plot_run(self.run_dir, gathered[0], self.valid_data, list(self.tasks.target_languages))
            mark_finished(self.run_dir, self.step)
        self.ranks.barrier()
        return self.run_dir


def check_run_dir(run_dir: Path) -> None:
    """``ValueError`` naming ``train.run_dir`` when it holds files but is not a run's: a run writes
    only into a new, empty or run directory, so that ``--fresh`` never meets a user's files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.run_dir {str(run_dir)!r} is a file, not a directory; choose another train.run_dir")
    if run_dir.is_dir() and not is_run_dir(run_dir) and any(run_dir.iterdir()):
        raise ValueError(
            f"train.run_dir {str(run_dir)!r} holds files but is not a training run (no {MANIFEST}); "
            "choose a new or empty directory"
        )


def train(run: RunConfig, corpus: Corpus | None = None, progress: bool = True) -> Path:
    """Train (or resume) the run ``run`` describes; returns its directory."""
    return Trainer(run, corpus, progress).run()
