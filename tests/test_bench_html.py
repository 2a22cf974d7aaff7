"""The HTML bench report: a self-contained page with the results table and two embedded PNG plots."""
from __future__ import annotations

import base64
import random
import re

from edgedistill.bench.html import pareto_front, render_html
from edgedistill.bench.results import BenchResult, ModelResult, ShapeLatency

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOT_MEASURED_REASON = "onnxruntime-openvino is not installed"


def _latency(p50: float, batch: int, seed: int, runs: int = 60) -> ShapeLatency:
    """A ShapeLatency whose statistics are computed from made-up samples around `p50`."""
    rng = random.Random(seed)
    samples = sorted(rng.lognormvariate(0, 0.08) * p50 for _ in range(runs))
    mean = sum(samples) / runs
    stdev = (sum((s - mean) ** 2 for s in samples) / (runs - 1)) ** 0.5
    q = lambda f: samples[min(runs - 1, int(f * runs))]  # noqa: E731
    return ShapeLatency(batch=batch, sequence=128, threads=2, p50_ms=q(0.5), p90_ms=q(0.9), p99_ms=q(0.99), mean_ms=mean,
                        stdev_ms=stdev, runs=runs, throughput_items_s=1000 * batch / mean, samples_ms=samples)


def make_result(teacher_name: str = "teacher (all-MiniLM-L6-v2)") -> BenchResult:
    """A teacher, three artifacts on ort-cpu and one artifact runtime that was not measured."""
    rows = [  # name, runtime, p50 at batch 1, p50 at batch 8, size MB, peak RSS MB, cosine_mean
        (teacher_name, "torch", 40.0, 260.0, 90.9, 820.0, None),
        ("minilm-fp32-fused", "ort-cpu", 24.0, 150.0, 90.4, 410.0, 0.99995),
        ("minilm-int8-dynamic", "ort-cpu", 11.0, 70.0, 23.0, 260.0, 0.9912),
        ("minilm-int8-static", "ort-cpu", 13.5, 82.0, 23.1, 265.0, 0.9741),  # dominated by int8-dynamic
    ]
    results = []
    for i, (name, runtime, p1, p8, size, rss, cos) in enumerate(rows):
        lat = [_latency(p1, 1, seed=10 * i), _latency(p8, 8, seed=10 * i + 1)]
        r = ModelResult(name=name, role="teacher" if i == 0 else "artifact", runtime=runtime, latency=lat,
                        model_size_mb=size, peak_rss_mb=rss, artifact_dir=None if i == 0 else f"artifacts/{name}")
        if cos is not None:
            r.accuracy = {"cosine_mean": cos, "cosine_min": cos - 0.02, "cosine_p5": cos - 0.005,
                          "retrieval_agreement_at_10": min(1.0, cos - 0.01)}
        results.append(r)
    teacher_p50 = {lat.key: lat.p50_ms for lat in results[0].latency}
    for r in results:
        r.ratio_to_teacher = {lat.key: lat.p50_ms / teacher_p50[lat.key] for lat in r.latency}
    results.append(ModelResult(name="minilm-int8-dynamic", role="artifact", runtime="ort-openvino",
                               artifact_dir="artifacts/minilm-int8-dynamic", status="not measured", reason=NOT_MEASURED_REASON))
    return BenchResult(
        created_utc="2025-01-01T00:00:00+00:00",
        machine={"platform": "Linux-6.8-x86_64", "machine": "x86_64", "processor": "Test CPU @ 3.0GHz", "cores": 2},
        teacher={"name": "sentence-transformers/all-MiniLM-L6-v2", "sha256": "ab" * 32, "task": "feature-extraction"},
        data={"source": "held-out split of transfer.txt", "num_texts": 200, "labelled": False},
        settings={"threads": 2, "batches": [1, 8], "sequence": 128, "rounds": 3, "min_time_s_per_round": 1.0},
        results=results,
    )


def png_images(page: str) -> list[bytes]:
    """The decoded bytes of every embedded base64 PNG in the page."""
    return [base64.b64decode(b) for b in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_render_html_is_self_contained_with_table_and_two_plots():
    result = make_result()
    page = render_html(result)
    assert "<html" in page
    assert page.count("data:image/png;base64,") == 2
    images = png_images(page)
    assert len(images) == 2 and all(img.startswith(PNG_SIGNATURE) and len(img) > 1000 for img in images)
    for r in result.results:
        assert r.name in page and r.runtime in page
    assert f"not measured: {NOT_MEASURED_REASON}" in page
    assert "b1_s128_t2" in page and "b8_s128_t2" in page
    assert "Test CPU @ 3.0GHz" in page and "held-out split of transfer.txt" in page
    assert "cosine_mean 0.9912" in page
    assert "× faster" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no external resources


def test_render_html_escapes_text():
    page = render_html(make_result(teacher_name="<script>alert(1)</script>"))
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert len(png_images(page)) == 2


def test_render_html_classification_and_nothing_measured():
    result = make_result()
    for r in result.results[1:4]:
        r.accuracy = {"top1_agreement": r.accuracy["cosine_mean"], "kl_mean": 0.01}
    page = render_html(result)
    assert "top1_agreement" in page and len(png_images(page)) == 2
    only_failed = result.model_copy(update={"results": result.results[-1:]})
    page = render_html(only_failed)
    assert NOT_MEASURED_REASON in page
    assert all(img.startswith(PNG_SIGNATURE) for img in png_images(page)) and len(png_images(page)) == 2


def test_pareto_front_drops_dominated_points():
    points = [(40.0, 1.0, "teacher"), (24.0, 0.9999, "fp32"), (11.0, 0.99, "int8"), (13.5, 0.97, "static")]
    assert pareto_front(points) == ["int8", "fp32", "teacher"]
    assert pareto_front([(10.0, 0.9, "a"), (20.0, 0.8, "b")]) == ["a"]  # b: slower and worse


def test_pareto_front_ties():
    # identical points dominate neither each other: both stay, ordered by name
    assert pareto_front([(10.0, 0.9, "b"), (10.0, 0.9, "a")]) == ["a", "b"]
    # same latency, lower fidelity: dominated; same fidelity, higher latency: dominated
    assert pareto_front([(10.0, 0.9, "a"), (10.0, 0.8, "b"), (12.0, 0.9, "c")]) == ["a"]


def test_pareto_front_single_and_empty():
    assert pareto_front([(5.0, 0.5, "only")]) == ["only"]
    assert pareto_front([]) == []
