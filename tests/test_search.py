"""compile --search: successive halving over student shapes within a time budget, the front, the choice, limits,
resume after a kill, and the errors its options give."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import _save_tokenizer, make_texts, make_vocab, write_profile
from typer.testing import CliRunner

from edgedistill.artifact import verify_files
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.errors import EdgeDistillError
from edgedistill.pipeline import RUN_DIR, CompileOptions
from edgedistill.search import Evaluation, pareto_front, pareto_ranks, parse_duration, rung_shares

runner = CliRunner()


def _teacher(path: Path, layers: int) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(make_vocab()), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(path)
    _save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    data = root / "data.txt"
    data.write_text("\n".join(make_texts(400)))
    return _teacher(root / "deep", 4), _teacher(root / "shallow", 2), data, write_profile(root / "tiny-cpu.yaml",
                                                                                          min_cosine=0.3)


def _search(teacher, data, profile, out, *extra):
    return runner.invoke(app, ["compile", str(teacher), "--data", str(data), "--target", str(profile), "--out", str(out),
                               "--epochs", "2", "--batch-size", "8", "--search", *extra])


@pytest.mark.parametrize("text,seconds", [("20m", 1200), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400), ("45", 45), ("5m30s", 330)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "20x", "0m", "m", "1h30", "5m 30"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(EdgeDistillError):
        parse_duration(text)


def test_rungs_halve_the_shapes_and_double_the_steps():
    assert rung_shares(8) == [0.125, 0.25, 0.5, 1.0]
    assert rung_shares(6) == [0.125, 0.25, 0.5, 1.0]
    assert rung_shares(2) == [0.5, 1.0]
    assert rung_shares(1) == [1.0]


def _point(i, fidelity, latency):
    return Evaluation(f"s{i}", 0, 1.0, "r", "cosine_mean", fidelity, latency, 1.0, True, 1, 1, 0.0, 0.0, "")


def test_front_and_ranks():
    points = [_point(0, 0.9, 5.0), _point(1, 0.8, 3.0), _point(2, 0.7, 4.0), _point(3, 0.95, 9.0), _point(4, 0.6, 1.0)]
    assert {e.shape_id for e in pareto_front(points)} == {"s0", "s1", "s3", "s4"}  # s2 is beaten by s1 on both
    assert pareto_ranks(points)["s2/r0/r"] == 1


def test_search_measures_every_shape_and_keeps_the_fastest_that_meets_the_limits(workspace, tmp_path):
    deep, _, data, profile = workspace
    out = tmp_path / "out"
    res = _search(deep, data, profile, out, "--time-budget", "10m")
    assert res.exit_code == 0, res.output
    artifact = out / "tiny-cpu"
    verify_files(artifact)  # search.html is one of the hashed files
    manifest = json.loads((artifact / "manifest.json").read_text())
    record = manifest["search"]
    evals = record["evaluations"]
    shapes = {s["id"]: s["shape"] for s in record["shapes"]}
    assert len(shapes) == 6  # 1-3 layers (below the teacher's 4) x FFN 1 and 1/2
    assert record["rung_shares"] == [0.125, 0.25, 0.5, 1.0]
    assert set(manifest["timings"]) == {"load_s", "search_s", "targets"} and manifest["timings"]["search_s"] > 0
    base = [e for e in evals if e["recipe"] == "dynamic-int8"]
    # the plain compile's shape (2 layers: half the teacher's, FFN 1) runs its whole schedule right after the first
    # rung; the other 5 halve: 3, 2, 1
    assert [sum(e["rung"] == r for e in base) for r in range(4)] == [6, 3, 2, 2]
    plain = next(i for i, s in shapes.items() if s == {"student_layers": 2, "ffn_ratio": 1.0})
    assert (base[6]["shape_id"], base[6]["rung"]) == (plain, 3) and base[6]["steps"] == base[6]["total_steps"]
    assert all(e["shape_id"] != plain for e in base if e["rung"] in (1, 2))
    assert record["plain_compile_shape"] == {"label": "2 layers", "whole_schedule": True}
    first = {e["shape_id"]: e for e in base if e["rung"] == 0}
    for e in base:
        assert e["steps"] >= 1 and e["steps"] <= e["total_steps"]
    assert all(e["steps"] < e["total_steps"] for e in first.values())
    finished = [e for e in evals if e["rung"] == 3]
    assert {e["recipe"] for e in finished} == {"dynamic-int8", "dynamic-int8, int4 embeddings"}
    assert len(finished) == 4  # both finished students with both recipes
    assert all(e["steps"] == e["total_steps"] for e in finished)
    # the choice: among the latest points that pass, within 5% of the lowest latency, the most faithful; it is the
    # artifact that was published
    latest = [e for e in evals if e["latest"] and not e["misses"]]
    chosen = record["chosen"]
    fastest = min(e["latency_ms"] for e in latest)
    ties = [e for e in latest if e["latency_ms"] <= fastest * 1.05]
    picked = next(e for e in latest if (e["shape_id"], e["recipe"]) == (chosen["shape_id"], chosen["recipe"]))
    assert picked in ties and picked["fidelity"] == max(e["fidelity"] for e in ties)
    assert manifest["student"]["num_layers"] == shapes[chosen["shape_id"]]["student_layers"]
    page = (artifact / "search.html").read_text()
    assert page.count("<circle") >= len([e for e in evals if e["latest"]]) and "<svg" in page
    report = (artifact / "report.md").read_text()
    assert "## Search" in report and "**Chosen:**" in report
    assert "The plain compile's student (2 layers) ran its whole schedule" in report
    # the choice is never worse than the plain compile's student: as fast or more faithful
    plain_point = next(e for e in base if e["shape_id"] == plain and e["rung"] == 3)
    if not plain_point["misses"]:
        assert picked["latency_ms"] <= plain_point["latency_ms"] * 1.05 or picked["fidelity"] >= plain_point["fidelity"]
    assert not (out / RUN_DIR).exists()


def test_no_shape_meets_the_limits_is_a_rejection_naming_the_closest(workspace, tmp_path):
    _, shallow, data, profile = workspace
    out = tmp_path / "out"
    res = _search(shallow, data, profile, out, "--max-size-mb", "0.0001", "--time-budget", "5m")
    assert res.exit_code == 2
    assert "no searched student meets every limit; closest: 1 layer" in " ".join(res.output.split())
    assert not (out / "tiny-cpu").exists()
    rejected = (out / "tiny-cpu.rejected.md").read_text()
    assert "MB > 0.0001" in rejected and "**Status:** NOT published." in rejected
    assert "larger --time-budget or looser limits" in " ".join(res.output.split())


def test_a_rung_never_takes_a_finished_student_from_the_cache(workspace, tmp_path):
    _, shallow, data, profile = workspace
    for out in ("first", "second"):  # the same cache: the second search finds both shapes' finished students there
        res = _search(shallow, data, profile, tmp_path / out, "--time-budget", "5m")
        assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "second" / "tiny-cpu" / "manifest.json").read_text())["search"]
    first_rung = [e for e in record["evaluations"] if e["rung"] == 0]
    assert first_rung and all(e["steps"] == e["total_steps"] // 2 for e in first_rung)


def test_a_killed_search_resumes_without_measuring_again(workspace, tmp_path, monkeypatch):
    from edgedistill.families import text_encoder_stages

    _, shallow, data, profile = workspace
    out = tmp_path / "out"
    real, builds = text_encoder_stages.build_target, []

    def dies_on_the_second(*args, **kw):
        if builds:
            raise RuntimeError("killed")  # mid-search, after one evaluation was recorded
        builds.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(text_encoder_stages, "build_target", dies_on_the_second)
    res = _search(shallow, data, profile, out, "--time-budget", "5m")
    assert isinstance(res.exception, RuntimeError)
    state = json.loads((out / RUN_DIR / "search" / "state.json").read_text())
    assert len(state["evaluations"]) == 1 and (out / RUN_DIR / "search" / "s0" / "checkpoint").is_dir()
    monkeypatch.setattr(text_encoder_stages, "build_target", lambda *a, **kw: (builds.append(1), real(*a, **kw))[1])
    res = runner.invoke(app, ["compile", "--resume", str(out), "--time-budget", "6m"])  # more time on resume
    assert res.exit_code == 0, res.output
    record = json.loads((out / "tiny-cpu" / "manifest.json").read_text())["search"]
    assert record["time_budget_s"] == 360
    # 2 shapes: rung 1 (both), rung 2 (both: the plain compile's 1 layer runs its whole schedule, the other is
    # promoted) and their int4 recipe = 6 builds in all, the first not repeated
    assert len(record["evaluations"]) == 6 and len(builds) == 6
    assert record["evaluations"][0] == {**record["evaluations"][0], **{k: v for k, v in state["evaluations"][0].items()}}


def test_a_stopped_rung_goes_on_as_one_run(workspace, tmp_path, monkeypatch):
    """Distilling to half the steps, then resuming to the end, gives the uninterrupted run's student."""
    from edgedistill.pipeline import resolve_targets
    from edgedistill.teachers import load_teacher

    _, shallow, data, profile = workspace
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    teacher = load_teacher(str(shallow))
    family = teacher.family
    profiles = resolve_targets([str(profile)])
    base = CompileOptions(student_layers=1, distill=DistillConfig(epochs=2, batch_size=8, eval_every=24))
    texts = family.load_data(teacher, str(data), base)
    import dataclasses

    half = family.distill_student(teacher, texts, dataclasses.replace(base, stop_at=0.5, resume=True),
                                  tmp_path / "run", profiles)
    assert not half.trained.complete and half.trained.steps_done == 48 == half.trained.total_steps // 2
    rest = family.distill_student(teacher, texts, dataclasses.replace(base, resume=True), tmp_path / "run", profiles)
    assert rest.trained.complete
    once = family.distill_student(teacher, texts, dataclasses.replace(base, cache_dir=tmp_path / "other"),
                                  tmp_path / "run2", profiles)
    assert json.dumps(rest.trained.history) == json.dumps(once.trained.history)  # NaN: no loss at step 0
    for (k, a), b in zip(rest.trained.student.state_dict().items(), once.trained.student.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("args,message", [
    (["--time-budget", "20m"], "--time-budget is a limit of --search"),
    (["--search", "--time-budget", "soon"], "is not a duration"),
    (["--search", "--student-layers", "1"], "--student-layers and --search: the search chooses --student-layers"),
    (["--search", "--max-latency-ms", "-1"], "is not a positive limit"),
    (["--search", "--min-fidelity", "1.5"], "--min-fidelity 1.5 is out of range"),
    (["--search", "--target", "x86-64-avx2"], "--search builds one target, got 2"),
])
def test_search_options_refused_in_one_line(workspace, tmp_path, args, message):
    _, shallow, data, profile = workspace
    res = runner.invoke(app, ["compile", str(shallow), "--data", str(data), "--target", str(profile), "--out",
                              str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_a_family_without_shapes_refuses_search(tmp_path):
    from edgedistill.families.base import Family

    class Bare(Family):
        name = "bare"
        check_options = distill_student = build_target = render_report = summary_cells = lambda *a: None

    with pytest.raises(EdgeDistillError, match="offers no student shapes"):
        Bare().student_shapes(None, None)


def test_promotion_keeps_the_front_spread_and_drops_what_misses_a_hard_limit():
    from edgedistill.search import Limits, promoted

    front = [_point(i, 0.6 + 0.04 * i, 1.0 + i) for i in range(8)]  # every point non-dominated
    kept = promoted(front, Limits(CompileOptions()), 4)
    assert {"s0", "s7"} <= set(kept) and len(kept) == 4  # both ends of the front go on
    limited = promoted(front, Limits(CompileOptions(max_latency_ms=4.5)), 4)
    assert set(limited) == {"s0", "s1", "s2", "s3"}  # the shapes over 4.5 ms cannot get faster by training
