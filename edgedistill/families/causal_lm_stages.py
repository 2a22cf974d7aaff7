"""The causal-LM family's stages: pack the transfer set into token windows, label them with the teacher's top-k
next-token distributions (cached), keep the layers that matter, distill (optionally through the int4 rounding),
and the teacher's greedy continuations of held-out prompts; causal_lm_build.py builds each target from the result."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgedistill import __version__, distributed
from edgedistill.cache import LabelStore, Rows, array_digests, cache_key, default_cache_dir, label_sharded
from edgedistill.data import TransferSet, split_indices
from edgedistill.distill.loop import Checkpointing, DistillResult, Training, distill, resolved
from edgedistill.distill.losses import lm_distillation_loss
from edgedistill.distill.qat import FakeQuantSpec, fake_quantized, float_state_dict
from edgedistill.distill.stage import load_stage, save_stage
from edgedistill.errors import EdgeDistillError, ProfileError
from edgedistill.export_lm import torch_greedy
from edgedistill.families.causal_lm import (
    CausalLMFamily,
    bytes_per_token,
    derive_student,
    ffn_importance,
    ffn_size,
    label_dtype,
    pack_windows,
    prune_ffn,
    sample_continuations,
    select_layers,
    teacher_labels,
    window_perplexity,
)
from edgedistill.families.width import kept_width
from edgedistill.progress import new_progress
from edgedistill.targets import TargetProfile, builtin_profiles
from edgedistill.teachers import Teacher
from edgedistill.tokenizer_io import tokenizer_fingerprint

DEFAULT_WINDOW = 128  # tokens per training window: what 2 CPU cores can distill on; pass --max-length for more
CALIBRATION_WINDOWS = 8  # windows of the training split the layer selection measures on
EVAL_WINDOWS = 32  # held-out windows scored at each evaluation during training (the final validation uses all)
MAX_VAL_WINDOWS = 256
GENERATION_PROMPT_TOKENS = 16  # --generate: tokens of a training window the teacher continues
PROMPTS = 8  # held-out prompts whose greedy continuations are compared with the teacher's
PROMPT_TOKENS, CONTINUATION_TOKENS = 16, 32
MODEL_FILE = "model.onnx"


@dataclass
class LMDistilled:
    """What every LM target is built from: the distilled student, the held-out windows and their teacher labels."""

    teacher: Teacher
    data: TransferSet
    trained: DistillResult
    windows: np.ndarray  # (N, window) int32, all windows
    labels: np.ndarray  # (N,) label rows, memory-mapped
    train_idx: np.ndarray
    val_idx: np.ndarray
    window: int
    top_k: int
    kept_layers: list[int]
    selection: dict
    prompts: list[list[int]] = field(default_factory=list)
    teacher_continuations: list[list[int]] = field(default_factory=list)
    fake_quant: dict | None = None  # the weight rounding the student was distilled through, if any
    generated: int = 0  # training windows the teacher wrote (--generate), the last of `windows`


def check_target(profile: TargetProfile) -> None:
    """Refuse, in one line, a profile that does not build language models."""
    lm = profile.causal_lm
    able = sorted(p.name for p in builtin_profiles().values() if p.causal_lm and not p.causal_lm.unsupported)
    hint = f"targets that build causal LMs: {', '.join(able)}"
    if lm is None:
        raise ProfileError(f"target {profile.name} has no causal_lm section, so it does not say how to build a "
                           "language model", hint=f"add a causal_lm: section (edgedistill targets schema), or use one of the {hint}")
    if lm.unsupported:
        raise ProfileError(f"target {profile.name} builds no causal-LM artifact yet: {lm.unsupported}", hint=hint)


def student_layers(family: CausalLMFamily, teacher: Teacher, requested: int | None) -> int:
    total = family.num_layers(teacher.config)
    layers = max(1, (2 * total) // 3) if requested is None else requested
    if not 1 <= layers <= total:
        raise EdgeDistillError(f"--student-layers {layers} is out of range: the teacher has {total} layers",
                               hint=f"pass a number from 1 to {total}")
    return layers


def window_length(teacher: Teacher, requested: int | None) -> int:
    window = requested or min(DEFAULT_WINDOW, teacher.max_length)
    if window > teacher.max_length:
        raise EdgeDistillError(f"--max-length {window} exceeds the teacher's context of {teacher.max_length} tokens",
                               hint=f"pass --max-length {teacher.max_length} or less")
    if window < 8:
        raise EdgeDistillError(f"--max-length {window} is too short for a language-model window", hint="pass 8 or more")
    return window


def fake_quant_spec(profiles: list[TargetProfile], requested: bool | None) -> FakeQuantSpec | None:
    """Return the weight rounding a quantization-aware distillation trains through: the targets' shared weight-only
    rtn setting. One student serves every target. None (the default) means: when every target rounds weights the
    same rtn way (measured on the demo: int4 everywhere 1.200x the teacher's perplexity at 15% of its size, against
    1.548x without, README); True refuses targets that round differently; False never."""
    from edgedistill.quantize.configs import WeightOnlyConfig

    if requested is False:
        return None
    specs = set()
    for p in profiles:
        q = p.causal_lm.quantization
        if not isinstance(q, WeightOnlyConfig) or q.algorithm != "rtn" or not q.symmetric:
            if requested is None:
                return None
            raise EdgeDistillError(f"--quantization-aware trains for symmetric rtn weight-only rounding; target {p.name} "
                                   f"quantizes with {q.model_dump(include={'recipe', 'algorithm', 'symmetric'})}",
                                   hint="leave out --quantization-aware, or pick targets with a weight-only rtn recipe")
        specs.add(FakeQuantSpec(q.bits, q.block_size, q.quantize_embeddings and q.bits == 4))
    if len(specs) > 1:
        if requested is None:
            return None
        raise EdgeDistillError(f"--quantization-aware trains one student, but these targets round weights differently: "
                               f"{', '.join(f'{s.bits}-bit blocks of {s.block_size}' for s in sorted(specs, key=str))}",
                               hint="compile targets of one weight-only setting together")
    return specs.pop() if specs else None


def check_options(family: CausalLMFamily, teacher: Teacher, opts, profiles: list[TargetProfile]) -> None:
    student_layers(family, teacher, opts.student_layers)
    window_length(teacher, opts.max_length)
    for flag, value in (("--macs-ratio", opts.macs_ratio), ("--crop-scale", opts.crop_scale), ("--resize", opts.resize),
                        ("--resolution", opts.resolution),
                        ("--drop-blocks", opts.drop_blocks or None), ("--fresh-views", opts.fresh_views or None),
                        ("--mixup", opts.mixup or None), ("--feature-weight", opts.feature_weight or None)):
        if value is not None:
            users = "image classifiers and text encoders" if flag == "--feature-weight" else "image classifiers"
            raise EdgeDistillError(f"{flag} is for {users}", hint="leave it out; --student-layers and "
                                   "--ffn-ratio set a language model's student")
    if opts.student and not (Path(opts.student) / "config.json").is_file():
        raise EdgeDistillError(f"--student {opts.student} is not a model directory (no config.json)",
                               hint="pass a causal-LM directory saved with save_pretrained()")
    if opts.layer_criterion not in ("perplexity", "block-influence", "even"):
        raise EdgeDistillError(f"unknown layer criterion '{opts.layer_criterion}'", hint="use perplexity, block-influence or even")
    if opts.distill.divergence not in ("forward-kl", "reverse-kl", "jsd"):
        raise EdgeDistillError(f"unknown divergence '{opts.distill.divergence}'", hint="use forward-kl, reverse-kl or jsd")
    if not 1 <= opts.top_k <= int(teacher.config.vocab_size):
        raise EdgeDistillError(f"--top-k {opts.top_k} is out of range for a vocabulary of {teacher.config.vocab_size}",
                               hint="pass a number from 1 to the vocabulary size (256 is the default)")
    fake_quant_spec(profiles, opts.quantization_aware)
    if not 0.0 < opts.ffn_ratio <= 1.0:
        raise EdgeDistillError(f"--ffn-ratio {opts.ffn_ratio} is out of range", hint="pass a share in (0, 1], e.g. 0.75")
    if opts.ffn_ratio < 1.0 and opts.student:
        raise EdgeDistillError("--ffn-ratio narrows a student derived from the teacher, not a given --student",
                               hint="leave out one of --ffn-ratio and --student")


def tokenize_windows(teacher: Teacher, data: TransferSet, window: int) -> np.ndarray:
    """Return the transfer set as windows of `window` tokens, texts joined by the EOS token."""
    tok = teacher.tokenizer
    ids = tok(list(data.texts), add_special_tokens=False)["input_ids"]
    return pack_windows(ids, window, tok.eos_token_id)


def label_windows(teacher: Teacher, windows: np.ndarray, top_k: int, cache_dir: Path) -> np.ndarray:
    """Return the teacher's label rows for every window as a read-only memory map; windows the store has seen (same
    teacher, tokenizer, length and k) are not labelled again, the rest are labelled in shards across processes."""
    window = windows.shape[1]
    dtype = label_dtype(window, top_k, int(teacher.config.vocab_size))
    store = LabelStore(cache_dir / "labels" / cache_key("lm-v1", teacher.sha256, tokenizer_fingerprint(teacher.tokenizer),
                                                       window, top_k))
    digests = array_digests(windows)
    assembled = store.root / f"assembled-{cache_key(digests.tobytes())[:24]}-{len(windows)}.npy"
    rows = list(windows)
    with new_progress() as progress:
        bars = []

        def on_todo(n: int) -> None:
            if n:
                bars.append(progress.add_task(f"labelling {n * window:,} tokens with the teacher (top-{top_k}, "
                                              f"{bytes_per_token(dtype):.0f} B/token)", total=n, status=""))

        # on a GPU machine each process labels on its own GPU (untested here: no GPU was available to this work)
        device = _process_device()
        teacher.module.to(device)  # a no-op on the CPU; moves nothing back and forth when every label is cached
        try:
            labels = label_sharded(store, rows, assembled,
                                   lambda items: teacher_labels(teacher.module, np.stack(items), top_k, dtype),
                                   distributed.rank(), distributed.world(), distributed.barrier, on_todo,
                                   lambda n: bars and progress.update(bars[0], advance=n), digests=digests)
        finally:
            teacher.module.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()  # training needs the memory the teacher held
    return labels


def _process_device() -> torch.device:
    """Return this process's GPU under Accelerate when CUDA is present, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def write_json_atomic(path: Path, value) -> None:
    """Write JSON under a temporary name and rename it, so that a compile sharing the cache never reads half a file."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def choose_layers(family: CausalLMFamily, teacher: Teacher, calibration: np.ndarray, num_layers: int,
                  criterion: str, cache_dir: Path) -> tuple[list[int], dict]:
    """Return the kept layers and the evidence, cached by teacher, calibration windows, depth and criterion."""
    path = cache_dir / "layers" / f"{cache_key('layers-v1', teacher.sha256, calibration.tobytes(), num_layers, criterion)}.json"
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached["kept"], cached["evidence"]
    total = family.num_layers(teacher.config)
    drops = total - num_layers
    trials = sum(total - i for i in range(drops)) if criterion == "perplexity" else 0
    with new_progress() as progress:
        bar = progress.add_task(f"choosing {num_layers} of {total} layers ({criterion})", total=max(trials, 1), status="")
        kept, evidence = select_layers(teacher.module, family.decoder, num_layers,
                                       torch.from_numpy(calibration.astype(np.int64)), criterion,
                                       lambda: progress.update(bar, advance=1))
        progress.update(bar, completed=max(trials, 1))
    if distributed.is_main():
        write_json_atomic(path, {"kept": kept, "evidence": evidence})
    return kept, evidence


def lm_training(student: torch.nn.Module, windows: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                val_idx: np.ndarray, cfg) -> Training:
    """Return the loop's view of LM distillation: fixed windows, divergence to the cached top-k + tail (plus
    optional cross-entropy on the data), validation perplexity (lower is better)."""
    train_rows = Rows(labels, train_idx)
    val_windows = torch.from_numpy(windows[val_idx[:EVAL_WINDOWS]].astype(np.int64))
    if cfg.freeze_embeddings:  # tied embeddings freeze the LM head with them
        student.get_input_embeddings().weight.requires_grad_(False)

    def collate(indices):
        idx = np.asarray(indices)
        rows = train_rows[idx]
        return {"input_ids": torch.from_numpy(windows[train_idx[idx]].astype(np.int64)),
                "teacher_logp": torch.from_numpy(np.asarray(rows["logp"])),
                "teacher_idx": torch.from_numpy(np.asarray(rows["idx"]).astype(np.int64)),
                "teacher_tail": torch.from_numpy(np.asarray(rows["tail"]))}

    def loss(model, batch):
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        return lm_distillation_loss(logits, batch["input_ids"], batch["teacher_logp"], batch["teacher_idx"],
                                    batch["teacher_tail"], cfg.divergence, cfg.lm_temperature, cfg.ce_weight,
                                    cfg.jsd_beta)

    def evaluate(model) -> float:
        model.eval()
        device = next(model.parameters()).device
        return window_perplexity(model, val_windows.to(device))

    return Training(lengths=[windows.shape[1]] * len(train_idx), collate=collate, loss=loss, evaluate=evaluate,
                    maximize=False, describe=lambda ppl: f"perplexity {ppl:.2f}")


def distill_student(family: CausalLMFamily, teacher: Teacher, data: TransferSet, opts, run_dir: Path | None,
                    profiles: list[TargetProfile]) -> LMDistilled:
    """Window, label (cached), choose layers (cached), derive and distill the student (cached by input hash);
    quantization-aware when asked, through the targets' weight rounding."""
    rounding = fake_quant_spec(profiles, opts.quantization_aware)
    cache_dir = opts.cache_dir or default_cache_dir()
    window = window_length(teacher, opts.max_length)
    num_layers = student_layers(family, teacher, opts.student_layers)
    windows = tokenize_windows(teacher, data, window)
    if len(windows) < 2:
        raise EdgeDistillError(f"the transfer set makes {len(windows)} window of {window} tokens; training and "
                               "validation need at least 2", hint="pass more text with --data, or a smaller --max-length")
    train_idx, val_idx = split_indices(len(windows), opts.val_fraction, opts.distill.seed, max_val=MAX_VAL_WINDOWS)
    generated = None
    if opts.generate:  # the teacher's own continuations join the training split (validation stays real text)
        generated = teacher_generations(teacher, windows[train_idx], opts.generate, opts.distill.seed, cache_dir)
        train_idx = np.concatenate([train_idx, np.arange(len(windows), len(windows) + len(generated))])
        windows = np.concatenate([windows, generated])
    labels = label_windows(teacher, windows, opts.top_k, cache_dir)
    if opts.student:
        student, student_sha = load_student(teacher, Path(opts.student))
        kept, selection = [], {"criterion": "given", "path": str(opts.student), "sha256": student_sha}
    else:
        calibration = windows[train_idx[:CALIBRATION_WINDOWS]]
        kept, selection = choose_layers(family, teacher, calibration, num_layers, opts.layer_criterion, cache_dir)
        student = derive_student(teacher.module, family.decoder, kept)
        student_sha = None
        if opts.ffn_ratio < 1.0:
            selection["ffn"] = narrow_ffn(student, family, calibration, opts.ffn_ratio)
    selection["student_perplexity_before_training"] = window_perplexity(
        student, torch.from_numpy(windows[val_idx[:EVAL_WINDOWS]].astype(np.int64)))
    key = cache_key("lm-student-v1", teacher.sha256, tokenizer_fingerprint(teacher.tokenizer), array_digests(windows).tobytes(),
                    kept, student_sha, window, opts.top_k, opts.val_fraction, sorted(asdict(resolved(opts.distill)).items()),
                    opts.generate, opts.ffn_ratio,
                    None if rounding is None else asdict(rounding), distributed.world(), torch.__version__, __version__)
    # a search's rung trains to its share (stop_at) and never takes a finished student from the cache: the rung's
    # shapes are compared at the same share of their steps
    trained = None if opts.stop_at is not None else load_stage(cache_dir / "students" / key, student)
    if trained is None:
        checkpointing = None if run_dir is None else Checkpointing(run_dir / "checkpoint", key, opts.checkpoint_every,
                                                                    opts.resume)
        training = lm_training(student, windows, labels, train_idx, val_idx, opts.distill)
        with fake_quantized(student, rounding):  # after lm_training has frozen what it freezes
            trained = distill(student, training, opts.distill, checkpointing, opts.stop_at)
            best = float_state_dict(trained.student)
        student.load_state_dict(best)
        trained.student = student.to("cpu").eval()  # where distill() leaves its copies: export runs on the CPU
        if distributed.is_main() and trained.complete:  # a search's rung stops early: not the finished student
            save_stage(cache_dir / "students" / key, trained)
    prompts = [windows[i, :PROMPT_TOKENS].tolist() for i in val_idx[:PROMPTS]]
    continuations = teacher_continuations(teacher, prompts, cache_dir)
    return LMDistilled(teacher, data, trained, windows, labels, train_idx, val_idx, window, opts.top_k, kept, selection,
                       prompts, continuations, None if rounding is None else asdict(rounding),
                       0 if generated is None else len(generated))


def teacher_generations(teacher: Teacher, train_windows: np.ndarray, count: int, seed: int, cache_dir: Path) -> np.ndarray:
    """Return `count` windows the teacher wrote: the first tokens of training windows (in a seeded order, cycling
    when `count` exceeds them) continued by sampling from the teacher, cached by teacher, prompts and seed."""
    from edgedistill.cache import save_npy

    window = train_windows.shape[1]
    order = np.random.default_rng(seed).permutation(len(train_windows))
    prompts = train_windows[np.resize(order, count), :GENERATION_PROMPT_TOKENS]
    path = cache_dir / "generated" / f"{cache_key('sampled-v1', teacher.sha256, prompts.tobytes(), window, seed)}.npy"
    if not path.is_file() and distributed.is_main():
        device = _process_device()
        teacher.module.to(device)
        try:
            with new_progress() as progress:
                bar = progress.add_task(f"the teacher writes {count} windows ({count * (window - len(prompts[0])):,} "
                                        "tokens, sampled)", total=count, status="")
                rows = sample_continuations(teacher.module, prompts, window - prompts.shape[1], seed,
                                            progress=lambda n: progress.update(bar, advance=n))
        finally:
            teacher.module.to("cpu")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy(path, rows)
    distributed.barrier()
    return np.load(path)


def narrow_ffn(student: torch.nn.Module, family: CausalLMFamily, calibration: np.ndarray, ratio: float) -> dict:
    """Prune every layer's FFN to `ratio` of its neurons (a multiple of 32, the int4 block), by mean |activation| on
    the calibration windows; return the record for the manifest."""
    width = ffn_size(student.config)
    keep = kept_width(width, ratio)  # a multiple of 32, the int4 block
    importance = ffn_importance(student, family.decoder, torch.from_numpy(calibration.astype(np.int64)))
    prune_ffn(student, family.decoder, importance, keep)
    return {"teacher_ffn": width, "kept_ffn": keep, "ratio": ratio,
            "criterion": "mean |activation| of each FFN neuron on the calibration windows (Minitron)"}


def load_student(teacher: Teacher, path: Path):
    """Return a user-given student checkpoint (a causal-LM directory) and its sha256, refusing one whose tokenizer
    is not the teacher's: soft labels are distributions over the teacher's vocabulary."""
    from edgedistill.teachers import load_teacher

    student = load_teacher(str(path), "text-generation")
    if int(student.config.vocab_size) != int(teacher.config.vocab_size) or \
            student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise EdgeDistillError(f"--student {path} does not share the teacher's vocabulary ({len(student.tokenizer)} vs "
                               f"{len(teacher.tokenizer)} tokens, embedding {student.config.vocab_size} vs "
                               f"{teacher.config.vocab_size})", hint="distill into a student with the teacher's tokenizer")
    return student.module, student.sha256


def teacher_continuations(teacher: Teacher, prompts: list[list[int]], cache_dir: Path) -> list[list[int]]:
    """Return the teacher's greedy continuations of the prompts (torch, its own cache), cached."""
    path = cache_dir / "continuations" / f"{cache_key('greedy-v1', teacher.sha256, prompts, CONTINUATION_TOKENS)}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    with new_progress() as progress:
        bar = progress.add_task("teacher's greedy continuations of held-out prompts", total=len(prompts), status="")
        out = []
        for p in prompts:
            out.append(torch_greedy(teacher.module, p, CONTINUATION_TOKENS))
            progress.update(bar, advance=1)
    if distributed.is_main():
        write_json_atomic(path, out)
    return out
