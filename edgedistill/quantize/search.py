"""Accuracy-aware quantization: when a recipe misses the budget, try its `dynamic` nodes (if any) as weight-only,
then other calibration and per-channel settings, then keep the most sensitive node groups (measured by quantizing
one group at a time) in float until the budget holds. A node kept in float takes its weights from the unrounded
twin when the graph's weights were rounded for int8 (`float_source`)."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from pydantic import BaseModel

from edgedistill.errors import EdgeDistillError
from edgedistill.quantize import Feeds, excluded_nodes, quantize

_LAYER = re.compile(r"layer[._](\d+)")


@dataclass
class Trial:
    """One quantization tried: what changed, its fidelity on the search set, and whether it met the budget."""

    description: str
    config: dict
    fidelity: float
    passed: bool
    size_mb: float
    latency_ms: float | None = None  # median of a few runs at the profile's shape here (None: not runnable here)


def node_groups(model_path: Path, op_types: Sequence[str] | None) -> dict[str, list[str]]:
    """Return the quantizable nodes grouped by role: the node name with its layer index removed."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    groups: dict[str, list[str]] = {}
    for node in graph.node:
        if op_types is None or node.op_type in op_types:
            groups.setdefault(_LAYER.sub("layer.*", node.name), []).append(node.name)
    return groups


def float_bytes(model_path: Path, groups: dict[str, list[str]]) -> dict[str, int]:
    """Return, per group, the bytes of the float weights (initializers) its nodes read: what keeping it in float costs
    in size. Measured on MobileNetV2 (x86-64-avx2, 128 views): ranked by fidelity alone, the search kept the
    classifier in float 14th (5.1 MB of its 11.4 MB artifact) for a probe 0.05 below the float graph's."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) * _ITEM_BYTES.get(t.data_type, 4) for t in graph.initializer}
    by_node = {n.name: sum(sizes.get(i, 0) for i in n.input) for n in graph.node}
    return {g: sum(by_node.get(n, 0) for n in names) for g, names in groups.items()}


_ITEM_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8,
               onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1}


def _pattern(names: list[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def with_float_nodes(model_path: Path, source: dict[str, onnx.TensorProto], patterns: list[str], out: Path) -> Path:
    """Write `model_path` with the weights of the nodes `patterns` exclude from quantization taken from `source` (the
    initializers of the same graph, by name, with the weights as they were before calibrated rounding: a node kept in
    float gets back its own float weights, not the ones rounded for int8 inputs); return `out`."""
    model = onnx.load(str(model_path))
    excluded = set(excluded_nodes(model_path, patterns))
    kept = {name for n in model.graph.node if n.name in excluded for name in n.input}
    for i, t in enumerate(model.graph.initializer):
        if t.name in kept and t.name in source and list(source[t.name].dims) == list(t.dims):
            model.graph.initializer[i].CopyFrom(source[t.name])
    onnx.save(model, str(out))
    return out


def quantize_within_budget(model_path: Path, config: BaseModel, work_dir: Path, calibration: Sequence[Feeds],
                           evaluate: Callable[[Path], float], floor: float,
                           latency: Callable[[Path], float | None] = lambda p: None,
                           float_source: Path | None = None,
                           probe_error: Callable[[Path], float] | None = None) -> tuple[Path, BaseModel, list[Trial]]:
    """Return (model, config, trials): the first trial that meets `floor`, else the most faithful one. `latency`
    times a candidate (sensitivity probes are not timed: they are measurements, not candidates). `float_source`: the
    same graph with the weights before calibrated rounding (`model_path` holds them rounded for int8), for the nodes
    a trial keeps in float and for the reference the search measures against. `probe_error`: an error finer than
    `evaluate`'s fidelity (lower is better; a family whose fidelity is a share of discrete hits, top-1 agreement,
    gives a divergence), measured on each sensitivity probe instead of `evaluate` to rank the groups.

    Groups go to float in order of what each costs alone when quantized (its probe's fidelity lost, or error gained)
    per byte of float weights it keeps (`float_bytes`), so the budget is met with the least size given back; a group
    without weights (an activation-by-activation MatMul, a Clip) costs nothing in size but time in float, and counts
    as the median group."""
    trials: list[Trial] = []
    candidates: list[tuple[float, Path, BaseModel]] = []  # real candidates, not the one-group sensitivity probes
    float_weights: dict[str, onnx.TensorProto] = {}  # float_source's initializers, read once on first use
    merged = work_dir / "float-merged"  # where a trial's graph with some nodes' float weights back is written

    def attempt(cfg: BaseModel, description: str, probe: bool = False) -> bool:
        out = work_dir / f"trial{len(trials)}.onnx"
        try:
            source = model_path
            if float_source is not None and getattr(cfg, "exclude", None):
                if not float_weights:
                    float_weights.update((t.name, t) for t in onnx.load(str(float_source)).graph.initializer)
                # named as the graph it is merged from: the calibration cache (keyed by that name) serves it, so a
                # merged trial reuses the rounded graph's activation ranges instead of calibrating afresh. Measured
                # on MobileNetV2's chosen trial (12 convolutions float): 0.7 s instead of 11.9 s, and top-1
                # agreement 0.93 instead of 0.83 (fresh ranges moved by up to 12%; GPTQ's weights are that sensitive)
                merged.mkdir(exist_ok=True)
                source = with_float_nodes(model_path, float_weights, cfg.exclude, merged / model_path.name)
            quantize(source, cfg, out, calibration)
            if source != model_path:
                source.unlink()
            score = probe_error(out) if probe and probe_error is not None else evaluate(out)
        except EdgeDistillError:
            raise
        except Exception as e:  # onnxruntime rejects some partial-QDQ graphs (quantizer or session); note it, go on
            trials.append(Trial(f"{description} (failed: {str(e).splitlines()[0][:160]})", cfg.model_dump(mode="json"),
                                float("nan"), False, 0.0))
            return False
        trials.append(Trial(description, cfg.model_dump(mode="json"), score,
                            not probe and score >= floor, out.stat().st_size / 1e6, None if probe else latency(out)))
        if not probe:
            candidates.append((score, out, cfg))
        return score >= floor and not probe

    def last() -> tuple[Path, BaseModel, list[Trial]]:
        return candidates[-1][1], candidates[-1][2], trials

    def best() -> tuple[Path, BaseModel, list[Trial]]:
        if not candidates:
            raise EdgeDistillError(f"every quantization trial failed: {trials[0].description}",
                                   hint="choose another quantization recipe in the profile")
        score, path, cfg = max(candidates, key=lambda r: r[0])
        return path, cfg, trials

    if attempt(config, "as the profile says"):
        return last()
    if not getattr(config, "search", False):
        return best()
    unquantized = float_source or model_path
    reference = evaluate(unquantized)  # no quantization at all: the most any search can reach
    trials.append(Trial("reference: the unquantized graph" + (" (its weights before calibrated rounding)"
                                                              if float_source else ""),
                        {}, reference, False, unquantized.stat().st_size / 1e6,
                        latency(unquantized)))
    if reference < floor:
        return best()  # the fp32 student itself misses the budget: quantization is not what to search
    if getattr(config, "dynamic", None):  # int8 at run time missed: int8 weights over float activations instead
        if attempt(config.model_copy(update={"weight_only": [*config.weight_only, *config.dynamic], "dynamic": []}),
                   "dynamic nodes weight-only (float activations)"):
            return last()
    fields = type(config).model_fields
    if "calibration" in fields:
        for method in ("entropy", "percentile", "minmax"):
            if method != config.calibration and attempt(config.model_copy(update={"calibration": method}),
                                                        f"calibration {method}"):
                return last()
    if "per_channel" in fields and not config.per_channel:
        if attempt(config.model_copy(update={"per_channel": True}), "per-channel weights"):
            return last()
    # sensitivity: quantize one group at a time with the most faithful settings so far
    if not candidates:
        return best()
    base = max(candidates, key=lambda r: r[0])[2]
    groups = node_groups(model_path, getattr(base, "op_types", None))
    if len(groups) < 2:
        return best()
    # what quantizing each group alone costs: fidelity lost, or (probe_error) error gained, against no quantization
    base_error = probe_error(unquantized) if probe_error is not None else None
    cost = {}
    what = "error" if probe_error is not None else "fidelity"
    for name in groups:
        others = [n for g, ns in groups.items() if g != name for n in ns]
        cfg = base.model_copy(update={"exclude": [*base.exclude, _pattern(others)]})
        attempt(cfg, f"sensitivity probe ({what}): only {name} quantized", probe=True)
        probe = trials[-1].fidelity
        lost = reference - probe if probe_error is None else probe - base_error
        cost[name] = lost if lost == lost else float("inf")  # a probe that failed: keep that group float first
    weights = float_bytes(model_path, groups)
    typical = float(np.median([b for b in weights.values() if b] or [1]))  # what a group without weights counts as
    excluded: list[str] = []
    for name in sorted(groups, key=lambda g: -cost[g] / (weights[g] or typical)):
        excluded += groups[name]
        if len(excluded) == sum(len(ns) for ns in groups.values()):
            break  # excluding everything is no quantization at all
        cfg = base.model_copy(update={"exclude": [*base.exclude, _pattern(excluded)]})
        if attempt(cfg, f"keep in float: {name} (and {len(excluded) - len(groups[name])} nodes before)"):
            return last()
    return best()
