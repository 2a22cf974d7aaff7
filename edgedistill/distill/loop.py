"""The distillation loop, on Hugging Face Accelerate. Read it top to bottom: batch, forward, loss, backward, clip, step."""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader, Sampler
from transformers import get_linear_schedule_with_warmup

from edgedistill.distill.checkpoint import Position, load_checkpoint, restore_rng, save_checkpoint
from edgedistill.errors import EdgeDistillError
from edgedistill.progress import enabled, new_progress


DEFAULT_LR = 3e-4  # AdamW's peak learning rate when neither --lr nor the family says otherwise


@dataclass
class DistillConfig:
    """Training hyper-parameters.

    Fields: epochs; batch_size; lr (AdamW peak; None: the family's default, else DEFAULT_LR); weight_decay; warmup_fraction of all steps; max_grad_norm for clipping;
    temperature and label_weight (classification only); eval_every steps (0 = once per epoch);
    divergence (forward-kl, reverse-kl or jsd), lm_temperature, ce_weight (share of next-token cross-entropy on the
    data) and jsd_beta (GKD's beta): causal LMs only;
    freeze_embeddings keeps the teacher's token-embedding table (measured on MiniLM: the AdamW step drops from 60 ms
    to 8 ms, as the 11.7M-parameter table is most of the model); seed.
    """

    epochs: int = 2
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR, or the family's default for the student (vision: qat_lr)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    max_grad_norm: float = 1.0
    temperature: float = 2.0
    label_weight: float = 0.5
    eval_every: int = 0
    freeze_embeddings: bool = True
    seed: int = 0
    divergence: str = "forward-kl"
    lm_temperature: float = 1.0
    ce_weight: float = 0.0
    jsd_beta: float = 0.5


def resolved(cfg: DistillConfig, lr: float = DEFAULT_LR) -> DistillConfig:
    """Return `cfg` with its learning rate filled in (`lr` when --lr was not given), as manifests record it."""
    return cfg if cfg.lr is not None else dataclasses.replace(cfg, lr=lr)


@dataclass
class DistillResult:
    """The best student (by validation score) and the history of evaluations: (step, score, train loss)."""

    student: torch.nn.Module
    best_fidelity: float
    best_step: int
    history: list[tuple[int, float, float]] = field(default_factory=list)
    complete: bool = True  # False: stopped at `stop_at` of its schedule (a search's rung), checkpointed to go on
    steps_done: int = 0
    total_steps: int = 0


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of texts of similar length (sorted within windows of 50 batches): less padding, same data.

    Texts are shuffled by seed and epoch, cut into windows of 50 batches, sorted by length inside each window,
    then cut into batches whose order is shuffled again.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, short_batch_last: bool = False) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.short_batch_last = short_batch_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        window = 50 * self.batch_size
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        shuffled = [batches[b] for b in rng.permutation(len(batches))]
        if self.short_batch_last:  # Accelerate's split_batches drops a short batch unless it comes last
            shuffled.sort(key=lambda b: len(b) < self.batch_size)
        yield from shuffled


@dataclass
class Training:
    """What the loop needs from a model family: how to batch its examples, the loss, and the validation score.

    lengths: one size per training example (batches group similar sizes); collate: example indices -> batch of
    tensors; loss(model, batch) -> scalar; evaluate(model) -> validation score; maximize: whether a higher score is
    better; describe(score) -> text for the progress bar and the log (e.g. "cosine 0.9312", "perplexity 41.2").
    """

    lengths: list[int]
    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], float]
    maximize: bool = True
    describe: Callable[[float], str] = lambda score: f"{score:.4f}"

    def better(self, a: float, b: float) -> bool:
        """Whether score `a` beats score `b`."""
        return a > b if self.maximize else a < b


@dataclass
class Checkpointing:
    """Where and how often distill() checkpoints, under which key (a hash of everything the result depends on),
    and whether to continue from a checkpoint found there."""

    directory: Path
    key: str
    every: int = 200
    resume: bool = False


def distill(student: torch.nn.Module, training: Training, cfg: DistillConfig,
            checkpointing: Checkpointing | None = None, stop_at: float | None = None) -> DistillResult:
    """Train `student` by `training`'s loss; return the best state by its validation score.

    `stop_at` (a share of the schedule's steps, with `checkpointing`): stop there, evaluated and checkpointed, with
    the learning-rate schedule still the whole run's, so a later call with `resume` goes on with the same weights,
    optimizer, schedule and batches as one run (a search's successive-halving rungs; the evaluation at the stop is
    one more candidate for the best step); the result then says `complete=False`.

    Parameters that do not require grad (a frozen embedding table) are not optimized. Under `accelerate launch` /
    `torchrun` with N processes, each batch of `cfg.batch_size` is split across them (DDP), so the optimization is
    the same as one process's, N times wider.
    """
    set_seed(cfg.seed)
    state = PartialState()
    if cfg.batch_size % state.num_processes:
        raise EdgeDistillError(f"--batch-size {cfg.batch_size} does not split evenly across {state.num_processes} processes",
                               hint=f"pass a multiple of {state.num_processes}")
    # find_unused_parameters: a feature-extraction student never uses the encoder's pooler (its head pools tokens)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    sampler = LengthGroupedBatches(training.lengths, cfg.batch_size, cfg.seed, short_batch_last=state.num_processes > 1)
    loader = DataLoader(range(len(training.lengths)), batch_sampler=sampler, collate_fn=training.collate)
    trainable = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=resolved(cfg).lr)
    steps_per_epoch = len(loader)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    if stop_at is not None and checkpointing is None:
        raise ValueError("distill(stop_at=...) needs checkpointing to go on from where it stops")
    stop_step = total_steps if stop_at is None else min(total_steps, max(1, math.ceil(stop_at * total_steps)))
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_fraction * total_steps), total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(student, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    def eval_now() -> float:
        score = training.evaluate(unwrapped)
        if not math.isfinite(score):
            raise EdgeDistillError(f"the validation score became {score} (training diverged)",
                                   hint="lower --lr, or check the transfer set")
        return score

    ckpt = None
    if checkpointing is not None and checkpointing.resume:
        ckpt = load_checkpoint(checkpointing.directory, checkpointing.key, state.process_index, state.num_processes)
    eval_every = cfg.eval_every or steps_per_epoch
    if ckpt is None:
        best = eval_now()
        result = DistillResult(student=copy.deepcopy(unwrapped), best_fidelity=best, best_step=0,
                               history=[(0, best, float("nan"))])
        step, start_epoch, skip, running = 0, 0, 0, []
    else:  # continue where the killed run stopped: same weights, optimizer moments, schedule, RNG and next batch
        unwrapped.load_state_dict(ckpt.student)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        result = DistillResult(student=copy.deepcopy(unwrapped), best_fidelity=ckpt.extra["best_fidelity"],
                               best_step=ckpt.extra["best_step"], history=[tuple(h) for h in ckpt.extra["history"]])
        result.student.load_state_dict(ckpt.best)
        step, start_epoch, skip = ckpt.position.step, ckpt.position.epoch, ckpt.position.batch_in_epoch
        if skip >= steps_per_epoch:
            start_epoch, skip = start_epoch + 1, 0
        running = list(ckpt.extra["running"])
    # Starting to iterate a DataLoader draws one number from torch's global RNG (its worker seed), before the first
    # batch. A checkpoint taken mid-epoch was saved after that draw: its RNG state is restored once the resumed epoch
    # has drawn its own, i.e. after the first batch is fetched; one taken at an epoch boundary, before iterating.
    pending_rng = None if ckpt is None else ckpt.rng

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        save_checkpoint(checkpointing.directory, key=checkpointing.key, position=Position(step, epoch, batch_in_epoch),
                        model=unwrapped, best_state=result.student.state_dict(), optimizer=optimizer,
                        scheduler=scheduler, extra={"best_fidelity": result.best_fidelity, "best_step": result.best_step,
                                                    "history": result.history, "running": running[-eval_every:]},
                        rank=state.process_index, world=state.num_processes, barrier=accelerator.wait_for_everyone)

    with new_progress() as progress:
        # resumed at or past where this call stops (a rung re-run after a kill): nothing to train
        last_epoch = cfg.epochs if step < stop_step else start_epoch
        bar = progress.add_task("distilling", total=total_steps, completed=step,
                                status=f"best val {training.describe(result.best_fidelity)}")
        for epoch in range(start_epoch, last_epoch):
            model.train()
            done_in_epoch = skip if epoch == start_epoch else 0
            batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
            # Accelerate's loaders re-set their sampler's epoch to their own iteration count when iterated: a resumed
            # run starts that count at 0, so set both to the real epoch
            batches.set_epoch(epoch)
            sampler.set_epoch(epoch)
            if pending_rng is not None and done_in_epoch == 0:
                restore_rng(pending_rng)
                pending_rng = None
            for batch in batches:
                if pending_rng is not None:
                    restore_rng(pending_rng)
                    pending_rng = None
                loss = training.loss(model, batch)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                done_in_epoch += 1
                running.append(loss.item())
                best_text = training.describe(result.best_fidelity)
                progress.update(bar, advance=1, status=f"loss {np.mean(running[-50:]):.4f}  best val {best_text}")
                # the rung's verdict (stop_step) is on the state it stops in
                if step % eval_every == 0 or step in (total_steps, stop_step):
                    score = eval_now()
                    result.history.append((step, score, float(np.mean(running[-eval_every:]))))
                    if training.better(score, result.best_fidelity):
                        result.student = copy.deepcopy(unwrapped)
                        result.best_fidelity, result.best_step = score, step
                    best_text = training.describe(result.best_fidelity)
                    progress.update(bar, status=f"loss {np.mean(running[-50:]):.4f}  best val {best_text}")
                    if enabled():
                        progress.console.print(f"step {step}/{total_steps}: train loss {result.history[-1][2]:.4f}, "
                                               f"validation {training.describe(score)} (best {best_text})")
                    model.train()
                if step == stop_step < total_steps:
                    checkpoint(epoch, done_in_epoch)
                    break
                if checkpointing is not None and step % checkpointing.every == 0 and step < total_steps:
                    checkpoint(epoch, done_in_epoch)
            if step == stop_step < total_steps:
                break
    result.complete, result.steps_done, result.total_steps = step >= total_steps, step, total_steps
    result.student.to("cpu").eval()  # export and validation run on the CPU
    return result
