"""Feature matching on stage outputs: the stages found, the least-squares projectors, the wrapper leaving the
student untouched, and a compile with --feature-weight that trains on the loss and records it."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgedistill.artifact import verify_files
from edgedistill.distill import feature_matching as fm
from edgedistill.distill.losses import feature_loss
from edgedistill.families import vision_training
from edgedistill.pipeline import compile
from edgedistill.teachers.vision_archs import mobilenet_v2
from test_vision import opts, photos, profile, tiny_teacher  # noqa: F401 (fixtures)


def test_stages_are_the_last_block_at_each_resolution():
    m = mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    assert fm.stage_names(m, torch.rand(1, 3, 64, 64)) == [f"features.{i}" for i in (1, 3, 6, 13, 18)]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 3))
    # the backbone is the top-level Sequential here: the last module at 32x32 (the ReLU) and at 16x16
    assert fm.stage_names(plain, torch.rand(1, 3, 32, 32)) == ["1", "3"]

    class ResNetLike(nn.Module):  # stages in separate Sequentials (layer1..layer3), a head Sequential of 2-D outputs
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 2, 1)
            self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
            self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1))
            self.layer3 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 3))

        def forward(self, x):
            return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    assert fm.stage_names(ResNetLike().eval(), torch.rand(1, 3, 32, 32)) == ["layer1.1", "layer2.2", "layer3.1", "head.0"]


def test_projectors_start_at_the_least_squares_map_and_the_student_stays_hook_free():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    student = copy.deepcopy(teacher)  # the teacher's own shape: the best projector is the identity
    x = torch.rand(8, 3, 16, 16)
    wrapped, stages = fm.feature_matched(student, teacher, x[:1], x)
    assert wrapped.stages == ["1", "3", "4"]  # the pooled features are a stage too (1x1)
    _, found = fm.run_capturing(teacher, ["1", "3"], x)
    for p, name in zip(wrapped.projectors, ["1", "3"]):  # each live channel keeps most of itself (the ridge shrinks it)
        w = p.weight[:, :, 0, 0].detach().numpy()
        live = (found[name].detach().pow(2).mean((0, 2, 3)) > 1e-6).numpy()  # a ReLU channel may be dead
        assert live.sum() >= 3 and (np.diag(w)[live] > 0.5).all()
    wrapped.train()
    logits = wrapped(x)
    _, theirs = stages(x)
    assert feature_loss(wrapped.projected, theirs).item() < 0.1
    torch.testing.assert_close(logits, teacher(x))
    assert all(not m._forward_hooks for m in student.modules())  # hooks live only inside a call
    with torch.no_grad():
        wrapped.projected = []
        torch.testing.assert_close(wrapped(x), student(x))
        assert wrapped.projected == []  # validation runs the student alone


def test_feature_loss_is_scale_free_and_one_for_zeros():
    t = [torch.randn(2, 3, 4, 4), 1000 * torch.randn(2, 5, 2, 2)]
    assert feature_loss([torch.zeros_like(a) for a in t], t).item() == pytest.approx(1.0)
    assert feature_loss([a.clone() for a in t], t).item() == 0.0


def test_a_feature_matched_compile_trains_on_the_loss_and_records_it(tiny_teacher, photos, tmp_path, monkeypatch):
    spec = str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))
    seen = []
    real = feature_loss

    def spy(student, teacher):
        loss = real(student, teacher)
        seen.append(loss.item())
        return loss

    monkeypatch.setattr(vision_training, "feature_loss", spy)
    matched = compile(tiny_teacher, str(photos), [spec], tmp_path / "fm", opts(macs_ratio=0.5, resolution=64, feature_weight=1.0))
    plain = compile(tiny_teacher, str(photos), [spec], tmp_path / "plain", opts(macs_ratio=0.5, resolution=64))
    assert len(seen) == 3 and all(np.isfinite(seen))  # 48 views / 16: one loss per step, of the matched run only
    m = verify_files(matched.targets[0].path)
    record = m.distillation["feature_matching"]
    assert record["weight"] == 1.0 and record["stages"] == [f"model.features.{i}" for i in (1, 3, 6, 13, 18)]
    assert m.distillation["teacher_outputs"] == "cached on the fixed training views; its stage outputs computed on every batch"
    assert verify_files(plain.targets[0].path).distillation["feature_matching"] is None
    # the projectors are gone: the student is the plain architecture, and the artifact computes it
    assert not any(isinstance(mod, fm.FeatureMatched) for mod in matched.student.modules())
    assert matched.student.state_dict().keys() == plain.student.state_dict().keys()
    assert any(not torch.equal(a, b) for a, b in zip(matched.student.state_dict().values(),
                                                      plain.student.state_dict().values()))
    x = np.load(matched.targets[0].path / "validation-views.npy")[:4].astype(np.float32) / 255.0
    session = ort.InferenceSession(str(matched.targets[0].path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"pixels": x})[0], matched.student(torch.from_numpy(x)).numpy(),
                                   atol=1e-4)
