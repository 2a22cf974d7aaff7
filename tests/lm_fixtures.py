"""Tiny causal-LM teachers for tests, built offline in about a second: a byte-level BPE tokenizer trained on the
conftest word list, Hugging Face llama / qwen2 / gpt2 model directories, and a llama GGUF file (F32, F16 or Q8_0)
that transformers' GGUF loader reads back into the exact weights of a reference LlamaForCausalLM."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from conftest import WORDS, make_texts

EOT = "<|endoftext|>"
VOCAB_SIZE = 384  # 1 special + 256 byte symbols + 127 merges
HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 4, 2, 128, 128
TensorType = Literal["f32", "f16", "q8_0"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (deterministic) and return its JSON serialization."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*make_texts(2000, seed=0), " ".join(WORDS)], trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny BPE reached {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return tok.to_str()


def _tokenizer() -> PreTrainedTokenizerFast:
    """A fresh PreTrainedTokenizerFast around the cached trained BPE (<|endoftext|> is bos, eos, pad and unk)."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token=EOT,
                                   eos_token=EOT, unk_token=EOT, pad_token=EOT, model_max_length=MAX_POSITIONS,
                                   model_input_names=["input_ids", "attention_mask"])


def build_tiny_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Save the tiny byte-level BPE tokenizer (VOCAB_SIZE tokens, id 0 = <|endoftext|>) into `path` and return it.

    It adds no BOS/EOS when encoding and round-trips any text (byte level, no normalizer)."""
    tokenizer = _tokenizer()
    Path(path).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_lm_config(model_type: str = "llama", num_layers: int = 4, vocab_size: int = VOCAB_SIZE):
    """The config of a tiny causal LM (hidden 64, 4 heads, GQA with 2 kv heads for llama/qwen2, tied embeddings)."""
    eot = 0
    if model_type == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=num_layers, n_head=HEADS, n_inner=INTERMEDIATE,
                          n_positions=MAX_POSITIONS, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                          tie_word_embeddings=True)
    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS,
                  tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unsupported tiny model_type {model_type!r} (llama, qwen2, gpt2)")


_MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}


def tiny_causal_lm(model_type: str = "llama", num_layers: int = 4, seed: int = 0,
                   vocab_size: int = VOCAB_SIZE) -> PreTrainedModel:
    """An in-memory tiny causal LM with weights drawn under torch.manual_seed(seed), in eval mode."""
    config = tiny_lm_config(model_type, num_layers, vocab_size)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[model_type](config)
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_tiny_causal_lm(path: Path, model_type: str = "llama", num_layers: int = 4, seed: int = 0,
                         vocab_mismatch: bool = False) -> Path:
    """Write a Hugging Face causal-LM directory (config.json, model.safetensors, tokenizer files) and return it.

    model_type is "llama", "qwen2" or "gpt2". With vocab_mismatch the model's vocab_size is 32 below the tokenizer's
    (len(tokenizer) > config.vocab_size: token ids past the embedding, an incompatible teacher)."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer(path)
    vocab = len(tokenizer) - 32 if vocab_mismatch else len(tokenizer)
    tiny_causal_lm(model_type, num_layers, seed, vocab).save_pretrained(path)
    return path


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (the inverse of transformers' reverse_permute)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model: LlamaForCausalLM, architecture: str, tensor_type: TensorType,
                specials: dict[str, int] | None = None) -> Path:
    """Write `model` and the tiny tokenizer as a GGUF, making `model`'s weights equal to the stored (rounded) ones.
    `specials` names other token ids for bos / eos / unk / pad than <|endoftext|>'s."""
    import gguf

    cfg = model.config
    tok = json.loads(_tokenizer_json())
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    eot = vocab[EOT]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type]
    writer.add_file_type(int(file_type))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    ids = {"bos": eot, "eos": eot, "unk": eot, "pad": eot, **(specials or {})}
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    with torch.no_grad():
        for hf_name, param in model.state_dict().items():
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            base, suffix = hf_name.rsplit(".", 1)
            name = f"{names.get_name(base)}.{suffix}"
            w = param.detach().float().numpy()
            quantized = tensor_type == "q8_0" and w.ndim == 2 and w.shape[-1] % 32 == 0
            if quantized:
                stored = gguf.dequantize(gguf.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                         gguf.GGMLQuantizationType.Q8_0)
            elif tensor_type == "f16" and w.ndim == 2:
                stored = w.astype(np.float16).astype(np.float32)
            else:
                stored = w
            param.copy_(torch.from_numpy(stored.reshape(w.shape)))  # reference == what the GGUF holds
            if name.endswith("attn_q.weight"):
                stored = _llama_cpp_permute(stored, cfg.num_attention_heads, cfg.num_attention_heads)
            elif name.endswith("attn_k.weight"):
                stored = _llama_cpp_permute(stored, cfg.num_attention_heads, cfg.num_key_value_heads)
            if quantized:  # Q8_0 blocks run along rows, so quantizing commutes with the row permutation
                writer.add_tensor(name, gguf.quantize(stored, gguf.GGMLQuantizationType.Q8_0),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            elif tensor_type == "f16" and w.ndim == 2:
                writer.add_tensor(name, np.ascontiguousarray(stored.astype(np.float16)))
            else:
                writer.add_tensor(name, np.ascontiguousarray(stored, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama_gguf_with_reference(directory: Path, num_layers: int = 2, seed: int = 0,
                                   tensor_type: TensorType = "f32", architecture: str = "llama",
                                   name: str = "tiny-llama.gguf") -> tuple[Path, LlamaForCausalLM]:
    """Write `directory/name` (a llama GGUF) and return it with the reference LlamaForCausalLM (eval, float32).

    The reference's weights equal the dequantized GGUF tensors (F16 / Q8_0 rounding applied to it), so
    AutoModelForCausalLM.from_pretrained(directory, gguf_file=name) reproduces its logits up to float noise."""
    model = tiny_causal_lm("llama", num_layers, seed)
    path = _write_gguf(Path(directory) / name, model, architecture, tensor_type)
    return path, model


def write_tiny_gguf(path: Path, num_layers: int = 2, seed: int = 0, architecture: str = "llama",
                    tensor_type: TensorType = "f32", specials: dict[str, int] | None = None) -> Path:
    """Write a tiny llama GGUF with the tokenizer metadata transformers needs; return `path`.

    Any other `architecture` string (e.g. "mamba-nonsense") is written as general.architecture, which transformers
    rejects with ValueError("GGUF model with architecture ... is not supported yet.")."""
    return _write_gguf(Path(path), tiny_causal_lm("llama", num_layers, seed), architecture, tensor_type, specials)


def truncate_file(path: Path, keep_fraction: float = 0.5, out: Path | None = None) -> Path:
    """Write the first `keep_fraction` of `path`'s bytes to `out` (default: '<stem>.truncated<suffix>' beside it)."""
    path = Path(path)
    out = Path(out) if out else path.with_name(f"{path.stem}.truncated{path.suffix}")
    data = path.read_bytes()
    out.write_bytes(data[: int(len(data) * keep_fraction)])
    return out
