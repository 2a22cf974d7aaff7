"""`compile --search`: try the family's student shapes within a time budget and keep the fastest artifact that meets
every constraint.

Successive halving on distillation steps: every shape distills for the first rung's share of its schedule (the
learning-rate schedule is always the whole run's), is built for the target and measured there (fidelity to the
teacher on the held-out split, latency, size, by the family's own build_target); the better half by Pareto rank
(fidelity vs latency; on a front, the more isolated first, so the front stays spread; a shape over the latency or
size limit last) goes on from its checkpoint to the next rung,
until one runs the whole schedule. The shape a compile without --search trains (Family.default_shape) runs its
whole schedule straight after the first rung, when the budget allows, so the choice is never worse than the plain
compile's student. All shapes share the teacher's cached outputs. The finished students are then
built with each of the family's recipe variants. Every evaluation is kept in OUT/.edgedistill-run/search/, so a
killed search resumes (`compile --resume OUT`) where it stopped, without re-running what it measured.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from edgedistill import progress
from edgedistill.artifact import Manifest
from edgedistill.errors import EdgeDistillError
from edgedistill.families.base import Family, TargetBuild
from edgedistill.search_report import SEARCH_PAGE, clock, render_search_html

STATE = "state.json"
STATE_VERSION = 1
LATENCY_TIE = 0.05  # latencies this close count as equal when choosing (one timing per evaluation, on a shared machine)
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str) -> float:
    """Return the seconds in '20m', '90s', '1h30m', '1.5h' or a plain number of seconds; raise one line if malformed."""
    m = _DURATION.match(text or "")
    if not text or not text.strip() or m is None or not any(m.groups()):
        raise EdgeDistillError(f"--time-budget {text!r} is not a duration", hint="pass e.g. 20m, 90s or 1h30m")
    if re.search(r"[hm]\s*\d+(?:\.\d+)?\s*$", text):  # '1h30' or '5m30': a unit-less number after a unit
        raise EdgeDistillError(f"--time-budget {text!r} ends in a number without a unit",
                               hint="write the unit of every part, e.g. 1h30m or 5m30s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise EdgeDistillError(f"--time-budget {text!r} is no time at all", hint="pass e.g. 20m")
    return total


def rung_shares(num_shapes: int) -> list[float]:
    """Return the share of the schedule each rung distills to: halving the shapes each rung, the last runs it all
    (8 shapes: 1/8, 1/4, 1/2, 1; the rung's shapes x its share is the same at every rung)."""
    rungs = max(1, math.ceil(math.log2(max(1, num_shapes)))) + (1 if num_shapes > 1 else 0)
    return [2.0 ** (r - rungs + 1) for r in range(rungs)]


def check_search(family: Family, teacher, opts, profiles) -> list[dict[str, Any]]:
    """Return the search's shapes, or raise one line: one target, no shape option given, limits in range."""
    from edgedistill import distributed

    if distributed.world() > 1:
        raise EdgeDistillError("--search runs in one process", hint="run it without accelerate launch / torchrun")
    if len(profiles) != 1:
        raise EdgeDistillError(f"--search builds one target, got {len(profiles)}",
                               hint="pass one --target (run one search per target: latency differs by target)")
    if not opts.time_budget_s > 0:
        raise EdgeDistillError("--time-budget must be positive", hint="pass e.g. --time-budget 20m")
    for name, value in (("--max-latency-ms", opts.max_latency_ms), ("--max-size-mb", opts.max_size_mb)):
        if value is not None and not value > 0:
            raise EdgeDistillError(f"{name} {value} is not a positive limit", hint=f"pass a positive {name} or leave it out")
    if opts.min_fidelity is not None and not 0 < opts.min_fidelity <= 1:
        raise EdgeDistillError(f"--min-fidelity {opts.min_fidelity} is out of range", hint="pass a value in (0, 1]")
    if getattr(opts, "student", None):
        raise EdgeDistillError("--student and --search: the search derives its students from the teacher",
                               hint="leave out --student or --search")
    shapes = family.student_shapes(teacher, opts)
    defaults = type(opts)()
    for key in sorted({k for s in shapes for k in s}):
        if getattr(opts, key) != getattr(defaults, key):
            flag = "--" + key.replace("_", "-")
            raise EdgeDistillError(f"{flag} and --search: the search chooses {flag}", hint=f"leave out {flag} or --search")
    for shape in shapes:
        family.check_options(teacher, dataclasses.replace(opts, **shape), profiles)
    return shapes


@dataclasses.dataclass
class Evaluation:
    """One shape built and measured at one rung (and recipe)."""

    shape_id: str
    rung: int
    share: float
    recipe: str
    metric: str
    fidelity: float
    latency_ms: float | None
    size_mb: float
    passed_target_budget: bool
    steps: int
    total_steps: int
    train_s: float
    build_s: float
    stage: str  # the build's directory, relative to the search directory

    @property
    def key(self) -> str:
        return f"{self.shape_id}/r{self.rung}/{self.recipe}"


def pareto_front(evals: list[Evaluation]) -> list[Evaluation]:
    """Return the evaluations no other beats on both fidelity (higher) and latency (lower) (unmeasured latency last)."""
    def lat(e):
        return math.inf if e.latency_ms is None else e.latency_ms

    return [e for e in evals if not any((o.fidelity >= e.fidelity and lat(o) <= lat(e))
                                        and (o.fidelity > e.fidelity or lat(o) < lat(e)) for o in evals)]


def pareto_ranks(evals: list[Evaluation]) -> dict[str, int]:
    """Return each evaluation's front number (0: non-dominated; 1: non-dominated once front 0 is removed; ...)."""
    ranks, rest, r = {}, list(evals), 0
    while rest:
        front = pareto_front(rest)
        for e in front:
            ranks[e.key] = r
        rest = [e for e in rest if e.key not in ranks]
        r += 1
    return ranks


def crowding(evals: list[Evaluation]) -> dict[str, float]:
    """Return NSGA-II's crowding distance of each evaluation within its set: the normalized gap between its
    neighbours on fidelity and on latency, summed; the ends of each axis are infinitely far. Promoting the more
    isolated points keeps the front spread from the fastest to the most faithful shape."""
    distance = {e.key: 0.0 for e in evals}
    for value in (lambda e: e.fidelity, lambda e: math.inf if e.latency_ms is None else e.latency_ms):
        ordered = sorted(evals, key=value)
        lo, hi = value(ordered[0]), value(ordered[-1])
        distance[ordered[0].key] = distance[ordered[-1].key] = math.inf
        span = hi - lo if math.isfinite(hi - lo) and hi > lo else None
        for before, e, after in zip(ordered, ordered[1:], ordered[2:]):
            if span is not None:
                distance[e.key] += (value(after) - value(before)) / span
    return distance


def promoted(evals: list[Evaluation], limits: Limits, keep: int) -> list[str]:
    """Return the ids of the `keep` evaluations that go on: those over a latency or size limit last (training does
    not change those), then by Pareto front, then the more isolated on their front first (crowding distance)."""
    ranks = pareto_ranks(evals)
    spread: dict[str, float] = {}
    for r in set(ranks.values()):
        spread.update(crowding([e for e in evals if ranks[e.key] == r]))
    order = sorted(evals, key=lambda e: (limits.hard_miss(e), ranks[e.key], -spread[e.key], -e.fidelity))
    return [e.shape_id for e in order[:keep]]


class Limits:
    """The constraints a chosen artifact meets: the target's budget, --min-fidelity, --max-latency-ms, --max-size-mb."""

    def __init__(self, opts) -> None:
        self.min_fidelity, self.max_latency_ms, self.max_size_mb = opts.min_fidelity, opts.max_latency_ms, opts.max_size_mb

    def hard_miss(self, e: Evaluation) -> bool:
        """Whether `e` misses a limit that training will not fix (latency, size)."""
        return ((self.max_latency_ms is not None and (e.latency_ms is None or e.latency_ms > self.max_latency_ms))
                or (self.max_size_mb is not None and e.size_mb > self.max_size_mb))

    def misses(self, e: Evaluation) -> list[str]:
        out = [] if e.passed_target_budget else ["the target's budget"]
        if self.min_fidelity is not None and e.fidelity < self.min_fidelity:
            out.append(f"{e.metric} {e.fidelity:.4f} < {self.min_fidelity:g}")
        if self.max_latency_ms is not None and (e.latency_ms is None or e.latency_ms > self.max_latency_ms):
            out.append("latency not measured" if e.latency_ms is None else f"{e.latency_ms:.2f} ms > {self.max_latency_ms:g}")
        if self.max_size_mb is not None and e.size_mb > self.max_size_mb:
            out.append(f"{e.size_mb:.2f} MB > {self.max_size_mb:g}")
        return out

    def shortfall(self, e: Evaluation) -> float:
        """How far `e` is from meeting every limit (0: meets them), as a sum of relative misses."""
        total = 0.0 if e.passed_target_budget else 0.01
        if self.min_fidelity is not None:
            total += max(0.0, (self.min_fidelity - e.fidelity) / self.min_fidelity)
        if self.max_latency_ms is not None:
            total += 1.0 if e.latency_ms is None else max(0.0, e.latency_ms / self.max_latency_ms - 1)
        if self.max_size_mb is not None:
            total += max(0.0, e.size_mb / self.max_size_mb - 1)
        return total

    def as_dict(self) -> dict:
        return {"min_fidelity": self.min_fidelity, "max_latency_ms": self.max_latency_ms, "max_size_mb": self.max_size_mb}


class SearchState:
    """The search's record on disk (OUT/.edgedistill-run/search/state.json): shapes, rungs, evaluations, time spent."""

    def __init__(self, root: Path, shapes: list[dict], labels: list[str], shares: list[float], resume: bool) -> None:
        self.root = root
        self.shapes = [{"id": f"s{i}", "shape": s, "label": lb} for i, (s, lb) in enumerate(zip(shapes, labels))]
        self.shares = shares
        self.evaluations: list[Evaluation] = []
        self.failed: dict[str, str] = {}  # shape id -> the error that ended it
        self.elapsed_s = 0.0
        state = root / STATE
        if resume and state.is_file():
            saved = json.loads(state.read_text(encoding="utf-8"))
            if saved.get("version") == STATE_VERSION and saved["shapes"] == self.shapes and saved["shares"] == shares:
                self.evaluations = [Evaluation(**e) for e in saved["evaluations"]]
                self.failed = dict(saved.get("failed", {}))
                self.elapsed_s = float(saved["elapsed_s"])
                return
        shutil.rmtree(root, ignore_errors=True)  # not resuming (or another search's record): start over
        root.mkdir(parents=True)

    def find(self, shape_id: str, rung: int, recipe: str) -> Evaluation | None:
        return next((e for e in self.evaluations if (e.shape_id, e.rung, e.recipe) == (shape_id, rung, recipe)), None)

    def save(self, elapsed_s: float) -> None:
        self.elapsed_s = elapsed_s
        tmp = self.root / f".{STATE}.tmp"
        tmp.write_text(json.dumps({"version": STATE_VERSION, "shapes": self.shapes, "shares": self.shares,
                                   "elapsed_s": elapsed_s, "failed": self.failed,
                                   "evaluations": [dataclasses.asdict(e) for e in self.evaluations]},
                                  indent=1), encoding="utf-8")
        tmp.replace(self.root / STATE)


def run_search(family: Family, teacher, data, profile, run_dir: Path, opts) -> tuple[TargetBuild, dict]:
    """Search the family's student shapes for `profile` within opts.time_budget_s; return the chosen build (its
    manifest carrying the search record, `passed` only if it meets every limit) and the record."""
    shapes = check_search(family, teacher, opts, [profile])
    shares = rung_shares(len(shapes))
    state = SearchState(run_dir / "search", shapes, [family.shape_label(s) for s in shapes], shares, opts.resume)
    limits = Limits(opts)
    started = time.monotonic() - state.elapsed_s
    base_recipe = family.recipe_variants(profile)[0][0]
    out_of_time = False

    def elapsed() -> float:
        return time.monotonic() - started

    def evaluate(entry: dict, rung: int, recipe: str, target) -> Evaluation:
        share = shares[rung]
        copts = dataclasses.replace(opts, **entry["shape"], stop_at=None if share >= 1 else share, resume=True,
                                    search=False)
        t0 = time.monotonic()
        distilled = family.distill_student(teacher, data, copts, state.root / entry["id"], [target])
        t1 = time.monotonic()
        stage = state.root / "builds" / f"{entry['id']}-r{rung}-{len(state.evaluations)}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        built = family.build_target(distilled, target, stage, copts)
        keep_only(stage, built)
        metric, fidelity, latency_ms = family.search_point(built.manifest)
        trained = distilled.trained
        steps = trained.steps_done or (trained.history[-1][0] if trained.history else 0)
        e = Evaluation(entry["id"], rung, share, recipe, metric, fidelity, latency_ms, float(built.manifest.sizes["model_mb"]),
                       bool(built.passed), int(steps), int(trained.total_steps or steps), t1 - t0, time.monotonic() - t1,
                       str(stage.relative_to(state.root)))
        state.evaluations.append(e)
        state.save(elapsed())
        lat = "not measured" if latency_ms is None else f"{latency_ms:.2f} ms"
        progress.console.print(f"search [{clock(elapsed())} of {clock(opts.time_budget_s)}]: {entry['label']}, "
                               f"{recipe}, rung {rung + 1}/{len(shares)} ({share:.0%} of the steps): {metric} "
                               f"{fidelity:.4f}, {lat}, {e.size_mb:.2f} MB")
        return e

    def estimate(entry: dict, rung: int) -> float:
        """Seconds the next evaluation of `entry` at `rung` will take, from what was measured."""
        done = sorted((e for e in state.evaluations if e.shape_id == entry["id"] and e.recipe == base_recipe),
                      key=lambda e: e.rung)
        if done:
            last = done[-1]
            before = shares[last.rung - 1] if last.rung else 0.0
            per_share = last.train_s / max(1e-9, last.share - before)
            return per_share * (shares[rung] - shares[last.rung]) + last.build_s
        same_rung = sorted(e.train_s + e.build_s for e in state.evaluations if e.rung == rung)
        return same_rung[len(same_rung) // 2] if same_rung else 0.0  # the median: the first also labelled the data

    alive = [s["id"] for s in state.shapes]
    by_id = {s["id"]: s for s in state.shapes}
    last = len(shares) - 1
    # the plain compile's shape: once its first rung is measured it runs its whole schedule (when that fits), so the
    # search's choice is never worse than a compile without --search; the other shapes go on halving
    default = family.default_shape(teacher, opts)
    incumbent = next((sh["id"] for sh in state.shapes if sh["shape"] == default), None) if last else None
    finished: list[str] = []

    def attempt(sid: str, rung: int) -> None:
        try:
            e = evaluate(by_id[sid], rung, base_recipe, profile)
        except EdgeDistillError as err:  # this shape failed (training diverged, ...): the others go on
            state.failed[sid] = str(err)
            state.save(elapsed())
            progress.console.print(f"search: {by_id[sid]['label']} failed and is dropped: {err}")
            return
        if e.latency_ms is None:
            raise EdgeDistillError(f"--search picks the fastest student, and {profile.name}'s latency cannot be "
                                   "measured on this machine", hint="run the search where the target's device is, "
                                   "or compile without --search")

    reached = -1
    for rung in range(len(shares)):
        for sid in alive:
            if state.find(sid, rung, base_recipe) is not None:
                continue
            if state.evaluations and elapsed() + estimate(by_id[sid], rung) > opts.time_budget_s:
                out_of_time = True  # this one would overrun; a smaller shape of the rung may still fit
                continue
            attempt(sid, rung)
        alive = [sid for sid in alive if sid not in state.failed]
        if not alive:
            break
        if out_of_time:
            break
        reached = rung
        if rung == 0 and incumbent in alive:
            if (state.find(incumbent, last, base_recipe) is None
                    and elapsed() + estimate(by_id[incumbent], last) <= opts.time_budget_s):
                attempt(incumbent, last)
            if state.find(incumbent, last, base_recipe) is not None:
                finished.append(incumbent)
            alive = [sid for sid in alive if sid not in state.failed and sid not in finished]
            if not alive:
                break
        if rung + 1 < len(shares):
            evals = [state.find(sid, rung, base_recipe) for sid in alive]
            alive = promoted(evals, limits, math.ceil(len(evals) / 2))
    if not out_of_time:  # the finished students with the family's other recipes (no training: the students are cached)
        for sid in finished + alive:
            at = last if sid in finished else reached
            for recipe, target in family.recipe_variants(profile)[1:]:
                if state.find(sid, at, recipe) is None:
                    if elapsed() + state.find(sid, at, base_recipe).build_s > opts.time_budget_s:
                        out_of_time = True
                        break
                    evaluate(by_id[sid], at, recipe, target)
    if not state.evaluations:
        raise EdgeDistillError("the search measured nothing" + (f": {next(iter(state.failed.values()))}" if state.failed
                                                                else ""), hint="pass a larger --time-budget")
    plain = None if incumbent is None else {"label": by_id[incumbent]["label"], "whole_schedule": incumbent in finished}
    return choose(family, state, limits, opts, out_of_time, elapsed(), plain)


def latest(state: SearchState) -> list[Evaluation]:
    """Return each (shape, recipe)'s evaluation at the highest rung it reached: the points the search chooses from."""
    best: dict[tuple[str, str], Evaluation] = {}
    for e in state.evaluations:
        k = (e.shape_id, e.recipe)
        if k not in best or e.rung > best[k].rung:
            best[k] = e
    return list(best.values())


def choose(family: Family, state: SearchState, limits: Limits, opts, out_of_time: bool,
           elapsed_s: float, plain: dict | None = None) -> tuple[TargetBuild, dict]:
    """Return the fastest point that meets every limit (else the closest, rejected) as a build, and the record
    (`plain`: the plain compile's shape and whether it ran its whole schedule)."""
    points = latest(state)
    meets = [e for e in points if not limits.misses(e)]
    if meets:  # the fastest; within the timing's noise of it (LATENCY_TIE), the most faithful
        fastest = min(e.latency_ms for e in meets)
        chosen = max((e for e in meets if e.latency_ms <= fastest * (1 + LATENCY_TIE)), key=lambda e: e.fidelity)
    else:
        chosen = min(points, key=lambda e: (limits.shortfall(e), -e.fidelity))
    front = {e.key for e in pareto_front(points)}
    labels = {s["id"]: s["label"] for s in state.shapes}
    record = {
        "method": "successive halving on distillation steps (halving the shapes each rung; promoted by Pareto rank of "
                  "fidelity vs latency, the more isolated on a front first (crowding distance), shapes over the "
                  "latency or size limit last); the plain compile's shape runs its whole schedule after the first "
                  "rung when it fits the budget",
        "time_budget_s": opts.time_budget_s, "elapsed_s": round(elapsed_s, 1), "out_of_time": out_of_time,
        "rung_shares": state.shares, "limits": limits.as_dict(),
        "shapes": state.shapes, "plain_compile_shape": plain,
        "evaluations": [{**dataclasses.asdict(e), "label": labels[e.shape_id], "on_front": e.key in front,
                         "latest": e in points, "misses": limits.misses(e)} for e in state.evaluations],
        "failed": {labels[k]: v for k, v in state.failed.items()},
        "chosen": {"shape_id": chosen.shape_id, "label": labels[chosen.shape_id], "recipe": chosen.recipe,
                   "rung": chosen.rung, "steps": chosen.steps, "total_steps": chosen.total_steps,
                   "meets_every_limit": bool(meets)},
    }
    stage = state.root / chosen.stage
    saved = json.loads((stage / "build.json").read_text(encoding="utf-8"))
    manifest = Manifest.model_validate(saved["manifest"])
    files = {name: stage / name for name in saved["files"]}
    page = stage / SEARCH_PAGE
    page.write_text(render_search_html(record), encoding="utf-8")
    files[SEARCH_PAGE] = page
    verdict = manifest.metrics.get("verdict", "")
    if not meets:
        closest = sorted(points, key=lambda e: (limits.shortfall(e), -e.fidelity))[:3]
        verdict = ("no searched student meets every limit; closest: " + "; ".join(
            f"{labels[e.shape_id]} ({e.recipe}): {', '.join(limits.misses(e))}" for e in closest))
    metrics = {**manifest.metrics, "verdict": verdict, "passed": bool(meets)}
    manifest = manifest.model_copy(update={"search": record, "metrics": metrics})
    return TargetBuild(files, manifest, bool(meets)), record


def keep_only(stage: Path, built: TargetBuild) -> None:
    """Reduce a build's directory to the artifact's files plus build.json (its manifest), so each candidate's build
    can be published later (or after a resume) without building it again."""
    names = {}
    for name, path in built.files.items():
        target = stage / name
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        names[name] = name
    for child in stage.iterdir():
        if child.name not in names:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    # Python's JSON keeps NaN (a training loss not measured at step 0), which pydantic's JSON mode would turn to null
    (stage / "build.json").write_text(json.dumps({"manifest": built.manifest.model_dump(), "files": sorted(names),
                                                  "passed": built.passed}, default=_plain), encoding="utf-8")


def _plain(value):
    """JSON for what a manifest may hold besides JSON's own types: numpy scalars, paths."""
    return value.item() if hasattr(value, "item") else str(value)
