"""What a person reads about a search: the report's Search section and search.html (an SVG plot of the front)."""
from __future__ import annotations

import html
import math

SEARCH_PAGE = "search.html"


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _plain_line(plain: dict | None) -> list[str]:
    if not plain:
        return []
    if plain["whole_schedule"]:
        return [f"The plain compile's student ({plain['label']}) ran its whole schedule once its first rung was "
                "measured, so the choice is never worse than a compile without --search; the other shapes halved.", ""]
    return [f"The plain compile's student ({plain['label']}) could not run its whole schedule within the budget "
            "after its first rung; it went on halving with the others.", ""]


def render_search_md(record: dict) -> str:
    """Return the report's search section: every evaluation, the front marked, the choice and why."""
    c = record["chosen"]
    lines = ["## Search", "",
             f"{record['method']}. Budget {clock(record['time_budget_s'])}, spent {clock(record['elapsed_s'])}"
             + (" (the budget ran out before the last rung)" if record["out_of_time"] else "") + "; rungs at "
             + ", ".join(f"{s:.0%}" for s in record["rung_shares"]) + " of the distillation steps. Limits: "
             + ", ".join(["the target's budget", *(f"{k.replace('_', ' ')} {v:g}" for k, v in record["limits"].items()
                                                   if v is not None)]) + ".", "",
             f"**Chosen:** {c['label']}, {c['recipe']} (rung {c['rung'] + 1}: trained {c['steps']} of its "
             f"{c['total_steps']} steps{'' if c['steps'] >= c['total_steps'] else ', stopped early by the search'})"
             + ("" if c["meets_every_limit"] else " — **no student met every limit**; this is the closest") + ".", "",
             *_plain_line(record.get("plain_compile_shape")),
             "| student | recipe | rung (steps) | fidelity | latency ms | MB | front | misses |", "|---|---|---|---|---|---|---|---|"]
    for e in record["evaluations"]:
        lat = "—" if e["latency_ms"] is None else f"{e['latency_ms']:.2f}"
        lines.append(f"| {e['label']} | {e['recipe']} | {e['rung'] + 1} ({e['steps']}/{e['total_steps']}) | "
                     f"{e['metric']} {e['fidelity']:.4f} | {lat} | {e['size_mb']:.2f} | "
                     f"{'yes' if e['on_front'] and e['latest'] else ''} | {', '.join(e['misses']) or 'none'} |")
    measured = {e["shape_id"] for e in record["evaluations"]}
    skipped = [sh["label"] for sh in record["shapes"] if sh["id"] not in measured]
    if skipped:
        lines += ["", f"Not measured (the budget ran out first, or it failed): {', '.join(skipped)}."]
    for label, why in record.get("failed", {}).items():
        lines += ["", f"Failed and dropped: {label}: {why}"]
    lines += ["", f"The front (fidelity vs latency, each student at the last rung it reached) is plotted in "
                  f"`{SEARCH_PAGE}`; earlier rungs' rows are the same students trained less.", ""]
    return "\n".join(lines)


def render_search_html(record: dict) -> str:
    """Return a self-contained page: the search's points as an SVG scatter (latency x, fidelity y, area ~ size),
    the front joined, the choice ringed, and the table."""
    points = [e for e in record["evaluations"] if e["latest"] and e["latency_ms"] is not None]
    width, height, pad = 720, 440, 60
    if points:
        xs, ys = [e["latency_ms"] for e in points], [e["fidelity"] for e in points]
        x0, x1 = min(xs) * 0.9, max(xs) * 1.1
        y0, y1 = min(ys) - 0.02, min(1.0, max(ys) + 0.02)
    else:
        x0, x1, y0, y1 = 0, 1, 0, 1
    sx = lambda v: pad + (v - x0) / max(1e-9, x1 - x0) * (width - 2 * pad)  # noqa: E731
    sy = lambda v: height - pad - (v - y0) / max(1e-9, y1 - y0) * (height - 2 * pad)  # noqa: E731
    max_mb = max([e["size_mb"] for e in points] or [1.0])
    c = record["chosen"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
           f'<text x="{width / 2}" y="{height - 20}" text-anchor="middle">latency (ms, lower is better)</text>',
           f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">'
           f'fidelity to the teacher ({html.escape(points[0]["metric"]) if points else ""}, higher is better)</text>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        svg.append(f'<text x="{sx(xv):.0f}" y="{height - pad + 15}" text-anchor="middle">{xv:.2f}</text>')
        svg.append(f'<text x="{pad - 6}" y="{sy(yv) + 4:.0f}" text-anchor="end">{yv:.3f}</text>')
    front = sorted((e for e in points if e["on_front"]), key=lambda e: e["latency_ms"])
    if len(front) > 1:
        svg.append('<polyline fill="none" stroke="#1f77b4" stroke-dasharray="4 3" points="'
                   + " ".join(f"{sx(e['latency_ms']):.1f},{sy(e['fidelity']):.1f}" for e in front) + '"/>')
    for e in points:
        r = 4 + 10 * math.sqrt(e["size_mb"] / max_mb)
        fill = "#1f77b4" if e["on_front"] else "#bbbbbb"
        full = e["steps"] >= e["total_steps"]
        svg.append(f'<circle cx="{sx(e["latency_ms"]):.1f}" cy="{sy(e["fidelity"]):.1f}" r="{r:.1f}" '
                   f'fill="{fill if full else "white"}" stroke="{fill}" stroke-width="2" fill-opacity="0.7">'
                   f'<title>{html.escape(e["label"])}, {html.escape(e["recipe"])}: {e["fidelity"]:.4f}, '
                   f'{e["latency_ms"]:.2f} ms, {e["size_mb"]:.2f} MB, {e["steps"]}/{e["total_steps"]} steps</title></circle>')
        if (e["shape_id"], e["recipe"]) == (c["shape_id"], c["recipe"]):
            svg.append(f'<circle cx="{sx(e["latency_ms"]):.1f}" cy="{sy(e["fidelity"]):.1f}" r="{r + 5:.1f}" '
                       f'fill="none" stroke="#d62728" stroke-width="2"/>')
        svg.append(f'<text x="{sx(e["latency_ms"]) + r + 3:.1f}" y="{sy(e["fidelity"]) + 4:.1f}">'
                   f'{html.escape(e["label"])}{"" if e["recipe"] == points[0]["recipe"] else " (" + html.escape(e["recipe"]) + ")"}</text>')
    svg.append("</svg>")
    table = render_search_md(record)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>edgedistill search</title></head><body>"
            "<h1>edgedistill search</h1><p>Each point is one student at the last rung it reached: filled if it ran "
            "its whole schedule, hollow if the search stopped it early; area ~ model size; blue: the Pareto front "
            "(joined); red ring: the choice.</p>" + "\n".join(svg)
            + "<pre>" + html.escape(table) + "</pre></body></html>\n")
