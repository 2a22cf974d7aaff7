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
        embedding_bits: 8 stores the embedding tables uint8 (in the fused EmbedLayerNormalization); 4 stores the
            token table as 4-bit blocks (symmetric, `embedding_block_size` values per scale along the hidden axis)
            packed two per byte, the looked-up rows unpacked by standard operators (quantize/int4_rows.py), the
            embeddings then left unfused. The token table is 11.7M of a 3-layer MiniLM
            student's 17M weights (README "Recipe evidence" has the measurement).
    """

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["dynamic-int8"] = "dynamic-int8"
    per_channel: bool = True
    reduce_range: bool = False
    op_types: list[str] | None = None
    embedding_bits: Literal[8, 4] = 8
    embedding_block_size: Literal[16, 32, 64, 128] = 32
    exclude: list[str] = Field(default_factory=list, description="regexes of node names kept in float")


class StaticQdqInt8Config(BaseModel):
    """Static int8 in QDQ format (onnxruntime `quantize_static`), activation ranges calibrated on the transfer set.

    The format mobile runtimes and their accelerators (XNNPACK, NNAPI, CoreML) execute as int8. Fields:
        op_types: operator types to quantize. Measured on MiniLM (unfused graph, uint8 activations, per-channel
            int8 weights, minmax): every op 0.40 cosine to fp32, MatMul only 0.94; so MatMul is the default.
        per_channel: one weight scale per output channel.
        activation_type / weight_type: uint8 or int8 (int8 + symmetric activations for TensorRT).
        reduce_range: 7-bit weights (integers in [-64, 64], scale max |w| / 64). For x86 CPUs without VNNI, where
            onnxruntime's u8*s8 kernels add pairs of products in int16 (vpmaddubsw) and 8-bit weights saturate it.
            Measured on MobileNetV2 on an AVX2 host without VNNI (152 held-out views, no other change): the int8
            graph agreed 0.66 top-1 with the teacher run by onnxruntime's integer kernels and 0.80 when the same
            QDQ graph ran on its float kernels (the saturation costs 0.14); 0.75 with 7-bit weights.
        unsigned_weights: the same int8 weights stored as uint8 with zero point 128 (q + 128, the same values), so
            onnxruntime runs u8*u8 kernels, which do not saturate, instead of u8*s8: full 8-bit weights for CPUs
            without VNNI, where `reduce_range` gives up one bit. Same MobileNetV2, same views: 0.78 top-1 agreement
            (0.81 on the float kernels). Not a built-in default: on that host u8*u8 convolutions ran at 1.08x fp32's
            speed (u8*s8 1.23-1.34x), and the default compile with it was rejected (0.847 held out; README "Vision
            on AVX2 without VNNI").
        calibration: minmax, entropy or percentile range estimation.
        calibration_texts: transfer-set texts used for calibration.
        exclude: regexes of node names kept in float (the accuracy search adds the most sensitive ones).
        weight_only: regexes of MatMul/Gemm node names whose activations stay float while their constant weights
            are stored int8 (per output channel, symmetric) behind a DequantizeLinear: for layers whose inputs do
            not survive a per-tensor uint8 range (a transformer's FFN down-projection, fed by GELU's long tail),
            at a quarter of the float weights' size.
        dynamic: regexes of MatMul/Gemm node names quantized at run time instead (int8 weights per output channel,
            the input's uint8 range measured on each call: DynamicQuantizeLinear -> MatMulInteger, which onnxruntime
            fuses into DynamicQuantizeMatMul): for the same long-tailed layers, computed in int8 where weight_only
            computes in float. A node named by both is dynamic.
        search: when the budget is missed, exclude node groups in order of measured sensitivity until it holds.
        embedding_bits: 4 stores the token table (the largest Gathered constant) as 4-bit rows packed two per byte
            with a float scale per `embedding_block_size` values, unpacked by standard operators after the lookup
            (quantize/int4_rows.py: the ORT format holds no INT4 tensor); 8 leaves it to the QDQ quantizer (Gather
            in op_types).
    """

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["static-qdq-int8"] = "static-qdq-int8"
    op_types: list[str] = Field(default_factory=lambda: ["MatMul"])
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8"] = "int8"
    reduce_range: bool = False
    unsigned_weights: bool = False
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_texts: int = Field(128, ge=4, le=10000)
    exclude: list[str] = Field(default_factory=list, description="regexes of node names kept in float")
    weight_only: list[str] = Field(default_factory=list,
                                   description="regexes of MatMul/Gemm node names with int8 weights, float activations")
    dynamic: list[str] = Field(default_factory=list,
                               description="regexes of MatMul/Gemm node names quantized dynamically (range per call)")
    search: bool = True
    embedding_bits: Literal[8, 4] = 8
    embedding_block_size: Literal[16, 32, 64, 128] = 32


class Fp16Config(BaseModel):
    """Float16 weights and activations (onnxruntime's transformer `convert_float_to_float16`), for GPU providers.

    Fields:
        keep_fp32_ops: operator types kept in float32 because fp16 loses range or precision in them: the pooling
            and normalization reductions (a sum over 512 tokens, a squared L2 norm) and unfused normalization math.
            Fused LayerNorm/Attention kernels accumulate in fp32 internally and are converted. Measured on MiniLM
            (onnxruntime's fp16 kernels, 256 held-out texts): cosine to fp32 0.9999995 either way, 45.2 MB; keeping
            the fused LayerNorms too bought nothing measurable and cost 69.0 MB.
        keep_io_types: inputs and outputs stay in their float32/int64 types (callers need not cast).
    """

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["fp16"] = "fp16"
    keep_fp32_ops: list[str] = Field(default_factory=lambda: [
        "ReduceSum", "ReduceMean", "ReduceL2", "Div", "Clip", "Pow", "Sqrt", "Softmax"])
    keep_io_types: bool = True


class XnnpackDynamicInt8Config(BaseModel):
    """ExecuTorch: PT2E dynamic int8 for the XNNPACK delegate (int8 weights, activations quantized at run time).

    Measured on a MiniLM student: cosine to the fp32 student 0.9994, 4.3 ms vs 9.0 ms fp32 at 1 x 128 here; static
    int8 of every op collapsed to 0.68, so dynamic is the recipe.

    Fields: per_channel weight scales; embeddings: the token/position embedding tables stored uint8 (one scale per
    row, ExecuTorch's quantized embedding_byte kernel; the table is 11.7M of a 3-layer MiniLM student's 17M weights);
    embedding_bits: 4 stores the token table as symmetric 4-bit blocks of `embedding_block_size` (ExecuTorch's
    embedding_4bit kernel), the other tables uint8.
    """

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["xnnpack-dynamic-int8"] = "xnnpack-dynamic-int8"
    per_channel: bool = True
    embeddings: bool = True
    embedding_bits: Literal[8, 4] = 8
    embedding_block_size: Literal[16, 32, 64, 128] = 32


class XnnpackStaticInt8Config(BaseModel):
    """ExecuTorch, image classifiers: PT2E static int8 for the XNNPACK delegate (XNNPACKQuantizer's symmetric config:
    int8 weights per output channel, int8 activations with ranges observed on calibration views), Conv + BatchNorm +
    ReLU/ReLU6 fused (backends/executorch.py: annotate_conv_clamps). Fields: per_channel weight scales; calibration:
    the activation observer, histogram (XNNPACK's default) or minmax (the rounding a quantization-aware student
    trains through); calibration_texts: training views observed."""

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["xnnpack-static-int8"] = "xnnpack-static-int8"
    per_channel: bool = True
    calibration: Literal["histogram", "minmax"] = "histogram"
    calibration_texts: int = Field(64, ge=1, le=10000, description="calibration inputs (views, for images)")


class WeightOnlyConfig(BaseModel):
    """Weight-only integer quantization for language models (onnxruntime `MatMulNBitsQuantizer`): MatMul weights
    become 4- or 8-bit blocks run by the MatMulNBits kernel; activations stay float. Decoding one token is bound by
    reading the weights, which this shrinks 8x (int4) against fp32.

    Fields:
        bits: 4 or 8.
        algorithm: rtn (round to nearest) or hqq (half-quadratic: scales and float zero points fitted per block,
            data-free; 8-bit nodes and the embedding table use rtn either way). Measured (README): on the SmolLM2
            teacher hqq is better (1.123x the fp32 graph's perplexity vs 1.335x), on its distilled 20-layer
            student far worse (3.04x the teacher's vs 1.55x), so rtn is the default and the search starts from it.
        block_size: weights per scale (smaller: more precise, larger file; hqq at 64 measured 1.549x).
        symmetric: rtn only: no zero point per block.
        accuracy_level: MatMulNBits' compute type for activations (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8); 4 runs
            the int8 dot-product kernels on x86 and arm64.
        quantize_embeddings: the token-embedding table too, as a 4-bit GatherBlockQuantized (onnxruntime quantizes
            Gather at 4 bits only; ignored at bits 8). The LM head is a MatMul (a copy of a tied table) either way.
        int8_nodes: regexes of MatMul node names quantized at 8 bits instead (mixed precision; the search adds them).
        search: when the budget is missed, move the most sensitive roles to 8 bits step by step (LM head, then
            down_proj, then the whole MLP, then everything), keeping the first setting that holds; every trial is
            recorded. Measured on SmolLM2-135M: int4 costs 1.26x perplexity, int8 1.01x (README).
        exclude: regexes of node names kept in float.
    """

    model_config = ConfigDict(extra="forbid")
    recipe: Literal["weight-only"] = "weight-only"
    bits: Literal[4, 8] = 4
    algorithm: Literal["rtn", "hqq"] = "rtn"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    quantize_embeddings: bool = True
    int8_nodes: list[str] = Field(default_factory=list, description="regexes of MatMul nodes quantized at 8 bits")
    search: bool = True
    exclude: list[str] = Field(default_factory=list, description="regexes of node names kept in float")


LMQuantizationConfig = Annotated[Union[WeightOnlyConfig, Fp16Config, Fp32Config], Field(discriminator="recipe")]

QuantizationConfig = Annotated[Union[DynamicInt8Config, StaticQdqInt8Config, XnnpackDynamicInt8Config, Fp16Config,
                                     Fp32Config],
                               Field(discriminator="recipe")]

VisionQuantizationConfig = Annotated[Union[StaticQdqInt8Config, XnnpackStaticInt8Config, DynamicInt8Config, Fp16Config,
                                           Fp32Config], Field(discriminator="recipe")]

# which recipes each runtime can run (image classifiers: VISION_RUNTIME_RECIPES)
RUNTIME_RECIPES = {
    "onnxruntime": ("dynamic-int8", "static-qdq-int8", "fp16", "fp32"),
    "executorch": ("xnnpack-dynamic-int8", "fp32"),
}
VISION_RUNTIME_RECIPES = {
    "onnxruntime": ("static-qdq-int8", "dynamic-int8", "fp16", "fp32"),
    "executorch": ("xnnpack-static-int8", "fp32"),
}


def int8_weight_levels(config: BaseModel) -> int:
    """The largest integer a symmetric per-channel int8 weight is stored as under `config`: 64 with 7-bit weights
    (`reduce_range`), else 127. Weight rounding (GPTQ, quantization-aware training) must land on the same grid."""
    return 64 if getattr(config, "reduce_range", False) else 127
