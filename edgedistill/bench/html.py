"""A self-contained HTML report of a bench run: the results table and two embedded PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from edgedistill.bench.results import BenchResult, ModelResult  # noqa: E402

PRIMARY_METRICS = ("cosine_mean", "top1_agreement")  # embeddings, classification
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f2f2f2}
td.num{text-align:right}tr.nm td{color:#888;font-style:italic}img{max-width:100%;display:block;margin:1em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{font-weight:bold}dd{margin:0}"""


def pareto_front(points: list[tuple[float, float, str]]) -> list[str]:
    """Names of the points no other point dominates (minimize x, maximize y), sorted by x (then by -y, name)."""
    def dominated(p: tuple[float, float, str]) -> bool:
        return any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)
    return [p[2] for p in sorted((p for p in points if not dominated(p)), key=lambda p: (p[0], -p[1], p[2]))]


def _label(r: ModelResult) -> str:
    return f"{r.name} [{r.runtime}]"


def _measured(result: BenchResult) -> list[ModelResult]:
    return [r for r in result.results if r.status == "measured" and r.latency]


def _shape_keys(result: BenchResult) -> list[str]:
    """Shape keys in the order they were measured (teacher first)."""
    return list(dict.fromkeys(lat.key for r in result.results for lat in r.latency))


def _primary_metric(result: BenchResult) -> str:
    """`cosine_mean` for embeddings, `top1_agreement` for classification."""
    for name in PRIMARY_METRICS:
        if any(name in r.accuracy for r in result.results):
            return name
    return "cosine_mean" if result.teacher.get("task") == "feature-extraction" else "top1_agreement"


def _png(fig: Figure) -> str:
    """The figure as a base64 PNG string; closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _empty(title: str, text: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def _latency_plot(result: BenchResult) -> str:
    """Plot 1: a box plot of every timed run per measured model, one panel per shape key (base64 PNG)."""
    keys, rows = _shape_keys(result), _measured(result)
    if not keys:
        return _png(_empty("Latency distribution", "no latency measured"))
    width = max(4.5, 0.9 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), 5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pairs = [(_label(r), lat) for r in rows for lat in r.latency if lat.key == key]
        data = [lat.samples_ms or [lat.p50_ms] for _, lat in pairs]
        ax.boxplot(data, showfliers=True, medianprops={"color": "tab:red"}, flierprops={"markersize": 3})
        ax.set_xticks(range(1, len(pairs) + 1))
        ax.set_xticklabels([name for name, _ in pairs], rotation=30, ha="right")
        p50s = [lat.p50_ms for _, lat in pairs if lat.p50_ms > 0]
        if p50s and max(p50s) / min(p50s) > 10:
            ax.set_yscale("log")
        ax.set_title(f"{key}  (batch × sequence × threads)")
        ax.set_ylabel("latency per batch (ms)" + (", log scale" if ax.get_yscale() == "log" else ""))
        ax.grid(axis="y", alpha=0.3, which="both")
    fig.suptitle("Latency distribution per model and runtime (every timed run)")
    fig.tight_layout()
    return _png(fig)


def _accuracy_plot(result: BenchResult) -> str:
    """Plot 2: fidelity vs p50 latency at the first shape key, with the Pareto front (base64 PNG)."""
    keys, metric = _shape_keys(result), _primary_metric(result)
    points: list[tuple[float, float, str]] = []
    for r in _measured(result):
        lat = next((x for x in r.latency if keys and x.key == keys[0]), None)
        y = 1.0 if r.role == "teacher" else r.accuracy.get(metric)
        if lat is not None and y is not None:
            points.append((lat.p50_ms, y, _label(r)))
    title = f"Fidelity vs latency at {keys[0]}" if keys else "Fidelity vs latency"
    if not points:
        return _png(_empty(title, "no measured model with latency and fidelity"))
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    other = [p for p in points if p[2] not in front]
    on = sorted((p for p in points if p[2] in front), key=lambda p: (p[0], -p[1]))
    if other:
        ax.scatter([p[0] for p in other], [p[1] for p in other], s=45, c="tab:gray", label="dominated", zorder=3)
    ax.plot([p[0] for p in on], [p[1] for p in on], drawstyle="steps-post", color="tab:blue", marker="*", markersize=13,
            markeredgecolor="k", markeredgewidth=0.5, label="Pareto front (not dominated)", zorder=4)
    for i, (x, y, name) in enumerate(sorted(points, key=lambda p: (p[0], -p[1]))):
        ax.annotate(name, (x, y), xytext=(7, 7 if i % 2 == 0 else -13), textcoords="offset points", fontsize=8)
    xs = [p[0] for p in points]
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ys = [p[1] for p in points]
    pad = max(0.002, (max(ys) - min(ys)) * 0.15)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.margins(x=0.2)
    ax.set_xlabel(f"p50 latency at {keys[0]} (ms)" + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(f"{metric} vs teacher (teacher = 1.0)")
    ax.set_title(f"{title}: left is faster, higher is more faithful")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return _png(fig)


def _dl(title: str, d: dict) -> str:
    items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in d.items())
    return f"<h3>{html.escape(title)}</h3><dl>{items}</dl>"


def _table(result: BenchResult) -> str:
    """The markdown table's information as an HTML table."""
    keys, e = _shape_keys(result), html.escape
    head = ["model", "runtime", *[f"p50 ms {k}" for k in keys], "size MB", "peak RSS MB", "fidelity vs teacher"]
    out = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in result.results:
        first = f"<td>{e(r.name)}</td><td>{e(r.runtime)}</td>"
        if r.status != "measured":
            dashes = "<td>—</td>" * (len(keys) + 2)
            out.append(f'<tr class="nm">{first}{dashes}<td>not measured: {e(r.reason or "")}</td></tr>')
            continue
        by_key = {lat.key: lat for lat in r.latency}
        cells = []
        for k in keys:
            lat, ratio = by_key.get(k), r.ratio_to_teacher.get(k)
            speed = f" ({1 / ratio:.1f}× faster)" if ratio and r.role == "artifact" else ""
            cells.append(f'<td class="num">{lat.p50_ms:.2f}{speed}</td>' if lat else "<td>—</td>")
        acc = "<br>".join(f"{e(k)} {v:.4f}" for k, v in r.accuracy.items()) or "(reference)"
        size = f"{r.model_size_mb:.1f}" if r.model_size_mb is not None else "—"
        rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "—"
        out.append(f'<tr>{first}{"".join(cells)}<td class="num">{size}</td><td class="num">{rss}</td><td>{acc}</td></tr>')
    return "\n".join(out) + "</tbody></table>"


def render_html(result: BenchResult) -> str:
    """Return one self-contained HTML page (no external resources) reporting a bench run."""
    e = html.escape
    teacher = str(result.teacher.get("name", "teacher"))
    keys = _shape_keys(result)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgedistill bench: {e(teacher)}</title><style>{_CSS}</style></head>
<body><h1>edgedistill bench: {e(teacher)}</h1>
<p>Created {e(result.created_utc)} (schema v{result.schema_version}).</p>
{_dl("Machine", result.machine)}{_dl("Teacher", result.teacher)}{_dl("Data", result.data)}{_dl("Settings", result.settings)}
<h2>Results</h2>
<p>p50 latency per shape (batch, sequence, threads) with the speed-up vs the teacher; fidelity is measured against the teacher's outputs.</p>
{_table(result)}
<h2>Latency distribution</h2>
<img alt="latency distribution per model and runtime" src="data:image/png;base64,{_latency_plot(result)}">
<h2>Fidelity vs latency{e(f" at {keys[0]}") if keys else ""}</h2>
<p>Primary fidelity metric: {e(_primary_metric(result))}. Starred points form the Pareto front (no other model is at least as fast and as faithful, and strictly better at one).</p>
<img alt="fidelity vs latency with Pareto front" src="data:image/png;base64,{_accuracy_plot(result)}">
</body></html>
"""
