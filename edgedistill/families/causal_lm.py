"""Causal language models (Llama, Qwen2, GPT-2 and kin): token windows, top-k soft labels, layer selection.

Examples are windows of `max_length` token ids packed from the transfer set; the teacher's output on a window is its
next-token distribution at every position, kept as the top-k log-probabilities, their token ids, the log of the
remaining (tail) mass and the log-probability of the actual next token (for the teacher's own perplexity). The
student keeps the teacher's layers that matter most, chosen by measurement on calibration windows.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.errors import DataError, EdgeDistillError
from edgedistill.families.base import Family, depth_width_label
from edgedistill.families.width import keep_neurons, neuron_importance

LayerCriterion = Literal["perplexity", "block-influence", "even"]


@dataclass(frozen=True)
class DecoderType:
    """Where a causal-LM architecture keeps its decoder layers, and the config key counting them."""

    model_type: str
    layers_path: str  # attribute path from the *ForCausalLM module to the ModuleList of decoder layers
    layers_key: str


CAUSAL_LM_TYPES = {
    "llama": DecoderType("llama", "model.layers", "num_hidden_layers"),
    "mistral": DecoderType("mistral", "model.layers", "num_hidden_layers"),
    "qwen2": DecoderType("qwen2", "model.layers", "num_hidden_layers"),
    "gpt2": DecoderType("gpt2", "transformer.h", "n_layer"),
}


def label_dtype(window: int, k: int, vocab_size: int) -> np.dtype:
    """Return the label-store row of one window: top-k log-probs (fp16) and token ids per position, the tail's
    log-mass and the actual next token's log-prob (fp32). Ids are uint16 when the vocabulary fits (49,152 for SmolLM2)."""
    ids = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.dtype([("logp", np.float16, (window, k)), ("idx", ids, (window, k)), ("tail", np.float32, (window,)),
                     ("target", np.float32, (window,))])


def bytes_per_token(dtype: np.dtype) -> float:
    """Return the label-cache bytes one token costs."""
    window = dtype["tail"].shape[0]
    return dtype.itemsize / window


def pack_windows(token_lists: list[list[int]], window: int, separator: int | None) -> np.ndarray:
    """Return the texts' tokens joined (separated by `separator`, e.g. EOS) and cut into full windows (int32 rows)."""
    stream: list[int] = []
    for ids in token_lists:
        if not ids:
            continue
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
    n = len(stream) // window
    if n == 0:
        raise DataError(f"the transfer set holds {len(stream)} tokens, less than one window of {window}",
                        hint="pass more text with --data, or a smaller --max-length")
    return np.asarray(stream[: n * window], dtype=np.int32).reshape(n, window)


@torch.no_grad()
def teacher_labels(model: nn.Module, windows: np.ndarray, k: int, dtype: np.dtype, batch_tokens: int = 1024) -> np.ndarray:
    """Return the label rows (see label_dtype) of the teacher on `windows`, `batch_tokens` tokens a forward pass (the
    full-vocabulary logits of a batch are the memory peak: 1,024 tokens x 49,152 x 4 bytes = 200 MB for SmolLM2)."""
    out = np.zeros(len(windows), dtype=dtype)
    batch_size = max(1, batch_tokens // windows.shape[1])
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start : start + batch_size].astype(np.int64)).to(device)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        top, idx = logp.topk(k, dim=-1)
        tail = torch.log1p(-torch.exp(torch.logsumexp(top, dim=-1)).clamp(max=1 - 1e-7))
        target = torch.zeros(ids.shape, dtype=torch.float32, device=device)
        target[:, :-1] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        target[:, -1] = float("nan")  # the last position's next token lies outside the window
        rows = out[start : start + len(ids)]
        rows["logp"] = top.cpu().numpy().astype(np.float16)
        rows["idx"] = idx.cpu().numpy().astype(dtype["idx"].base)
        rows["tail"] = tail.cpu().numpy()
        rows["target"] = target.cpu().numpy()
        del logp
    return out


@torch.no_grad()
def sample_continuations(model: nn.Module, prompts: np.ndarray, new_tokens: int, seed: int, batch_size: int = 16,
                         progress=None) -> np.ndarray:
    """Return each prompt (N, P) followed by `new_tokens` tokens sampled from the model's own distribution
    (temperature 1, no truncation: the teacher's outputs as sequence-level KD data); an end-of-text token does not
    stop a row, as in packed windows. Deterministic for a seed."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    device = next(model.parameters()).device
    out = np.zeros((len(prompts), prompts.shape[1] + new_tokens), dtype=np.int32)
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        ids = torch.from_numpy(prompts[start : start + batch_size].astype(np.int64)).to(device)
        torch.manual_seed(seed * 1_000_003 + b)  # per batch: the same rows whatever ran before
        rows = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out[start : start + len(ids)] = rows.cpu().numpy()
        if progress is not None:
            progress(len(ids))
    return out


def decoder_layers(model: nn.Module, decoder: DecoderType) -> nn.ModuleList:
    return model.get_submodule(decoder.layers_path)


def _set_layers(model: nn.Module, decoder: DecoderType, layers: list[nn.Module]) -> None:
    parent_path, _, attr = decoder.layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, nn.ModuleList(layers))


@torch.no_grad()
def window_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """Return exp(mean next-token cross-entropy) of `model` on `windows` (B, L)."""
    losses = []
    for row in windows.split(4):
        logits = model(input_ids=row, use_cache=False).logits.float()
        losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), row[:, 1:].flatten(), reduction="sum").item())
    return math.exp(sum(losses) / (windows.shape[0] * (windows.shape[1] - 1)))


@torch.no_grad()
def block_influence(model: nn.Module, decoder: DecoderType, windows: torch.Tensor) -> list[float]:
    """Return each layer's block influence (ShortGPT): 1 - mean cosine between its input and output hidden states.
    A layer that barely turns the hidden state is the cheapest to drop."""
    layers = decoder_layers(model, decoder)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += cos.sum().item()
            counts[i] += cos.numel()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for row in windows.split(4):
            model(input_ids=row, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts)]


def select_layers(model: nn.Module, decoder: DecoderType, num_layers: int, windows: torch.Tensor,
                  criterion: LayerCriterion, progress=None) -> tuple[list[int], dict]:
    """Return the teacher layers a `num_layers` student keeps, and the evidence for the choice.

    perplexity: drop layers one at a time, each time the one whose removal raises the calibration perplexity
    least (greedy; costs a forward pass per remaining layer per drop). block-influence: drop the layers with the
    lowest block influence in one shot. even: evenly spaced, first and last kept. Measured on SmolLM2-135M, see
    README "Which layers the student keeps".
    """
    layers = list(decoder_layers(model, decoder))
    total = len(layers)
    evidence: dict = {"criterion": criterion, "calibration_windows": int(windows.shape[0]),
                      "calibration_tokens": int(windows.numel())}
    if criterion == "even":
        kept = [int(round(i)) for i in np.linspace(0, total - 1, num_layers)] if num_layers > 1 else [total - 1]
    elif criterion == "block-influence":
        scores = block_influence(model, decoder, windows)
        evidence["block_influence"] = [round(s, 6) for s in scores]
        kept = sorted(np.argsort(scores)[::-1][:num_layers].tolist())
    else:
        kept = list(range(total))
        steps = []
        try:
            while len(kept) > num_layers:
                trials = {}
                for i in kept:
                    _set_layers(model, decoder, [layers[j] for j in kept if j != i])
                    trials[i] = window_perplexity(model, windows)
                    if progress is not None:
                        progress()
                drop = min(trials, key=trials.get)
                kept.remove(drop)
                steps.append({"dropped": int(drop), "perplexity": round(trials[drop], 4)})
        finally:
            _set_layers(model, decoder, layers)
        evidence["drops"] = steps
    return [int(i) for i in kept], evidence


def _mlp_parts(layer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """Return a decoder layer's MLP input projections (rows = FFN neurons) and output projection (columns = neurons):
    gate/up/down for Llama-style MLPs, c_fc/c_proj (Conv1D, weights stored (in, out)) for GPT-2."""
    mlp = layer.mlp
    if hasattr(mlp, "down_proj"):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj
    return [mlp.c_fc], mlp.c_proj


def ffn_importance(model: nn.Module, decoder: DecoderType, windows: torch.Tensor) -> list[torch.Tensor]:
    """Return, per decoder layer, each FFN neuron's mean |activation| on `windows` (the input of the MLP's output
    projection): Minitron's activation-based width importance."""
    def feed() -> int:
        for row in windows.split(4):
            model(input_ids=row, use_cache=False)
        return windows.numel()

    return neuron_importance([_mlp_parts(layer) for layer in decoder_layers(model, decoder)], feed)


def prune_ffn(model: nn.Module, decoder: DecoderType, importance: list[torch.Tensor], keep: int) -> None:
    """Keep the `keep` most important FFN neurons of every decoder layer, in place (rows of the input projections,
    columns of the output projection; the config's FFN size follows)."""
    keep_neurons([_mlp_parts(layer) for layer in decoder_layers(model, decoder)], importance, keep)
    setattr(model.config, "n_inner" if decoder.model_type == "gpt2" else "intermediate_size", keep)


def ffn_size(config) -> int:
    """Return a decoder config's FFN width (GPT-2's n_inner defaults to 4 x hidden)."""
    if getattr(config, "model_type", None) == "gpt2":
        return int(config.n_inner or 4 * config.n_embd)
    return int(config.intermediate_size)


def derive_student(teacher: nn.Module, decoder: DecoderType, kept: list[int]) -> nn.Module:
    """Return a copy of the teacher with only the `kept` decoder layers, renumbered for the KV cache; embeddings
    (tied to the LM head when the teacher ties them) and final norm are the teacher's."""
    student = copy.deepcopy(teacher)
    layers = decoder_layers(student, decoder)
    new_layers = [layers[i] for i in kept]
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():  # attention modules index the KV cache by their layer number
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    _set_layers(student, decoder, new_layers)
    config = student.config
    setattr(config, decoder.layers_key, len(kept))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student


class CausalLMFamily(Family):
    """Decoder-only language models distilled on the teacher's cached next-token distributions."""

    name = "causal-lm"

    def __init__(self, decoder: DecoderType) -> None:
        self.decoder = decoder

    def num_layers(self, config) -> int:
        return int(getattr(config, self.decoder.layers_key))

    def student_shapes(self, teacher, opts) -> list[dict]:
        """Two thirds (the default), half and a third of the teacher's layers, each with the full and 3/4 FFN."""
        total = self.num_layers(teacher.config)
        depths = sorted({max(1, round(total * f)) for f in (2 / 3, 1 / 2, 1 / 3)}, reverse=True)
        return [{"student_layers": d, "ffn_ratio": r} for d in depths for r in (1.0, 0.75)]

    def default_shape(self, teacher, opts) -> dict:
        from edgedistill.families import causal_lm_stages as stages

        return {"student_layers": stages.student_layers(self, teacher, None), "ffn_ratio": 1.0}

    def shape_label(self, shape) -> str:
        return depth_width_label(shape)

    def search_point(self, manifest) -> tuple[str, float, float | None]:
        """Top-1 agreement, and the decode time per token (the budget's perplexity ratio is in the manifest)."""
        tokens_per_s = manifest.latency.get("artifact_decode_tokens_per_s")
        return "top1_agreement", float(manifest.metrics["values"]["top1_agreement"]), (
            None if not tokens_per_s else 1000.0 / float(tokens_per_s))

    def check_target(self, profile) -> None:
        from edgedistill.families import causal_lm_stages as stages

        stages.check_target(profile)

    def check_options(self, teacher, opts, profiles) -> None:
        from edgedistill.families import causal_lm_stages as stages

        stages.check_options(self, teacher, opts, profiles)

    def distill_student(self, teacher, data, opts, run_dir, profiles):
        from edgedistill.families import causal_lm_stages as stages

        return stages.distill_student(self, teacher, data, opts, run_dir, profiles)

    def build_target(self, distilled, profile, stage_dir, opts):
        from edgedistill.families import causal_lm_build

        return causal_lm_build.build_target(distilled, profile, stage_dir, opts)

    def render_report(self, manifest, published: bool) -> str:
        from edgedistill.families.causal_lm_report import render_report

        return render_report(manifest, published)

    def summary_cells(self, manifest) -> dict[str, str]:
        from edgedistill.families.causal_lm_report import summary_cells

        return summary_cells(manifest)


def causal_family_for(config) -> CausalLMFamily:
    """Return the causal-LM family for a transformers config, or raise naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in CAUSAL_LM_TYPES:
        raise EdgeDistillError(f"unsupported causal-LM architecture '{model_type}'",
                               hint=f"edgedistill compiles causal LMs of types: {', '.join(sorted(CAUSAL_LM_TYPES))}")
    return CausalLMFamily(CAUSAL_LM_TYPES[model_type])
