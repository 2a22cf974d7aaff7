"""The causal-LM family's stages: pack the transfer set into token windows, label them with the teacher's top-k
next-token distributions (cached), keep the layers that matter, distill, export with a KV cache, quantize, validate
against the teacher (perplexity, agreement, KL, greedy continuations) and time prefill and decoding."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgedistill import __version__, distributed
from edgedistill.artifact import Manifest
from edgedistill.bench.timer import measure_interleaved, paired_ratio
from edgedistill.cache import LabelStore, Rows, array_digests, cache_key, default_cache_dir, label_sharded
from edgedistill.data import TransferSet, split_indices
from edgedistill.distill.loop import Checkpointing, DistillResult, Training, distill, resolved
from edgedistill.distill.losses import lm_distillation_loss
from edgedistill.distill.qat import FakeQuantSpec, fake_quantized, float_state_dict
from edgedistill.distill.stage import load_stage, save_stage
from edgedistill.errors import EdgeDistillError, ProfileError
from edgedistill.export_lm import export_causal_lm, torch_greedy
from edgedistill.families.base import TargetBuild
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
from edgedistill.progress import console, enabled, new_progress
from edgedistill.quantize import quantize
from edgedistill.reverify import write_lm_validation_set
from edgedistill.runtimes.ort_lm import OrtCausalLM
from edgedistill.targets import TargetProfile, builtin_profiles
from edgedistill.teachers import Teacher
from edgedistill.teachers.hf import count_parameters
from edgedistill.tokenizer_io import tokenizer_fingerprint
from edgedistill.validate import check_lm_budget, greedy_agreement, lm_metrics

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


def lm_validation(logits_of, d: LMDistilled) -> dict[str, float]:
    """Return the LM metrics of `logits_of(windows) -> logits` on the held-out windows."""
    return lm_metrics(logits_of, d.windows[d.val_idx], d.labels[d.val_idx])


# the escalation when int4 misses the budget: the roles moved to 8 bits, in order (most sensitive first)
INT8_STEPS = [("LM head at 8 bits", [r"lm_head"]),
              ("+ down_proj at 8 bits", [r"lm_head", r"down_proj|mlp/c_proj"]),
              ("+ the whole MLP at 8 bits", [r"lm_head", r"/mlp/"]),
              ("every MatMul at 8 bits", [r"MatMul"])]


def quantize_within_budget(model: Path, config, budget, d: LMDistilled, stage_dir: Path, threads: int):
    """Return the quantized model that keeps the budget with the fewest 8-bit roles, and every trial.

    Trials are scored on the held-out windows (what validation uses), so the chosen one is the validated one. When
    none keeps the budget, the most faithful is returned (and the target fails with its report)."""
    from edgedistill.quantize.configs import WeightOnlyConfig

    candidates = [("as configured", config)]
    if isinstance(config, WeightOnlyConfig) and config.bits == 4 and config.search:
        candidates += [(name, config.model_copy(update={"int8_nodes": [*config.int8_nodes, *nodes]}))
                       for name, nodes in INT8_STEPS]
    trials, best = [], None
    for i, (name, cfg) in enumerate(candidates):
        path = quantize(model, cfg, stage_dir / f"trial-{i}.onnx")
        m = lm_validation(OrtCausalLM(path, threads).logits, d)
        passed, _ = check_lm_budget(m, budget)
        trials.append({"description": name, "config": cfg.model_dump(mode="json"), "perplexity_ratio": m["perplexity_ratio"],
                       "top1_agreement": m["top1_agreement"], "size_mb": path.stat().st_size / 1e6, "passed": passed})
        if enabled():
            console.print(f"quantization trial {i}: {name}: perplexity {m['perplexity_ratio']:.3f}x the teacher's, "
                          f"top-1 {m['top1_agreement']:.4f}, {trials[-1]['size_mb']:.1f} MB"
                          + (" — keeps the budget" if passed else ""), highlight=False)
        if best is None or passed or m["perplexity_ratio"] < trials[best]["perplexity_ratio"]:
            best = i
        if passed:
            break
    final = stage_dir / MODEL_FILE
    (stage_dir / f"trial-{best}.onnx").replace(final)
    for i in range(len(trials)):
        (stage_dir / f"trial-{i}.onnx").unlink(missing_ok=True)
    trials[best]["chosen"] = True
    return final, trials


def export_opset(profile: TargetProfile) -> int:
    """Return the opset an LM is exported at: weight-only recipes store int4/uint8 blocks, whose tensor types
    (and GatherBlockQuantized) need opset 21; onnxruntime's quantizer would otherwise bump the opset of a graph
    whose ReduceMean still has opset-17 attributes, and the result does not load."""
    return max(profile.opset, 21) if profile.causal_lm.quantization.recipe == "weight-only" else profile.opset


def build_target(d: LMDistilled, profile: TargetProfile, stage_dir: Path, opts) -> TargetBuild:
    """Export with a KV cache, check, quantize per the profile, validate against the teacher, time; in stage_dir."""
    lm = profile.causal_lm
    teacher, student = d.teacher, d.trained.student.eval()
    exported = export_causal_lm(student, teacher.tokenizer, stage_dir / "export", export_opset(profile),
                                d.windows[d.val_idx[:2]])
    threads = profile.effective_threads
    model_path, trials = quantize_within_budget(exported.model, lm.quantization, lm.budget, d, stage_dir, threads)
    runner = OrtCausalLM(model_path, threads)
    metrics = lm_validation(runner.logits, d)
    rounding = None if d.fake_quant is None else FakeQuantSpec(**d.fake_quant)
    with torch.no_grad(), fake_quantized(student, rounding):  # a quantization-aware student is the rounded one
        reference = lm_validation(lambda w: student(input_ids=torch.from_numpy(w), use_cache=False).logits.float().numpy(), d)
    for k in ("perplexity", "perplexity_ratio", "top1_agreement", "kl_teacher_topk_mean"):
        metrics[f"torch_student_{k}"] = reference[k]
    ours = [list(runner.generate(p, CONTINUATION_TOKENS)) for p in d.prompts]
    metrics.update(greedy_agreement(ours, d.teacher_continuations))
    passed, verdict = check_lm_budget(metrics, lm.budget)
    latency = measure_lm_latency(teacher, runner, profile, d)
    files = {MODEL_FILE: model_path, **{p.name: p for p in exported.side_files},
             **write_lm_validation_set(stage_dir, d.windows[d.val_idx], np.asarray(d.labels[d.val_idx]))}
    manifest = lm_manifest(d, profile, exported, model_path, metrics, passed, verdict, latency, opts, trials)
    return TargetBuild(files, manifest, passed)


def measure_lm_latency(teacher: Teacher, runner: OrtCausalLM, profile: TargetProfile, d: LMDistilled) -> dict:
    """Return prefill latency (a `prompt_tokens` prompt) and per-token decode latency at that context, for the
    artifact and the teacher in torch fp32 (its own KV cache), interleaved in blocks on the same tokens and threads."""
    from transformers import DynamicCache

    lm = profile.causal_lm
    n = min(lm.prompt_tokens, teacher.max_length - 2)  # prompt + the timed token within the context
    stream = d.windows[d.val_idx].reshape(-1)
    if len(stream) < n + 1:
        stream = np.resize(stream, n + 1)
    prompt = stream[:n].astype(np.int64)[None, :]
    nxt = stream[n : n + 1].astype(np.int64)[None, :]
    _, past = runner.forward(prompt)
    previous = torch.get_num_threads()
    torch.set_num_threads(profile.effective_threads)
    try:
        with torch.inference_mode():
            t_prompt, t_next = torch.from_numpy(prompt), torch.from_numpy(nxt)
            cache = DynamicCache()
            teacher.module(input_ids=t_prompt, past_key_values=cache, use_cache=True)

            def teacher_step(_):
                teacher.module(input_ids=t_next, past_key_values=cache, use_cache=True)
                cache.crop(n)  # back to the prompt: every timed step decodes at the same context

            candidates = {"artifact_prefill": (lambda _: runner.forward(prompt), [0]),
                          "teacher_prefill": (lambda _: teacher.module(input_ids=t_prompt, use_cache=True), [0]),
                          "artifact_decode": (lambda _: runner.forward(nxt, past), [0]),
                          "teacher_decode": (teacher_step, [0])}
            stats = measure_interleaved(candidates, warmup=3, min_blocks=5, min_time_s=4.0, block_s=0.3, settle=1)
    finally:
        torch.set_num_threads(previous)
    decode = 1.0 / paired_ratio(stats["artifact_decode"].block_p50_ms, stats["teacher_decode"].block_p50_ms)
    prefill = 1.0 / paired_ratio(stats["artifact_prefill"].block_p50_ms, stats["teacher_prefill"].block_p50_ms)
    return {"batch": 1, "prompt_tokens": n, "threads_profile": profile.threads,
            "threads_measured": profile.effective_threads,
            **{k: v.as_dict() for k, v in stats.items()},
            "artifact_decode_tokens_per_s": 1000.0 / stats["artifact_decode"].p50_ms,
            "teacher_decode_tokens_per_s": 1000.0 / stats["teacher_decode"].p50_ms,
            "decode_speedup_vs_teacher": decode, "prefill_speedup_vs_teacher": prefill,
            "note": f"batch 1; prefill = one pass over a {n}-token held-out prompt; decode = one token after a {n}-token "
                    "context through the KV cache (tokens/s = 1000 / its median ms); teacher = transformers fp32 with "
                    "its DynamicCache; interleaved ~0.3 s blocks, speed-ups are medians of paired block ratios."}


def num_layers(config) -> int:
    """Return a decoder config's depth, whatever the architecture calls it."""
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def lm_manifest(d: LMDistilled, profile: TargetProfile, exported, model_path: Path, metrics: dict, passed: bool,
                verdict: str, latency: dict, opts, trials: list[dict]) -> Manifest:
    import onnx
    import onnxruntime
    import transformers

    teacher, trained, lm = d.teacher, d.trained, profile.causal_lm
    config = trained.student.config
    model_mb = model_path.stat().st_size / 1e6
    teacher_mb = teacher.source["fp32_mb"]
    dtype = d.labels.dtype
    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return Manifest(
        family="causal-lm",
        edgedistill_version=__version__,
        target=profile.model_dump(mode="json"),
        teacher={"name": teacher.name, "sha256": teacher.sha256, "model_type": config.model_type, "task": teacher.task,
                 "num_layers": teacher.family.num_layers(teacher.config),
                 "num_parameters": count_parameters(teacher.module), "source": teacher.source,
                 "vocab_size": int(config.vocab_size), "context": teacher.max_length},
        student={"num_layers": num_layers(config), "ffn_size": ffn_size(config), "kept_teacher_layers": d.kept_layers,
                 "layer_selection": d.selection, "num_parameters": count_parameters(trained.student),
                 "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)), "config": config.to_diff_dict()},
        data={"source": d.data.source, "sha256": d.data.sha256, "num_texts": len(d.data), "window_tokens": d.window,
              "teacher_generated_windows": d.generated, "generation": None if not d.generated else
              {"prompt_tokens": GENERATION_PROMPT_TOKENS, "sampling": "temperature 1, full distribution",
               "tokens": d.generated * (d.window - GENERATION_PROMPT_TOKENS)},
              "num_windows": len(d.windows), "num_train": len(d.train_idx), "num_validation": len(d.val_idx),
              "train_tokens": int(len(d.train_idx) * d.window), "val_fraction": opts.val_fraction,
              "soft_labels": {"top_k": d.top_k, "bytes_per_token": bytes_per_token(dtype),
                              "fields": list(dtype.names)}},
        distillation={"config": asdict(resolved(opts.distill)), "quantization_aware": d.fake_quant,
                      "eval_windows": min(EVAL_WINDOWS, len(d.val_idx)),
                      "best_validation_perplexity": trained.best_fidelity,
                      "best_step": trained.best_step, "history": trained.history},
        export={"exporter": "optimum main_export (text-generation-with-past)", "opset": export_opset(profile),
                **exported.checks},
        optimization={"mode": "onnxruntime session optimizations (ORT_ENABLE_ALL) at load"},
        quantization={"profile": lm.quantization.model_dump(mode="json"), "operators": dict(sorted(ops.items())),
                      "chosen": next(t for t in trials if t.get("chosen"))["config"], "trials": trials},
        model={"file": MODEL_FILE, "format": "onnx", "kv_cache": {"layers": num_layers(config),
               "inputs": "past_key_values.{i}.key|value", "outputs": "present.{i}.key|value"},
               "inputs": [i.name for i in graph.input], "outputs": [o.name for o in graph.output]},
        metrics={"values": metrics, "budget": lm.budget.model_dump(), "passed": passed, "verdict": verdict},
        latency=latency,
        sizes={"model_mb": model_mb, "teacher_weights_mb": teacher_mb, "size_ratio": model_mb / teacher_mb,
               "teacher_file_mb": teacher.source.get("file_mb")},
        versions={"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
                  "machine": platform.machine()},
        seed=opts.distill.seed,
    )
