"""The text-encoder family's stages: label texts with the teacher (cached), derive and distill the student, build,
validate and time each target. The pipeline calls them through TextEncoderFamily."""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgedistill import __version__, distributed
from edgedistill.artifact import Manifest
from edgedistill.backends import BuildContext, Built, build_model, unmeasured_latency
from edgedistill.bench.timer import measure_interleaved, paired_ratio
from edgedistill.cache import RaggedRows, Rows, cache_key, default_cache_dir
from edgedistill.data import OUT_OF_DOMAIN_NAME, TransferSet, out_of_domain_texts, split_indices
from edgedistill.distill.loop import Checkpointing, DistillResult, Training, distill, resolved
from edgedistill.distill.losses import classification_loss, embedding_loss, fidelity, token_state_loss
from edgedistill.distill.stage import load_stage, save_stage
from edgedistill.errors import EdgeDistillError
from edgedistill.families.base import TargetBuild
from edgedistill.families.text_encoder import EncoderWithHead
from edgedistill.families.text_encoder_labels import label_token_states, label_with_teacher
from edgedistill.reverify import write_validation_set
from edgedistill.runtimes import iter_batches, predict_with, torch_cpu
from edgedistill.targets import TargetProfile
from edgedistill.teachers import Teacher
from edgedistill.teachers.hf import count_parameters, weights_mb
from edgedistill.tokenizer_io import save_tokenizer, tokenizer_fingerprint
from edgedistill.validate import fidelity_metrics, primary_metric, validate

SEARCH_TEXTS = 300  # held-out texts each quantization trial is scored on (the final validation uses all)


def _collate(tokenizer, texts, targets, labels, input_names, max_length, states: RaggedRows | None = None):
    def collate(indices):
        idx = np.asarray(indices)
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {name: enc[name] if name in enc else torch.zeros_like(enc["input_ids"]) for name in input_names}
        batch["teacher"] = torch.from_numpy(np.asarray(targets[idx], dtype=np.float32))
        if labels is not None:
            batch["labels"] = torch.as_tensor(np.asarray(labels)[idx], dtype=torch.long)
        if states is not None:  # the teacher's cached token states, padded as the batch is
            if not np.array_equal(states.lengths(idx), enc["attention_mask"].sum(1).numpy()):
                raise RuntimeError("cached token states do not line up with the tokenizer's tokens")
            batch["teacher_states"] = torch.from_numpy(states.padded(idx, enc["input_ids"].shape[1]))
        return batch

    return collate


@torch.no_grad()
def evaluate(student: EncoderWithHead, tokenizer, texts, targets, input_names, max_length, task, batch_size=128) -> float:
    """Return the student's fidelity to the teacher outputs on a held-out set."""
    student.eval()
    device = next(student.parameters()).device  # on a GPU when Accelerate put the student there
    outs = np.empty_like(np.asarray(targets), dtype=np.float32)
    for idx, inputs in iter_batches(tokenizer, texts, input_names, max_length, batch_size):
        outs[idx] = student(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}).float().cpu().numpy()
    return fidelity(torch.from_numpy(outs), torch.from_numpy(np.asarray(targets, dtype=np.float32)), task)


def encoder_training(student: EncoderWithHead, tokenizer, input_names: list[str], max_length: int,
                     train: tuple[list[str], np.ndarray, np.ndarray | None], val: tuple[list[str], np.ndarray],
                     cfg, token_states: tuple[RaggedRows, float] | None = None) -> Training:
    """Return the loop's view of encoder distillation: texts batched by length, embedding or soft-target loss,
    fidelity (cosine or top-1 agreement) on the held-out texts. With `token_states` (the teacher's cached states of
    the training texts, a weight), the student's last-layer token states are also pulled to the teacher's."""
    texts, targets, labels = train
    val_texts, val_targets = val
    task = student.task
    if cfg.freeze_embeddings:
        student.model.get_input_embeddings().weight.requires_grad_(False)
    teacher_states, token_weight = token_states or (None, 0.0)

    def loss(model, batch):
        batch = dict(batch)
        teacher_out, batch_labels = batch.pop("teacher"), batch.pop("labels", None)
        teacher_token_states = batch.pop("teacher_states", None)
        if token_weight:
            out, states = model(**batch, with_states=True)
        else:
            out = model(**batch)
        if task == "text-classification":
            value = classification_loss(out, teacher_out, batch_labels, cfg.temperature, cfg.label_weight)
        else:
            value = embedding_loss(out, teacher_out)
        if token_weight:
            value = value + token_weight * token_state_loss(states, teacher_token_states, batch["attention_mask"])
        return value

    return Training(lengths=[len(t) for t in texts],
                    collate=_collate(tokenizer, texts, targets, labels, input_names, max_length, teacher_states),
                    loss=loss,
                    evaluate=lambda m: evaluate(m, tokenizer, val_texts, val_targets, input_names, max_length, task))


@dataclass
class Distilled:
    """What every target is built from: the trained student and the held-out split with its reference outputs."""

    teacher: Teacher
    data: TransferSet
    trained: DistillResult
    kept_layers: list[int]
    input_names: list[str]
    max_length: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    val_teacher: np.ndarray  # teacher outputs on the held-out split
    val_student: np.ndarray  # fp32 torch student outputs on the held-out split
    ood_texts: list[str] = field(default_factory=list)  # embeddings: out-of-domain held-out texts (data.py)
    ood_teacher: np.ndarray | None = None
    ood_student: np.ndarray | None = None
    ffn: dict | None = None  # width pruning (--ffn-ratio): what was kept and by what criterion

    @property
    def val_texts(self) -> list[str]:
        return [self.data.texts[i] for i in self.val_idx]

    @property
    def val_labels(self) -> np.ndarray | None:
        return None if self.data.labels is None else np.asarray(self.data.labels)[self.val_idx]


LM_ONLY = ("divergence", "lm_temperature", "ce_weight", "jsd_beta")


def encoder_settings(cfg) -> list:
    """Return the training settings an encoder student depends on (its cache and checkpoint key): the LM-only
    fields are left out, so they neither change nor invalidate an encoder's key."""
    return sorted((k, v) for k, v in asdict(resolved(cfg)).items() if k not in LM_ONLY)


def student_depth(teacher: Teacher, requested: int | None) -> int:
    """Return the student's number of layers: `requested`, or half the teacher's; raise if out of range."""
    total = teacher.family.num_layers(teacher.config)
    layers = max(1, total // 2) if requested is None else requested
    if not 1 <= layers <= total:
        raise EdgeDistillError(f"--student-layers {layers} is out of range: the teacher has {total} layers",
                               hint=f"pass a number from 1 to {total}")
    return layers


def check_ffn_ratio(ratio: float) -> float:
    if not 0.0 < ratio <= 1.0:
        raise EdgeDistillError(f"--ffn-ratio {ratio} is out of range", hint="pass a share in (0, 1], e.g. 0.5")
    return ratio


FFN_CALIBRATION_TEXTS = 256  # training texts the FFN neurons' activations are measured on (--ffn-ratio)


@torch.no_grad()
def narrow_ffn(student: EncoderWithHead, family, tokenizer, texts: list[str], input_names: list[str], max_length: int,
               ratio: float) -> dict:
    """Prune every layer's FFN to `ratio` of its neurons (a multiple of 32), by mean |activation| over the tokens of
    `texts` (one text per call: no padding counted); return the record for the manifest."""
    from edgedistill.families.width import kept_width, neuron_importance

    model = student.model.eval()
    parts = [family.ffn_parts(layer) for layer in family.layers(model)]

    def feed() -> int:
        positions = 0
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            model(**{k: v for k, v in enc.items() if k in input_names})
            positions += int(enc["input_ids"].numel())
        return positions

    width = family.ffn_size(model.config)
    keep = kept_width(width, ratio)
    family.prune_ffn(model, neuron_importance(parts, feed), keep)
    return {"teacher_ffn": width, "kept_ffn": keep, "ratio": ratio, "calibration_texts": len(texts),
            "criterion": "mean |activation| of each FFN neuron on the calibration texts' tokens (Minitron)"}


def check_max_length(teacher: Teacher, max_length: int) -> int:
    """Return `max_length` if the teacher's position embeddings cover it, else raise."""
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise EdgeDistillError(f"--max-length {max_length} exceeds the teacher's {limit} positions",
                               hint=f"pass --max-length {limit} or less")
    return max_length


def distill_student(teacher: Teacher, data: TransferSet, num_layers: int, max_length: int,
                    opts, run_dir: Path | None = None) -> Distilled:
    """Label the transfer set with the teacher (cached), derive the student and distill it; done once for all targets.

    The distilled student is cached by the hash of everything it depends on (teacher, data, depth, length, split,
    training settings, process count): a compile that changes only its targets skips training. With `run_dir`,
    training checkpoints there every `opts.checkpoint_every` steps.
    """
    cache_dir = opts.cache_dir or default_cache_dir()
    train_idx, val_idx = split_indices(len(data), opts.val_fraction, opts.distill.seed)
    token_weight = float(opts.feature_weight)  # the token-state loss's weight (0: off; README "Token states")
    # labelled first, in the same pass as the outputs of texts the cache lacks
    token_states = label_token_states(teacher, data, max_length, cache_dir) if token_weight else None
    teacher_outputs = label_with_teacher(teacher, data, max_length, cache_dir)
    input_names = teacher.family.input_names(teacher.tokenizer)
    student, kept_layers = derive_student(teacher, num_layers)
    texts = lambda idx: [data.texts[i] for i in idx]  # noqa: E731
    ffn = None
    if opts.ffn_ratio < 1.0:
        ffn = narrow_ffn(student, teacher.family, teacher.tokenizer, texts(train_idx[:FFN_CALIBRATION_TEXTS]),
                         input_names, max_length, opts.ffn_ratio)
    head = asdict(teacher.module.pooling) if teacher.task == "feature-extraction" else teacher.task
    key = cache_key("student-v1", teacher.sha256, tokenizer_fingerprint(teacher.tokenizer), data.sha256, num_layers,
                    max_length, head, opts.val_fraction, encoder_settings(opts.distill), distributed.world(),
                    torch.__version__, __version__, *([("ffn", ffn)] if ffn else []),
                    *([("token-states", token_weight, "cached-fp16")] if token_weight else []))
    # a search's rung trains to its share (stop_at) and never takes a finished student from the cache: the rung's
    # shapes are compared at the same share of their steps
    trained = None if opts.stop_at is not None else load_stage(cache_dir / "students" / key, student)
    if trained is None:
        labels = np.asarray(data.labels)[train_idx] if data.labels is not None else None
        checkpointing = None if run_dir is None else Checkpointing(run_dir / "checkpoint", key, opts.checkpoint_every,
                                                                    opts.resume)
        training = encoder_training(student, teacher.tokenizer, input_names, max_length,
                                    (texts(train_idx), Rows(teacher_outputs, train_idx), labels),
                                    (texts(val_idx), teacher_outputs[val_idx]), opts.distill,
                                    (token_states.rows(train_idx), token_weight) if token_weight else None)
        trained = distill(student, training, opts.distill, checkpointing, opts.stop_at)
        if distributed.is_main() and trained.complete:  # a search's rung stops early: not the finished student
            save_stage(cache_dir / "students" / key, trained)
    val_student = torch_cpu.predict(trained.student, teacher.tokenizer, texts(val_idx), input_names, max_length)
    ood_texts, ood_teacher, ood_student = [], None, None
    if teacher.task == "feature-extraction":
        seen = set(data.texts)
        ood_texts = [t for t in out_of_domain_texts() if t not in seen]
        ood = TransferSet(OUT_OF_DOMAIN_NAME, ood_texts, None, cache_key("ood", *ood_texts))
        ood_teacher = np.asarray(label_with_teacher(teacher, ood, max_length, cache_dir))
        ood_student = torch_cpu.predict(trained.student, teacher.tokenizer, ood_texts, input_names, max_length)
    return Distilled(teacher, data, trained, kept_layers, input_names, max_length, train_idx, val_idx,
                     np.asarray(teacher_outputs[val_idx]), val_student, ood_texts, ood_teacher, ood_student, ffn)


def check_target(profile: TargetProfile) -> None:
    """Raise before any model work when the profile's runtime cannot run here to validate what it builds (the
    browser runtime without Chromium, node or its npm packages: one line naming the missing one)."""
    if profile.runtime == "onnxruntime-web":
        from edgedistill.runtimes.ort_web import find_setup

        find_setup()


def fit_sequence(profile: TargetProfile, teacher: Teacher) -> TargetProfile:
    """Return the profile with its input sequence cut to the teacher's position embeddings, when it has fewer (a
    fixed-shape artifact then takes that many tokens; timing and the quantization search run at that length)."""
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is None or profile.input_shape.sequence <= limit:
        return profile
    shape = profile.input_shape.model_copy(update={"sequence": int(limit)})
    return profile.model_copy(update={"input_shape": shape})


EMBEDDING_BLOCKS = (128, 64, 32, 16)  # the 4-bit block sizes every embedding_bits: 4 path takes


def fit_embedding_block(profile: TargetProfile, width: int) -> TargetProfile:
    """Return the profile with a 4-bit token table's block size cut to one that divides the embedding width (the
    largest such, not above the profile's), or with embedding_bits 8 where none does (a width of 312 takes no block
    of 16-128); the manifest's quantization record shows what was built."""
    q = profile.quantization
    if getattr(q, "embedding_bits", 8) != 4 or width % q.embedding_block_size == 0:
        return profile
    fits = [b for b in EMBEDDING_BLOCKS if b <= q.embedding_block_size and width % b == 0]
    update = {"embedding_block_size": fits[0]} if fits else {"embedding_bits": 8}
    return profile.model_copy(update={"quantization": q.model_copy(update=update)})


def build_target(d: Distilled, profile: TargetProfile, stage_dir: Path, opts) -> TargetBuild:
    """Build the profile's model (its runtime's backend), validate and time what ships, in `stage_dir`."""
    teacher = d.teacher
    profile = fit_embedding_block(fit_sequence(profile, teacher),
                                  int(d.trained.student.model.get_input_embeddings().weight.shape[1]))
    metric, floor = primary_metric(teacher.task, profile.accuracy_budget)
    search_texts, search_teacher = d.val_texts[:SEARCH_TEXTS], d.val_teacher[:SEARCH_TEXTS]

    def search_fidelity(run, fixed_shape) -> float:
        out = predict_with(run, teacher.tokenizer, search_texts, d.input_names, d.max_length, fixed_shape)
        return fidelity_metrics(out, search_teacher, teacher.task)[metric]

    calibration_texts = [d.data.texts[i] for i in d.train_idx[:getattr(profile.quantization, "calibration_texts", 8)]]
    ctx = BuildContext(d.trained.student, teacher.family, teacher.tokenizer, d.input_names, d.max_length,
                       calibration_texts, search_fidelity, floor)
    built = build_model(profile, ctx, stage_dir)
    val_artifact = predict_with(built.run, teacher.tokenizer, d.val_texts, d.input_names, d.max_length, built.fixed_shape)
    validation = validate(val_artifact, d.val_teacher, d.val_student, teacher.task, profile.accuracy_budget, d.val_labels)
    if d.ood_texts:  # reported beside the in-domain figures, not part of the budget
        ood = predict_with(built.run, teacher.tokenizer, d.ood_texts, d.input_names, d.max_length, built.fixed_shape)
        validation.metrics["ood_cosine_mean"] = fidelity_metrics(ood, d.ood_teacher, teacher.task)["cosine_mean"]
        validation.metrics["torch_student_ood_cosine_mean"] = fidelity_metrics(d.ood_student, d.ood_teacher,
                                                                              teacher.task)["cosine_mean"]
    shape = {"batch": profile.input_shape.batch, "sequence": profile.input_shape.sequence}
    latency = (unmeasured_latency(profile, built.not_measured, shape) if built.not_measured
               else measure_latency(teacher, built.run, profile, d.val_texts, d.input_names))
    save_tokenizer(teacher.tokenizer, d.max_length, stage_dir / "tokenizer")
    files = {**built.files, **{f.name: f for f in sorted((stage_dir / "tokenizer").iterdir()) if f.is_file()},
             **write_validation_set(stage_dir, d.val_texts, d.val_teacher, d.val_labels)}
    manifest = build_manifest(d, profile, built, validation, latency, opts)
    return TargetBuild(files, manifest, validation.passed)


def derive_student(teacher: Teacher, num_layers: int) -> tuple[EncoderWithHead, list[int]]:
    """Return the student (teacher architecture, `num_layers` layers) with the teacher's head, and the layers it kept."""
    model, kept = teacher.family.derive_student(teacher.module.model, num_layers)
    return EncoderWithHead(model, teacher.task, teacher.module.pooling if teacher.task == "feature-extraction" else None), kept


def measure_latency(teacher: Teacher, run, profile: TargetProfile, texts: list[str], input_names: list[str]) -> dict:
    """Return latency statistics of the artifact and the teacher (torch fp32), interleaved call by call on the same
    inputs at the profile's shape and threads, and their paired ratio."""
    shape, threads = profile.input_shape, profile.effective_threads
    batches = [feeds for _, feeds in iter_batches(teacher.tokenizer, texts[: 8 * shape.batch], input_names,
                                                  shape.sequence, shape.batch, fixed=True)]
    # a GPU artifact is compared with the teacher on the same GPU when torch has one (`.cpu()` waits for the kernels)
    device = "cuda" if profile.gpu and torch.cuda.is_available() else "cpu"
    module = teacher.module.to(device)
    torch_batches = [{k: torch.from_numpy(v).to(device) for k, v in b.items()} for b in batches]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            stats = measure_interleaved({"artifact": (run, batches), "teacher": (lambda x: module(**x).cpu(), torch_batches)},
                                        min_time_s=2.0)
    finally:
        torch.set_num_threads(previous)
        teacher.module.to("cpu")
    artifact, teacher_stats = stats["artifact"], stats["teacher"]
    note = (f"5 warm-up runs each, then ≥2 s of interleaved ~0.2 s blocks (artifact, teacher, artifact, ...; 2 untimed "
            f"calls open each block) on {len(batches)} rotating batches of real held-out text padded to {shape.sequence} "
            "tokens; speed-up = median over block pairs of teacher / artifact block medians.")
    return {"batch": shape.batch, "sequence": shape.sequence, "threads_profile": profile.threads, "teacher_device": device,
            "threads_measured": threads, "artifact": artifact.as_dict(), "teacher_torch_fp32": teacher_stats.as_dict(),
            "speedup_vs_teacher": 1.0 / paired_ratio(artifact.block_p50_ms, teacher_stats.block_p50_ms), "note": note}


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def build_manifest(d: Distilled, profile: TargetProfile, built: Built, validation, latency: dict,
                   opts) -> Manifest:
    """Return the manifest of one target's artifact (files and their hashes are added when it is written)."""
    import onnx
    import onnxruntime
    import transformers

    teacher, data, trained = d.teacher, d.data, d.trained
    teacher_mb = weights_mb(teacher.path)
    model_mb = _mb(built.files[built.model_file])
    student_config = trained.student.model.config
    return Manifest(
        edgedistill_version=__version__,
        target=profile.model_dump(mode="json"),
        teacher={"name": teacher.name, "sha256": teacher.sha256, "model_type": student_config.model_type,
                 "task": teacher.task, "num_layers": teacher.family.num_layers(teacher.config),
                 "num_parameters": count_parameters(teacher.module), "label_names": teacher.label_names,
                 "pooling": asdict(teacher.module.pooling) if teacher.task == "feature-extraction" else None},
        student={"num_layers": teacher.family.num_layers(student_config), "kept_teacher_layers": d.kept_layers,
                 "ffn_size": teacher.family.ffn_size(student_config), "ffn": d.ffn,
                 "num_parameters": count_parameters(trained.student), "config": student_config.to_diff_dict()},
        data={"source": data.source, "sha256": data.sha256, "num_texts": len(data), "num_train": len(d.train_idx),
              "num_validation": len(d.val_idx), "labelled": data.labels is not None, "max_length": d.max_length,
              "val_fraction": opts.val_fraction,
              "out_of_domain": {"source": OUT_OF_DOMAIN_NAME, "num_texts": len(d.ood_texts)} if d.ood_texts else None},
        distillation={"config": asdict(resolved(opts.distill)), "best_fidelity": trained.best_fidelity,
                      "best_step": trained.best_step, "history": trained.history,
                      "token_state_weight": float(opts.feature_weight)},
        export=built.record["export"],
        optimization=built.record["optimization"],
        quantization=built.record["quantization"],
        model=built.record["model"],
        metrics={"values": validation.metrics, "budget": profile.accuracy_budget.model_dump(),
                 "passed": validation.passed, "verdict": validation.verdict},
        latency=latency,
        sizes={"model_mb": model_mb, "teacher_weights_mb": teacher_mb, "size_ratio": model_mb / teacher_mb},
        versions={"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
                  "machine": platform.machine()},
        seed=opts.distill.seed,
    )
