"""Image classifiers (ImageNet CNNs such as MobileNetV2 and EfficientNet-Lite0).

Examples are fixed, seeded augmented views of the transfer photos (random-resized crops, flips, colour jitter); the
teacher's output on a view is its logits, cached once per view. The student is the teacher pruned channel-wise by
torch-pruning's dependency graph to a share of its MACs (or, with --resolution, fed a smaller resize of the input inside
the graph, its layers intact), then distilled on the teacher's logits at a temperature.
The artifact takes float32 NCHW RGB in [0, 1]: the teacher's normalization is inside the graph.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from edgedistill.errors import EdgeDistillError
from edgedistill.families.base import Family


SEARCH_MACS_RATIOS = (1.0, 0.7, 0.5, 0.35)  # --search: the students tried, as shares of the teacher's MACs
RESOLUTION_STEP = 16  # the student's own input side is a multiple of this (4 for inputs under 128 pixels)
MIN_RESOLUTION_SHARE = 0.5  # ... and at least this share of the input side (a quarter of the MACs); channels go after
MACS_TOLERANCE = 0.05  # a resolution whose MACs are within this share over --macs-ratio meets it (no channel cut)


class NormalizedClassifier(nn.Module):
    """A classifier that takes pixels in [0, 1] and normalizes them itself ((x - mean) / std per channel)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


class Downsampled(nn.Module):
    """A classifier that resizes its input to `resolution` x `resolution` (bilinear) before `model`: the artifact's
    input stays the teacher's, and every convolution after runs on (resolution / size)^2 of the pixels."""

    def __init__(self, model: nn.Module, resolution: int) -> None:
        super().__init__()
        self.model = model
        self.resolution = int(resolution)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(pixels, size=(self.resolution, self.resolution), mode="bilinear",
                                            align_corners=False)
        return self.model(x)


def resolution_step(size: int) -> int:
    return RESOLUTION_STEP if size >= 128 else 4


def auto_resolution(model: nn.Module, size: int, macs_ratio: float, teacher_macs: int | None = None) -> int:
    """Return the student's input side for a share of the teacher's MACs: the largest multiple of resolution_step at
    which `model`'s measured MACs are within macs_ratio (MACS_TOLERANCE over counts), never under MIN_RESOLUTION_SHARE
    of `size` (below that, channels are pruned for the rest). Measured, not size * sqrt(share): a stride-32 network
    rounds its feature maps up (44 px runs 2x2 maps where 64 px runs 2x2 too).

    Why resolution before channels (measured on MobileNetV2, built-in photos, held-out views of 24 photos the compile
    never saw, top-1 agreement / KL with the teacher, before any training): at 160 px (51% of the MACs) 0.593 / 0.72,
    at 128 px (33%) 0.542 / 1.70; channels pruned to 50% of the MACs: 0.028. The layers keep the teacher's weights;
    only the scale of what they see changes."""
    if macs_ratio >= 1.0:
        return size
    step = resolution_step(size)
    floor = max(step, math.ceil(MIN_RESOLUTION_SHARE * size / step) * step)
    teacher_macs = teacher_macs or count_macs(model, size)
    for r in range((size - 1) // step * step, floor, -step):
        if count_macs(Downsampled(model, r), size) <= macs_ratio * (1 + MACS_TOLERANCE) * teacher_macs:
            return r
    return floor


def _probe(model: nn.Module, size: int, modules: list[nn.Module], hook) -> None:
    """Run one zero (1, 3, size, size) image through `model` in eval mode, without gradients, with `hook` as a
    forward hook on `modules`; the hooks are removed and the training mode restored after."""
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def count_macs(model: nn.Module, size: int) -> int:
    """Return the multiply-accumulates of one `size` x `size` image through `model`'s convolutions and Linear layers.
    Counted by isinstance, so subclasses count too (torch-pruning's counter matches exact types and skipped
    EfficientNet-Lite's Conv2dSame: it reported 21M MACs for a 0.4G-MAC network)."""
    total = [0]

    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total[0] += output.numel() * module.in_features

    _probe(model, size, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))], hook)
    return int(total[0])


def check_classifier(module: nn.Module, size: int, path) -> int:
    """Return the number of classes `module` predicts for one (1, 3, size, size) image, or raise one clear line."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, size, size))
    except Exception as e:  # noqa: BLE001  a user's model can raise anything on a wrong input size
        raise EdgeDistillError(f"{path} fails on a (1, 3, {size}, {size}) image: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:160]}", hint="pass the size it takes with --image-size") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EdgeDistillError(f"{path} returns {shape} for one image, not logits (1, classes)",
                               hint="pass a classifier whose forward returns one tensor of class logits")
    return int(out.shape[1])


class ExportedProgramClassifier(nn.Module):
    """A torch.export program's graph as a module. Its graph is fixed in eval semantics (BatchNorm uses its running
    statistics) and has no Conv2d / Linear modules, so it is quantized as it is: not pruned, trained or simulated.
    `train()` only sets the flag: the program's own module refuses train() and eval()."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.program = graph

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.program(pixels)


def is_program(module: nn.Module) -> bool:
    """Whether `module` holds a torch.export program (see ExportedProgramClassifier)."""
    return any(isinstance(m, ExportedProgramClassifier) for m in module.modules())


def _classifier_head(model: nn.Module) -> nn.Module:
    """Return the last Linear layer (the class logits): its outputs are the classes and are never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgeDistillError("the vision teacher has no Linear classifier layer to keep", hint="pass a classifier")
    return linears[-1]


def _pruned(model: nn.Module, size: int, channel_ratio: float, round_to: int | None = 8) -> nn.Module:
    import torch_pruning as tp

    student = copy.deepcopy(model).eval()
    if channel_ratio <= 0:
        return student
    pruner = tp.pruner.BasePruner(student, torch.zeros(1, 3, size, size),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=channel_ratio,
                                  ignored_layers=[_classifier_head(student)], round_to=round_to)
    pruner.step()
    return student


def prune_to_macs(model: nn.Module, size: int, macs_ratio: float,
                  teacher_macs: int | None = None) -> tuple[nn.Module, dict]:
    """Return a copy of `model` with channels pruned (group L2 magnitude, every dependent layer kept consistent by
    torch-pruning's graph, channel counts multiples of 8 unless that lands far under the budget) to at most
    `macs_ratio` of `teacher_macs` (default: `model`'s own MACs), and the record."""
    own_macs = count_macs(model, size)
    teacher_macs = teacher_macs or own_macs
    budget = macs_ratio * teacher_macs
    if own_macs <= budget:
        return copy.deepcopy(model).eval(), {"teacher_macs": teacher_macs, "student_macs": own_macs,
                                             "channel_ratio": 0.0, "macs_ratio": own_macs / teacher_macs}

    def bisect(round_to):
        lo, hi, best = 0.0, 0.95, None
        for _ in range(10):  # bisect the channel pruning ratio: MACs fall monotonically (roughly quadratically) with it
            mid = (lo + hi) / 2
            candidate = _pruned(model, size, mid, round_to)
            macs = count_macs(candidate, size)
            if macs <= budget:
                best, hi = (candidate, mid, macs, round_to), mid
            else:
                lo = mid
        return best

    best = bisect(8)
    # channel counts in multiples of 8 suit SIMD kernels, but in a narrow network (16-64 channels) one step of 8 can
    # halve the MACs: then counts of any size are tried too, and the one closer to the budget is kept
    if best is None or best[2] < 0.9 * budget:
        finer = bisect(None)
        if finer is not None and (best is None or finer[2] > best[2]):
            best = finer
    if best is None:
        raise EdgeDistillError(f"cannot prune the teacher to {macs_ratio:.0%} of its MACs", hint="pass a larger --macs-ratio")
    student, ratio, macs, round_to = best
    return student, {"teacher_macs": teacher_macs, "student_macs": macs, "channel_ratio": round(ratio, 4),
                     "channels_rounded_to": round_to or 1, "macs_ratio": macs / teacher_macs,
                     "importance": "group L2 magnitude (torch-pruning)"}


def _replace(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at the dotted `name` in `root`; return what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = parent.get_submodule(child)
    setattr(parent, child, module) if not child.isdigit() else parent.__setitem__(int(child), module)
    return old


def is_residual(block: nn.Module) -> bool:
    """Whether `block` computes input + f(input): its traced graph returns an addition one of whose terms is the input
    itself (a block torch.fx cannot trace is taken as not residual)."""
    import operator

    from torch import fx

    try:
        graph = fx.symbolic_trace(block).graph
    except Exception:  # noqa: BLE001  a user's block may have data-dependent control flow
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    is_add = (out.op == "call_function" and out.target in (operator.add, operator.iadd, torch.add)) or (
        out.op == "call_method" and out.target in ("add", "add_"))
    return len(inputs) == 1 and isinstance(out, fx.Node) and is_add and inputs[0] in out.args


def droppable_blocks(model: nn.Module, size: int) -> list[str]:
    """Return the names of the residual blocks (input + f(input), same shape out as in) among the children of
    `model`'s nn.Sequential / nn.ModuleList containers, outermost only: a student can go without f, the identity
    path standing in. Which of them matter is measured (drop_blocks), not assumed."""
    shapes: dict[str, tuple] = {}
    containers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]
    names = {id(c): f"{n}.{i}".lstrip(".") for n, m in containers for i, (_, c) in enumerate(m.named_children())}

    def hook(module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            shapes[names[id(module)]] = (tuple(args[0].shape), tuple(output.shape))

    _probe(model, size, [c for _, m in containers for c in m.children()], hook)
    found = sorted((n for n, (i, o) in shapes.items() if i == o and is_residual(model.get_submodule(n))),
                   key=lambda n: n.count("."))
    outermost: list[str] = []
    for n in found:
        if not any(n.startswith(o + ".") for o in outermost):
            outermost.append(n)
    return sorted(outermost, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])


def _kl(teacher_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


def drop_blocks(model: nn.Module, size: int, pixels: torch.Tensor, count: int) -> tuple[nn.Module, dict]:
    """Return a copy of `model` without `count` of its droppable blocks, each replaced by an identity, and the record.

    Greedy by measurement: at each step every remaining block is left out in turn and the one whose absence moves the
    network's outputs on `pixels` least (KL divergence from the full network's) goes."""
    student = copy.deepcopy(model).eval()
    candidates = droppable_blocks(student, size)
    if count > len(candidates):
        raise EdgeDistillError(f"--drop-blocks {count}: the teacher has {len(candidates)} residual blocks that can be "
                               "dropped (input + f(input) in a Sequential or ModuleList)",
                               hint=f"pass --drop-blocks {len(candidates)} or fewer")
    with torch.no_grad():
        reference = student(pixels)
        dropped: list[dict] = []
        for _ in range(count):
            scores = {}
            for name in candidates:
                old = _replace(student, name, nn.Identity())
                scores[name] = _kl(reference, student(pixels))
                _replace(student, name, old)
            name = min(scores, key=scores.get)
            _replace(student, name, nn.Identity())
            dropped.append({"block": name, "kl_after": round(scores[name], 5)})
            candidates.remove(name)
    return student, {"dropped_blocks": dropped, "depth_importance": f"greedy, output KL on {len(pixels)} training views"}


class VisionFamily(Family):
    """ImageNet-style classifiers distilled on the teacher's logits over augmented views of photos."""

    name = "vision"

    def __init__(self, input_size: int = 224) -> None:
        self.input_size = input_size

    def load_data(self, teacher, data_path, opts):
        from edgedistill.images import load_image_set

        return load_image_set(data_path, opts.max_texts)

    def check_target(self, profile) -> None:
        from edgedistill.families import vision_stages as stages

        stages.check_target(profile)

    def check_options(self, teacher, opts, profiles) -> None:
        from edgedistill.families import vision_stages as stages

        stages.check_options(teacher, opts, profiles)

    def distill_student(self, teacher, data, opts, run_dir, profiles):
        from edgedistill.families import vision_stages as stages

        return stages.distill_student(self, teacher, data, opts, run_dir, profiles)

    def build_target(self, distilled, profile, stage_dir, opts):
        from edgedistill.families import vision_build

        return vision_build.build_target(distilled, profile, stage_dir, opts)

    def render_report(self, manifest, published: bool) -> str:
        from edgedistill.families.vision_report import render_report

        return render_report(manifest, published)

    def summary_cells(self, manifest) -> dict[str, str]:
        from edgedistill.families.vision_report import summary_cells

        return summary_cells(manifest)

    def student_shapes(self, teacher, opts) -> list[dict]:
        """The teacher's shape (quantization-aware) and shares of its MACs (a lower input resolution, see auto_resolution)."""
        if is_program(teacher.module):
            raise EdgeDistillError("--search: a torch.export program (.pt2) has no modules to prune into other shapes",
                                   hint="pass a state dict with --arch, or leave out --search")
        macs = count_macs(teacher.module, self.input_size)
        return [{"macs_ratio": r, "resolution": auto_resolution(teacher.module, self.input_size, r, macs)}
                for r in SEARCH_MACS_RATIOS]

    def default_shape(self, teacher, opts) -> dict | None:
        """The teacher's shape (a plain compile's --macs-ratio is 1.0)."""
        return next((s for s in self.student_shapes(teacher, opts) if s["macs_ratio"] == 1.0), None)

    def shape_label(self, shape) -> str:
        return f"{shape['macs_ratio']:.0%} of the MACs ({shape.get('resolution') or self.input_size} px)"

    def search_point(self, manifest) -> tuple[str, float, float | None]:
        lat = manifest.latency
        return "top1_agreement", float(manifest.metrics["values"]["top1_agreement"]), (
            None if "not_measured" in lat else float(lat["artifact"]["p50_ms"]))
