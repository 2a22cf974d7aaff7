"""Target profiles: what a device wants from an artifact. Profiles are data (targets/*.yaml) checked by this schema."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgedistill.errors import ProfileError
from edgedistill.quantize.configs import (
    RUNTIME_RECIPES,
    VISION_RUNTIME_RECIPES,
    LMQuantizationConfig,
    QuantizationConfig,
    VisionQuantizationConfig,
    WeightOnlyConfig,
)

ORT_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
WEB_PROVIDERS = ("wasm", "webgpu")  # onnxruntime-web's execution providers (its `executionProviders` names)
# onnxruntime-web builds its graph with the onnxruntime recipes; README "Browser targets" has what runs in Chromium
WEB_RECIPES = ("fp32", "dynamic-int8", "static-qdq-int8", "fp16")
# what each runtime runs: (execution providers, model formats, encoder recipes)
RUNTIME_WANTS = {"onnxruntime": (ORT_PROVIDERS, ("onnx", "ort"), RUNTIME_RECIPES["onnxruntime"]),
                 "executorch": (("XNNPACK",), ("pte",), RUNTIME_RECIPES["executorch"]),
                 "onnxruntime-web": (WEB_PROVIDERS, ("onnx",), WEB_RECIPES)}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
TARGETS_DIR = Path(os.environ.get("EDGEDISTILL_TARGETS", Path(__file__).resolve().parents[1] / "targets"))


class InputShape(BaseModel):
    """The input shape the device runs: latency is measured at it."""

    model_config = ConfigDict(extra="forbid")
    batch: int = Field(1, ge=1, description="batch size")
    sequence: int = Field(128, ge=1, le=8192, description="tokens per text")


class AccuracyBudget(BaseModel):
    """The least fidelity to the teacher the artifact must keep on the held-out split, or it is not published."""

    model_config = ConfigDict(extra="forbid")
    min_cosine: float = Field(0.90, ge=-1.0, le=1.0, description="embeddings: mean cosine to the teacher")
    min_top1_agreement: float = Field(0.90, ge=0.0, le=1.0, description="classification: top-1 agreement")


class LMBudget(BaseModel):
    """The least fidelity a language-model artifact must keep against the teacher on the held-out windows."""

    model_config = ConfigDict(extra="forbid")
    max_perplexity_ratio: float = Field(1.3, ge=1.0, description="artifact perplexity / teacher perplexity, at most")
    min_top1_agreement: float = Field(0.5, ge=0.0, le=1.0, description="next-token top-1 agreement with the teacher")


class CausalLMTarget(BaseModel):
    """How a target builds causal-LM artifacts (the `causal_lm:` section; without it the target builds none)."""

    model_config = ConfigDict(extra="forbid")
    unsupported: str | None = Field(None, description="why this target builds no LM artifact yet (then nothing else)")
    quantization: LMQuantizationConfig = Field(default_factory=WeightOnlyConfig)
    budget: LMBudget = Field(default_factory=LMBudget)
    prompt_tokens: int = Field(128, ge=1, le=8192, description="prompt length the prefill latency is measured at")
    new_tokens: int = Field(64, ge=1, le=4096, description="tokens a decode is timed over")


class VisionBudget(BaseModel):
    """The least fidelity an image-classifier artifact must keep against the teacher on the held-out views."""

    model_config = ConfigDict(extra="forbid")
    min_top1_agreement: float = Field(0.9, ge=0.0, le=1.0, description="top-1 class agreement with the teacher")


def _vision_int8():
    from edgedistill.quantize.configs import StaticQdqInt8Config

    return StaticQdqInt8Config(op_types=["Conv", "Gemm", "Clip"], calibration_texts=64)


class VisionTarget(BaseModel):
    """How a target builds image-classifier artifacts (the `vision:` section; without it the target builds none)."""

    model_config = ConfigDict(extra="forbid")
    unsupported: str | None = Field(None, description="why this target builds no vision artifact yet (then nothing else)")
    quantization: VisionQuantizationConfig = Field(default_factory=_vision_int8)
    budget: VisionBudget = Field(default_factory=VisionBudget)
    batch: int = Field(1, ge=1, le=256, description="images per call latency is measured at")
    weight_rounding: Literal["gptq", "nearest"] = Field(
        "gptq", description="static int8 recipes: gptq rounds each Conv/Gemm weight onto its int8 grid by the layer's "
        "calibration inputs and corrects the biases (quantize/conv_rounding.py); nearest leaves the rounding to the "
        "quantizer. Other recipes ignore it")


class TargetProfile(BaseModel):
    """A device target: runtime, threads, graph optimization, quantization recipe, input shape, accuracy budget."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="used as the artifact's directory name")
    description: str = ""
    runtime: Literal["onnxruntime", "executorch", "onnxruntime-web"] = Field(
        "onnxruntime", description="onnxruntime, executorch, or onnxruntime-web (the browser: validated and timed in "
        "headless Chromium)")
    execution_provider: Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "XNNPACK",
                                "wasm", "webgpu"] = Field(
        "CPUExecutionProvider", description="onnxruntime: CPUExecutionProvider, CUDAExecutionProvider or "
        "TensorrtExecutionProvider (the graph is checked against the provider's operators); executorch: XNNPACK; "
        "onnxruntime-web: wasm (WebAssembly, SIMD, `threads` web workers) or webgpu")
    device_execution_providers: list[Literal["XNNPACK", "NNAPI", "CoreML", "CPU"]] = Field(
        default_factory=list, description="providers the device's onnxruntime build would use (recorded, for mobile)")
    arch: Literal["x86_64", "arm64", "wasm32"] = Field("x86_64", description="the device's CPU architecture (wasm32: a "
                                                       "browser's WebAssembly, whatever CPU runs it)")
    model_format: Literal["onnx", "ort", "pte"] = Field(
        "onnx", description="onnx; ort: also the ORT-format model for ORT Mobile; pte: ExecuTorch program")
    fixed_shape: bool = Field(False, description="fix the graph's input shapes to input_shape (mobile accelerators need it)")
    cpu_flags: list[str] = Field(default_factory=list, description="/proc/cpuinfo flags a CPU needs to match")
    threads: int = Field(ge=1, le=256, description="intra-op threads the device runs with")
    opset: int = Field(17, ge=17, le=23, description="ONNX opset of the exported graph")
    optimization: Literal["transformer-fusion", "none"] = Field(
        "transformer-fusion", description="onnxruntime transformer fusions (Attention, LayerNorm, Gelu) or none"
    )
    quantization: QuantizationConfig
    input_shape: InputShape = Field(default_factory=InputShape)
    accuracy_budget: AccuracyBudget = Field(default_factory=AccuracyBudget)
    causal_lm: CausalLMTarget | None = Field(None, description="language models: recipe, budget, timed lengths")
    vision: VisionTarget | None = Field(None, description="image classifiers: recipe, budget, timed batch")

    @model_validator(mode="after")
    def _runtime_can_run_it(self) -> TargetProfile:
        providers, formats, recipes = RUNTIME_WANTS[self.runtime]
        if self.quantization.recipe not in recipes:
            raise ValueError(f"runtime {self.runtime} cannot run quantization recipe '{self.quantization.recipe}' "
                             f"(it runs: {', '.join(recipes)})")
        if self.vision is not None and not self.vision.unsupported:
            ok = VISION_RUNTIME_RECIPES.get(self.runtime, ())
            if self.vision.quantization.recipe not in ok:
                raise ValueError(f"runtime {self.runtime} cannot build image classifiers with quantization recipe "
                                 f"'{self.vision.quantization.recipe}' (it builds: {', '.join(ok)})")
        if self.execution_provider not in providers or self.model_format not in formats:
            raise ValueError(f"runtime {self.runtime} needs execution_provider {' or '.join(providers)} and model_format "
                             f"{' or '.join(formats)}")
        if self.runtime == "executorch" and not self.fixed_shape:
            raise ValueError("runtime executorch exports fixed input shapes: set fixed_shape: true")
        if self.model_format == "ort" and self.execution_provider != "CPUExecutionProvider":
            raise ValueError("model_format ort is for ONNX Runtime Mobile: use execution_provider CPUExecutionProvider "
                             "(and list the device's providers in device_execution_providers)")
        vision_q = self.vision.quantization if self.vision is not None and not self.vision.unsupported else None
        if self.execution_provider == "TensorrtExecutionProvider":
            if self.optimization != "none":
                raise ValueError("TensorrtExecutionProvider cannot run onnxruntime's fused contrib operators "
                                 "(TensorRT fuses the plain graph itself): set optimization: none")
            for section, q in (("quantization", self.quantization), ("vision.quantization", vision_q)):
                if q is not None and q.recipe == "static-qdq-int8" and q.activation_type != "int8":
                    raise ValueError(f"TensorRT's int8 QDQ needs symmetric int8 activations: set {section}.activation_type: int8")
        for section, q in (("quantization", self.quantization), ("vision.quantization", vision_q)):
            if self.execution_provider in GPU_PROVIDERS and q is not None and q.recipe == "dynamic-int8":
                raise ValueError(f"{self.execution_provider} has no dynamic int8 kernels (DynamicQuantizeLinear, "
                                 "DynamicQuantizeMatMul, MatMulIntegerToFloat run on the CPU): use "
                                 f"{section}.recipe fp16 or static-qdq-int8")
        return self

    @property
    def gpu(self) -> bool:
        """Whether the target runs on an NVIDIA GPU provider."""
        return self.execution_provider in GPU_PROVIDERS

    @property
    def effective_threads(self) -> int:
        """The profile's threads, capped at this machine's cores (what latency is measured with here)."""
        return min(self.threads, os.cpu_count() or 1)


def _format_validation_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"field '{field}': {e['msg']}")
    return f"{source}: " + "; ".join(parts)


def load_profile_file(path: Path) -> TargetProfile:
    """Return the profile in a YAML file, or raise ProfileError naming the bad field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{path} is not valid YAML: {str(e).splitlines()[0]}", hint="fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a profile is a YAML mapping of fields", hint="see `edgedistill targets show x86-64-avx2`")
    try:
        return TargetProfile.model_validate(raw)
    except ValidationError as e:
        raise ProfileError(
            _format_validation_error(str(path), e), hint="`edgedistill targets schema` prints every field"
        ) from None


def builtin_profiles() -> dict[str, TargetProfile]:
    """Return the profiles shipped in targets/, by name."""
    profiles = {}
    for path in sorted(TARGETS_DIR.glob("*.yaml")):
        profile = load_profile_file(path)
        profiles[profile.name] = profile
    return profiles


def resolve_target(spec: str | None) -> TargetProfile:
    """Return the profile named by `spec` (a built-in name or a YAML path), or the one matching this CPU if None."""
    if spec is None:
        return detect_target()
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        path = Path(spec)
        if not path.is_file():
            raise ProfileError(f"profile file {spec} does not exist", hint="pass a built-in name or a path to a YAML profile")
        return load_profile_file(path)
    profiles = builtin_profiles()
    if spec not in profiles:
        raise ProfileError(f"unknown target '{spec}'", hint=f"built-in targets: {', '.join(profiles)}")
    return profiles[spec]


def cpu_flags() -> set[str]:
    """Return this CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_target() -> TargetProfile:
    """Return the built-in profile whose CPU flags this machine has, the most specific first."""
    flags = cpu_flags()
    matching = [p for p in builtin_profiles().values() if p.cpu_flags and set(p.cpu_flags) <= flags]
    if not matching:
        raise ProfileError(
            f"no built-in target matches this CPU ({platform.machine()})", hint="pass --target NAME or --target my.yaml"
        )
    return max(matching, key=lambda p: len(p.cpu_flags))


def profile_json_schema() -> dict:
    """Return the JSON Schema of a target profile."""
    return TargetProfile.model_json_schema()
