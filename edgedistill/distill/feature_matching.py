"""Feature matching on stage outputs (FitNets' hints): each of the student's stage outputs is mapped by a 1x1
projector to the teacher's channels and pulled towards the teacher's stage output on the same images.

A stage is the last block at each spatial resolution of the network's backbone. The student is the teacher pruned
(or the teacher's own shape), so its modules keep the teacher's names and the same stages are found in both; only
their channel counts differ, which the projectors bridge. Projectors start at the least-squares map from the
student's features to the teacher's on a few training images, train with the student, and are dropped afterwards:
the exported student is unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from edgedistill.errors import EdgeDistillError

RIDGE = 0.3  # least-squares start: each student channel's ridge, as a share of its own energy (scale-free). On 36
# held-out views of a freshly pruned MobileNetV2, relative error at the last stage: 0.96 (0.01), 0.85 (0.1), 0.80
# (0.3), 0.76 (1.0); at the first four stages 0.3 costs 0.03-0.05 against 0.01.


def stage_names(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Return the names of the last block at each spatial resolution, in the order they run. Blocks are the children
    of the outermost nn.Sequential / nn.ModuleList containers (MobileNetV2's `features`: features.1, .3, .6, .13,
    .18; a ResNet's layer1..layer4: the last block of each); a classifier head's 2-D outputs are not stages."""
    containers = [n for n, m in module.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]
    outermost = [n for n in containers if not any(n != c and (c == "" or n.startswith(c + ".")) for c in containers)]
    names = [f"{c}.{k}" if c else k for c in outermost for k, _ in module.get_submodule(c).named_children()]
    with torch.no_grad():
        _, shapes = run_capturing(module.eval(), names, example, shapes_only=True)
    spatial = [(n, s[-2:]) for n, s in shapes.items() if len(s) == 4]  # in the order the blocks ran
    return [n for (n, hw), nxt in zip(spatial, spatial[1:] + [(None, None)]) if hw != nxt[1]]


def run_capturing(module: nn.Module, names: list[str], x: torch.Tensor,
                  shapes_only: bool = False) -> tuple[torch.Tensor, dict]:
    """Return `module(x)` and the outputs (or their shapes) of its submodules `names`; the hooks live only for this
    call, so the module itself (and every copy of it) stays hook-free."""
    found: dict = {}  # in the order the modules ran (a module run twice keeps its last output, first place)
    modules = dict(module.named_modules())

    def keep(name):
        def hook(_m, _inputs, output):
            if torch.is_tensor(output):
                found[name] = tuple(output.shape) if shapes_only else output
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names if n in modules]
    try:
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    return out, found


class FeatureMatched(nn.Module):
    """The student with its stage projectors, trained as one module; its forward returns the student's logits and,
    while gradients are on, leaves the projected stage outputs for `take_projected`."""

    def __init__(self, student: nn.Module, stages: list[str], projectors: nn.ModuleList) -> None:
        super().__init__()
        self.student, self.stages, self.projectors = student, stages, projectors
        self.projected: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # validation: the student alone
            return self.student(x)
        logits, found = run_capturing(self.student, self.stages, x)
        self.projected = [p(found[s]) for s, p in zip(self.stages, self.projectors)]
        return logits

    def take_projected(self) -> list[torch.Tensor]:
        """Return the last training forward's projected stage outputs and forget them (the loop deep-copies the
        best model, which a graph's tensors cannot be)."""
        projected, self.projected = self.projected, []
        return projected


def check_feature_weight(weight: float, what: str) -> None:
    """Raise unless --feature-weight is a finite weight >= 0 (`what`: the loss it weighs, for the hint)."""
    if not math.isfinite(weight) or weight < 0:
        raise EdgeDistillError(f"--feature-weight {weight:g} is not a weight >= 0",
                               hint=f"pass a weight >= 0 for {what}, e.g. 1, or leave it out")


def on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Return `module` if it is on `device`, else a copy of it moved there (the original stays where it is: later
    stages time and export the teacher on the CPU)."""
    if next(module.parameters()).device == device:
        return module
    return copy.deepcopy(module).to(device).eval()


class TeacherStages:
    """The teacher's stage outputs on a batch, on the batch's device (a copy of the teacher is moved there once)."""

    def __init__(self, teacher: nn.Module, stages: list[str]) -> None:
        self.teacher, self.stages = teacher.eval(), stages

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.teacher = on_device(self.teacher, x.device)
        with torch.no_grad():
            logits, found = run_capturing(self.teacher, self.stages, x)
        return logits.float(), [found[s].float() for s in self.stages]


def feature_matched(student: nn.Module, teacher: nn.Module, example: torch.Tensor,
                    init_pixels: torch.Tensor) -> tuple[FeatureMatched, TeacherStages]:
    """Return the student wrapped with projectors initialised by least squares on `init_pixels`, and the teacher's
    stage outputs; the stages are the teacher's (the student's names are the teacher's)."""
    stages = stage_names(teacher, example)
    student_names = dict(student.named_modules())
    missing = [s for s in stages if s not in student_names]
    if not stages or missing:
        from edgedistill.errors import EdgeDistillError

        raise EdgeDistillError("feature matching found no stage outputs shared by the teacher and the student"
                               + (f" (missing from the student: {', '.join(missing[:3])})" if missing else ""),
                               hint="leave out --feature-weight")
    teacher_stages = TeacherStages(teacher, stages)
    with torch.no_grad(), _training_without_side_effects(student):  # fitted as the student runs while it trains
        _, theirs = teacher_stages(init_pixels)
        _, ours = run_capturing(student, stages, init_pixels)
    projectors = nn.ModuleList(_least_squares_projector(ours[s], t) for s, t in zip(stages, theirs))
    return FeatureMatched(student, stages, projectors), teacher_stages


def _least_squares_projector(ours: torch.Tensor, theirs: torch.Tensor) -> nn.Conv2d:
    """A bias-free 1x1 convolution W minimising |W ours - theirs|² over every pixel (ridge-regularised)."""
    s = ours.double().permute(1, 0, 2, 3).flatten(1)  # (C_student, N*H*W)
    t = theirs.double().permute(1, 0, 2, 3).flatten(1)
    gram = s @ s.T
    gram += torch.diag(RIDGE * gram.diagonal() + 1e-12)  # each channel's ridge in its own scale
    weight = torch.linalg.solve(gram, s @ t.T).T  # (C_teacher, C_student)
    conv = nn.Conv2d(s.shape[0], t.shape[0], 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight.float()[:, :, None, None])
    return conv


@contextlib.contextmanager
def _training_without_side_effects(module: nn.Module):
    """Run `module` in training mode (BatchNorm on batch statistics) and put back its buffers (running statistics)
    and mode afterwards."""
    was = module.training
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    module.train()
    try:
        yield
    finally:
        module.train(was)
        with torch.no_grad():
            for k, b in module.named_buffers():
                b.copy_(buffers[k])
