"""BERT-like text encoders (BERT, MiniLM, RoBERTa, DistilBERT): students, the pooled head, export inputs."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.families.base import Family, depth_width_label
from edgedistill.families.width import FfnParts, keep_neurons

Task = Literal["feature-extraction", "text-classification"]


@dataclass(frozen=True)
class EncoderType:
    """What differs between BERT-like architectures."""

    model_type: str
    layers_key: str  # config attribute holding the number of layers
    heads_key: str
    hidden_key: str
    ort_model_type: str = "bert"  # onnxruntime.transformers optimizer model type
    ffn_in: str = "intermediate.dense"  # within a layer: the projection that makes the FFN neurons
    ffn_out: str = "output.dense"  # and the one that consumes them
    ffn_key: str = "intermediate_size"  # config attribute holding the FFN width


TEXT_ENCODER_TYPES = {
    "bert": EncoderType("bert", "num_hidden_layers", "num_attention_heads", "hidden_size"),
    "roberta": EncoderType("roberta", "num_hidden_layers", "num_attention_heads", "hidden_size"),
    "xlm-roberta": EncoderType("xlm-roberta", "num_hidden_layers", "num_attention_heads", "hidden_size"),
    "distilbert": EncoderType("distilbert", "n_layers", "n_heads", "dim", ffn_in="ffn.lin1", ffn_out="ffn.lin2",
                              ffn_key="hidden_dim"),
}

SEARCH_DEPTHS = (1, 2, 3, 4)  # --search: student depths tried (those below the teacher's)
SEARCH_FFN_RATIOS = (1.0, 0.5)  # --search: FFN widths tried at each depth

_LAYER_KEY = re.compile(r"^(.*\blayer\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence embedding (sentence-transformers' Pooling + Normalize modules)."""

    mode: Literal["mean", "cls", "max"] = "mean"
    normalize: bool = False


class EncoderWithHead(nn.Module):
    """A transformers encoder plus the task head the artifact ends with: pooled embedding or logits.

    The same module labels the transfer set (teacher), trains (student) and is exported, so the three agree.
    """

    def __init__(self, model: nn.Module, task: Task, pooling: Pooling | None) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.pooling = pooling or Pooling()

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask, token_type_ids=None, with_states: bool = False):
        """Return the pooled embedding or logits; with `with_states`, also the last layer's token states (the
        distillation's token-level target; exports trace the default)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if with_states and self.task == "text-classification":
            kwargs["output_hidden_states"] = True
        out = self.model(**kwargs)
        if self.task == "text-classification":
            return (out.logits, out.hidden_states[-1]) if with_states else out.logits
        hidden = out.last_hidden_state
        pooled = self._pool(hidden, attention_mask)
        return (pooled, hidden) if with_states else pooled

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling.mode == "cls":
            pooled = hidden[:, 0]
        elif self.pooling.mode == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1) if self.pooling.normalize else pooled


def evenly_spaced_layers(num_teacher: int, num_student: int) -> list[int]:
    """Return the teacher layers a student starts from: evenly spaced, always keeping the first and the last."""
    if num_student == 1:
        return [num_teacher - 1]
    return [int(round(i)) for i in np.linspace(0, num_teacher - 1, num_student)]


class TextEncoderFamily(Family):
    """BERT-like encoders: sentence embeddings (pooled, optionally normalized) or classification logits.

    Examples are texts; a teacher output is one embedding or logits row per text; the student keeps evenly spaced
    teacher layers; fidelity is cosine (embeddings) or top-1 agreement (classification)."""

    name = "text-encoder"
    # glosses, fortunes and docstring paragraphs in turn: a 3-layer MiniLM student's out-of-domain cosine rose from
    # 0.692 (glosses alone) to 0.830 at 3,000 texts (README, "The built-in transfer set")
    builtin_data = "builtin:varied"

    def __init__(self, encoder_type: EncoderType) -> None:
        self.type = encoder_type

    def check_target(self, profile) -> None:
        from edgedistill.families import text_encoder_stages as stages

        stages.check_target(profile)

    def check_options(self, teacher, opts, profiles) -> None:
        from edgedistill.distill.feature_matching import check_feature_weight
        from edgedistill.errors import EdgeDistillError
        from edgedistill.families import text_encoder_stages as stages

        for flag, value, why in (("--student", opts.student, "an encoder's student is derived from the teacher"),
                                 ("--generate", opts.generate, "encoders distill on the transfer set's texts"),
                                 ("--macs-ratio", opts.macs_ratio is not None,
                                  "--student-layers and --ffn-ratio set an encoder student's size"),
                                 ("--crop-scale", opts.crop_scale is not None, "it sets image classifiers' training crops"),
                                 ("--drop-blocks", opts.drop_blocks, "--student-layers sets an encoder's depth"),
                                 ("--resize", opts.resize is not None, "it sets image classifiers' held-out crops"),
                                 ("--resolution", opts.resolution is not None,
                                  "it sets an image classifier student's input side"),
                                 ("--fresh-views", opts.fresh_views, "it draws image classifiers' training crops"),
                                 ("--mixup", opts.mixup != 0, "it mixes image classifiers' training crops"),
                                 ("--quantization-aware", opts.quantization_aware is True,
                                  "encoder targets choose their quantization by an accuracy-aware search")):
            if value:
                raise EdgeDistillError(f"{flag} does not apply to text encoders: {why}", hint=f"leave out {flag}")
        stages.student_depth(teacher, opts.student_layers)
        stages.check_ffn_ratio(opts.ffn_ratio)
        check_feature_weight(opts.feature_weight, "the token-state loss beside the embedding's")
        stages.check_max_length(teacher, opts.max_length or teacher.max_length)

    def distill_student(self, teacher, data, opts, run_dir, profiles):
        from edgedistill.families import text_encoder_stages as stages

        return stages.distill_student(teacher, data, stages.student_depth(teacher, opts.student_layers),
                                      stages.check_max_length(teacher, opts.max_length or teacher.max_length),
                                      opts, run_dir)

    def build_target(self, distilled, profile, stage_dir, opts):
        from edgedistill.families import text_encoder_stages as stages

        return stages.build_target(distilled, profile, stage_dir, opts)

    def render_report(self, manifest, published: bool) -> str:
        from edgedistill.report import render_report

        return render_report(manifest, published)

    def summary_cells(self, manifest) -> dict[str, str]:
        from edgedistill.report import encoder_summary_cells

        return encoder_summary_cells(manifest)

    def student_shapes(self, teacher, opts) -> list[dict]:
        """Depth 1-4 (below the teacher's) x FFN width 1 and 1/2 (README "Width": half the FFN cost 0.06 of cosine at
        2 epochs, so narrower is not tried)."""
        total = self.num_layers(teacher.config)
        depths = sorted({d for d in SEARCH_DEPTHS if d < total} or {total}, reverse=True)
        return [{"student_layers": d, "ffn_ratio": r} for d in depths for r in SEARCH_FFN_RATIOS]

    def default_shape(self, teacher, opts) -> dict:
        from edgedistill.families import text_encoder_stages as stages

        return {"student_layers": stages.student_depth(teacher, None), "ffn_ratio": 1.0}

    def shape_label(self, shape) -> str:
        return depth_width_label(shape)

    def search_point(self, manifest) -> tuple[str, float, float | None]:
        metric = "cosine_mean" if manifest.teacher["task"] == "feature-extraction" else "top1_agreement"
        lat = manifest.latency
        return metric, float(manifest.metrics["values"][metric]), (None if "not_measured" in lat
                                                                  else float(lat["artifact"]["p50_ms"]))

    def recipe_variants(self, profile) -> list:
        """The profile's recipe, and (CPU recipes with a token table to quantize) the same with the table's other
        bit width: 4-bit is a third smaller; whether it also costs fidelity or time the search measures."""
        q = profile.quantization
        variants = [(f"{q.recipe}", profile)]
        if hasattr(q, "embedding_bits") and getattr(q, "embeddings", True) and not profile.gpu:
            bits = 12 - q.embedding_bits  # 8 <-> 4
            other = profile.model_copy(update={"quantization": q.model_copy(update={"embedding_bits": bits})})
            variants.append((f"{q.recipe}, int{bits} embeddings", other))
        return variants

    def num_layers(self, config) -> int:
        return int(getattr(config, self.type.layers_key))

    def num_heads(self, config) -> int:
        return int(getattr(config, self.type.heads_key))

    def hidden_size(self, config) -> int:
        return int(getattr(config, self.type.hidden_key))

    def _layers_parent(self, model: nn.Module) -> tuple[nn.Module, str]:
        """Return (the module holding the layer list, its attribute name), found from the parameter names."""
        layer_path = next(m.group(1)[:-1] for k in model.state_dict() if (m := _LAYER_KEY.match(k)))
        parent_path, _, attr = layer_path.rpartition(".")
        return (model.get_submodule(parent_path) if parent_path else model), attr

    def layers(self, model: nn.Module) -> nn.ModuleList:
        parent, attr = self._layers_parent(model)
        return getattr(parent, attr)

    def derive_student(self, teacher: nn.Module, num_layers: int) -> tuple[nn.Module, list[int]]:
        """Return a copy of the teacher keeping only `num_layers` evenly spaced layers (and everything else)."""
        kept = evenly_spaced_layers(self.num_layers(teacher.config), num_layers)
        student = copy.deepcopy(teacher)
        parent, attr = self._layers_parent(student)
        layers = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
        setattr(student.config, self.type.layers_key, num_layers)
        return student, kept

    def ffn_parts(self, layer: nn.Module) -> FfnParts:
        """Return a layer's FFN: the projection making its neurons, and the one consuming them."""
        return [layer.get_submodule(self.type.ffn_in)], layer.get_submodule(self.type.ffn_out)

    def ffn_size(self, config) -> int:
        return int(getattr(config, self.type.ffn_key))

    def prune_ffn(self, model: nn.Module, importance: list[torch.Tensor], keep: int) -> None:
        """Keep the `keep` most important FFN neurons of every layer, in place; the config follows."""
        keep_neurons([self.ffn_parts(layer) for layer in self.layers(model)], importance, keep)
        setattr(model.config, self.type.ffn_key, keep)

    def input_names(self, tokenizer) -> list[str]:
        """Return the graph's input names, in forward() order."""
        names = ["input_ids", "attention_mask"]
        if "token_type_ids" in tokenizer.model_input_names:
            names.append("token_type_ids")
        return names

    def dummy_inputs(self, input_names: list[str], batch: int, sequence: int, vocab_size: int) -> dict[str, torch.Tensor]:
        """Return example inputs of one shape, with real-looking ids and a mask with padding in it."""
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, max(6, vocab_size), (batch, sequence), generator=g)
        mask = torch.ones(batch, sequence, dtype=torch.long)
        if sequence > 2 and batch > 1:
            mask[-1, sequence // 2 :] = 0
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return {k: inputs[k] for k in input_names}
