"""The latency timer, the distillation losses, and the validation metrics / budget check."""
from __future__ import annotations

import math
import statistics
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgedistill.bench.timer import LatencyStats, measure, percentile, summarize
from edgedistill.distill.losses import classification_loss, embedding_loss, fidelity, token_state_loss
from edgedistill.targets import AccuracyBudget
from edgedistill.validate import check_budget, fidelity_metrics, validate

# ---- percentile / summarize --------------------------------------------------------------------------------------


def test_percentile_endpoints_and_interpolation():
    v = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 5.0
    assert percentile(v, 50) == 3.0
    assert percentile(v, 25) == 2.0
    assert percentile(v, 90) == pytest.approx(4.6)
    assert percentile([10.0, 20.0], 50) == pytest.approx(15.0)
    assert percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    v = sorted(rng.exponential(size=101).tolist())
    for q in (0, 1, 5, 37.5, 50, 90, 99, 100):
        assert percentile(v, q) == pytest.approx(float(np.percentile(v, q)))


def test_percentile_empty():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]  # unsorted on purpose
    s = summarize(samples)
    assert isinstance(s, LatencyStats)
    assert s.runs == 5
    assert s.p50_ms == 3.0
    assert s.p90_ms == pytest.approx(4.6)
    assert s.p99_ms == pytest.approx(4.96)
    assert s.mean_ms == 3.0
    assert s.stdev_ms == pytest.approx(statistics.stdev(samples))
    assert s.p50_ms <= s.p90_ms <= s.p99_ms


def test_summarize_single_sample():
    s = summarize([2.5])
    assert s.runs == 1 and s.stdev_ms == 0.0 and s.p50_ms == s.p99_ms == s.mean_ms == 2.5


def test_as_dict_rounds():
    d = summarize([1.123456789, 2.0]).as_dict()
    assert d["runs"] == 2 and isinstance(d["runs"], int)
    assert d["p50_ms"] == round(1.5617283945, 4)
    assert set(d) == {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "stdev_ms", "runs"}


# ---- measure -----------------------------------------------------------------------------------------------------

def test_measure_rotates_over_inputs_and_respects_min_runs():
    calls = []
    stats = measure(calls.append, ["a", "b", "c"], warmup=2, min_runs=9, max_runs=100, min_time_s=0.0)
    assert stats.runs == 9
    assert calls[:2] == ["a", "b"]  # warm-up
    timed = calls[2:]
    assert timed == ["a", "b", "c"] * 3
    assert Counter(timed) == {"a": 3, "b": 3, "c": 3}


def test_measure_every_input_used():
    calls = []
    inputs = list(range(7))
    stats = measure(calls.append, inputs, warmup=0, min_runs=20, max_runs=20, min_time_s=0.0)
    assert stats.runs == 20 == len(calls)
    assert set(calls) == set(inputs)
    assert calls == [i % 7 for i in range(20)]


def test_measure_max_runs_caps_min_time():
    calls = []
    stats = measure(calls.append, [0], warmup=0, min_runs=3, max_runs=12, min_time_s=60.0)
    assert stats.runs == 12 == len(calls)


def test_measure_min_time_extends_runs():
    import time

    calls = []
    stats = measure(lambda x: (calls.append(x), time.sleep(0.002)), [0, 1], warmup=0, min_runs=2, max_runs=10_000,
                    min_time_s=0.05)
    assert stats.runs > 2
    assert stats.runs == len(calls)


def test_measure_reports_milliseconds():
    import time

    stats = measure(lambda _: time.sleep(0.01), [None], warmup=0, min_runs=3, max_runs=3, min_time_s=0.0)
    assert 9.0 <= stats.p50_ms < 200.0
    assert stats.mean_ms >= 9.0


def test_measure_no_inputs():
    with pytest.raises(ValueError):
        measure(lambda _: None, [])


# ---- losses ------------------------------------------------------------------------------------------------------

def test_embedding_loss_zero_for_identical():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert embedding_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_embedding_loss_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    loss = embedding_loss(a, b)
    assert loss.item() > 0.1
    expected = F.mse_loss(a, b) + (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_embedding_loss_scale_matters():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    loss = embedding_loss(2 * x, x)  # same direction, different scale: only the MSE term
    assert loss.item() == pytest.approx(F.mse_loss(2 * x, x).item(), rel=1e-5)
    assert loss.item() > 0


def test_embedding_loss_has_gradient():
    s = torch.randn(2, 4, requires_grad=True)
    embedding_loss(s, torch.randn(2, 4)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def _kl(teacher_logits, student_logits, t):
    p = F.softmax(teacher_logits / t, dim=-1)
    return (p * (F.log_softmax(teacher_logits / t, dim=-1) - F.log_softmax(student_logits / t, dim=-1))).sum(-1).mean()


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_classification_loss_is_kl_times_t2(t):
    g = torch.Generator().manual_seed(3)
    s, te = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    loss = classification_loss(s, te, None, temperature=t, label_weight=0.5)
    assert loss.item() == pytest.approx((_kl(te, s, t) * t * t).item(), rel=1e-5)
    assert loss.item() > 0


def test_classification_loss_zero_for_equal_logits():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    assert classification_loss(x, x.clone(), None, temperature=2.0, label_weight=0.3).item() == pytest.approx(0.0, abs=1e-6)
    # shift-invariant: softmax of logits + c is the same distribution
    assert classification_loss(x + 5.0, x, None, temperature=2.0, label_weight=0.3).item() == pytest.approx(0.0, abs=1e-5)


def test_classification_loss_with_labels():
    g = torch.Generator().manual_seed(5)
    s, te = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    t, w = 2.0, 0.25
    loss = classification_loss(s, te, labels, temperature=t, label_weight=w)
    expected = (1 - w) * _kl(te, s, t) * t * t + w * F.cross_entropy(s, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # label_weight 0 -> labels ignored
    assert classification_loss(s, te, labels, temperature=t, label_weight=0.0).item() == pytest.approx(
        classification_loss(s, te, None, temperature=t, label_weight=0.0).item(), rel=1e-6)


def test_fidelity_embeddings():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    assert fidelity(x, x, "feature-extraction") == pytest.approx(1.0, abs=1e-6)
    assert fidelity(x, -x, "feature-extraction") == pytest.approx(-1.0, abs=1e-6)
    assert fidelity(3 * x, x, "feature-extraction") == pytest.approx(1.0, abs=1e-6)


def test_fidelity_classification():
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([[9.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert fidelity(s, t, "text-classification") == pytest.approx(0.5)
    assert fidelity(t, t, "text-classification") == 1.0


# ---- validate ----------------------------------------------------------------------------------------------------

def test_fidelity_metrics_cosine_identical():
    x = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    m = fidelity_metrics(x, x, "feature-extraction")
    assert set(m) == {"cosine_mean", "cosine_min", "cosine_p5"}
    for v in m.values():
        assert v == pytest.approx(1.0, abs=1e-6)


def test_fidelity_metrics_cosine_values():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 0.0]])
    m = fidelity_metrics(a, b, "feature-extraction")
    assert m["cosine_mean"] == pytest.approx((1 + 0 - 1 + 0) / 4)
    assert m["cosine_min"] == pytest.approx(-1.0)
    assert all(math.isfinite(v) for v in m.values())  # zero vector does not divide by zero


def test_fidelity_metrics_classification():
    s = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    t = np.array([[9.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = np.array([0, 1, 2, 0])
    m = fidelity_metrics(s, t, "text-classification", labels)
    assert m["top1_agreement"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(1.0)
    assert m["teacher_accuracy"] == pytest.approx(0.5)
    ts, tt = torch.tensor(s), torch.tensor(t)
    expected_kl = _kl(tt, ts, 1.0).item()
    assert m["kl_mean"] == pytest.approx(expected_kl, rel=1e-9)
    assert m["kl_mean"] > 0


def test_fidelity_metrics_classification_identical():
    x = np.random.default_rng(1).normal(size=(8, 4))
    m = fidelity_metrics(x, x, "text-classification")
    assert m["top1_agreement"] == 1.0
    assert m["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert "accuracy" not in m


def test_fidelity_metrics_large_logits_stable():
    x = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    m = fidelity_metrics(x, x, "text-classification")
    assert math.isfinite(m["kl_mean"]) and m["kl_mean"] == pytest.approx(0.0, abs=1e-9)


def test_check_budget_pass_and_fail_embeddings():
    budget = AccuracyBudget(min_cosine=0.9, min_top1_agreement=0.9)
    ok, msg = check_budget({"cosine_mean": 0.95}, "feature-extraction", budget)
    assert ok is True and "0.9500" in msg and "budget 0.9" in msg
    ok, msg = check_budget({"cosine_mean": 0.9}, "feature-extraction", budget)
    assert ok is True  # equal to the floor passes
    ok, msg = check_budget({"cosine_mean": 0.8766}, "feature-extraction", budget)
    assert ok is False
    assert "0.0234 below" in msg
    assert "mean cosine" in msg


def test_check_budget_classification_uses_top1():
    budget = AccuracyBudget(min_cosine=0.99, min_top1_agreement=0.8)
    ok, msg = check_budget({"top1_agreement": 0.75, "cosine_mean": 1.0}, "text-classification", budget)
    assert ok is False and "top-1 agreement" in msg and "0.0500 below" in msg
    ok, _ = check_budget({"top1_agreement": 0.85}, "text-classification", budget)
    assert ok is True


def test_validate_combines_metrics():
    rng = np.random.default_rng(2)
    teacher = rng.normal(size=(6, 8))
    student = teacher + 0.01 * rng.normal(size=(6, 8))
    artifact = student + 0.001
    v = validate(artifact, teacher, student, "feature-extraction", AccuracyBudget(min_cosine=0.9))
    assert v.passed
    assert v.metrics["max_abs_diff_vs_torch_student"] == pytest.approx(0.001)
    assert "torch_student_cosine_mean" in v.metrics and v.metrics["cosine_mean"] > 0.99
    v = validate(-teacher, teacher, student, "feature-extraction", AccuracyBudget(min_cosine=0.9))
    assert not v.passed and "below" in v.verdict


def test_measure_interleaved_blocks_and_paired_ratio_cancels_load():
    import time

    from edgedistill.bench.timer import measure_interleaved, paired_ratio

    calls = []

    def slow(x):
        calls.append(("slow", x))
        time.sleep(0.002)

    def fast(x):
        calls.append(("fast", x))
        time.sleep(0.001)

    stats = measure_interleaved({"slow": (slow, [0, 1]), "fast": (fast, [0, 1])}, warmup=1, min_blocks=4,
                                min_time_s=0.0, block_s=0.01, settle=1)
    assert len(stats["slow"].block_p50_ms) == len(stats["fast"].block_p50_ms) == 4
    names = [c[0] for c in calls[2:]]  # after one warm-up call each
    switches = sum(1 for a, b in zip(names, names[1:]) if a != b)
    assert names[0] == "slow" and switches == 7  # 4 blocks each, in turn: slow, fast, slow, fast, ...
    assert {c[1] for c in calls} == {0, 1}  # inputs rotate
    assert stats["slow"].runs >= 4 * 3  # at least 3 timed calls per block
    assert 1.5 < paired_ratio(stats["slow"].block_p50_ms, stats["fast"].block_p50_ms) < 2.5
    # a load burst that hits one block pair of both candidates does not move the paired ratio
    a, b = [2.0] * 9 + [20.0], [1.0] * 9 + [10.0]
    assert paired_ratio(a, b) == 2.0


def test_token_state_loss_is_zero_for_equal_states_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert float(token_state_loss(teacher.clone(), teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    student = teacher + 0.3 * torch.randn(3, 5, 8, generator=g)
    value = float(token_state_loss(student, teacher, mask))
    assert value > 0.01
    # what sits at padded positions does not count, on either side
    pad = (mask == 0).unsqueeze(-1)
    assert float(token_state_loss(student.masked_fill(pad, 1e3), teacher.masked_fill(pad, -7.0), mask)) \
        == pytest.approx(value, rel=1e-6)
    # scale-free: the MSE is relative to the teacher's energy, the cosine has no scale
    assert float(token_state_loss(10 * student, 10 * teacher, mask)) == pytest.approx(value, rel=1e-5)
    # the gradient reaches the student's states
    s = student.clone().requires_grad_(True)
    token_state_loss(s, teacher, mask).backward()
    assert s.grad[mask.bool()].abs().sum() > 0 and s.grad[~mask.bool()].abs().sum() == 0
