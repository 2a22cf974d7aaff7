"""Quantization recipe configs: plain data, one class per recipe, chosen by the `recipe` key of a profile."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Fp32Config(BaseModel):
    """No quantization: the optimized fp32 graph is the artifact."""

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["fp32"] = "fp32"


class DynamicInt8Config(BaseModel):
    """Dynamic int8 (onnxruntime `quantize_dynamic`): int8 weights stored offline, activations quantized at run time.

    Fields:
        per_channel: one scale per output channel of each weight. Measured on MiniLM: held-out cosine to fp32
            0.993 per-channel vs 0.960 per-tensor, at the same latency, so it is on by default.
        reduce_range: 7-bit weights. Needed on x86 CPUs without VNNI, where the u8*s8 pair-add (vpmaddubsw)
            can saturate int16; harmless but slightly less precise on VNNI CPUs.
        op_types: operator types to quantize; None means every type onnxruntime's integer-ops registry knows.
    """

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["dynamic-int8"] = "dynamic-int8"
    per_channel: bool = True
    reduce_range: bool = False
    op_types: list[str] | None = None


QuantizationConfig = Annotated[Union[DynamicInt8Config, Fp32Config], Field(discriminator="recipe")]
