"""A small, self-contained HTML report: metrics, training curve (inline SVG), predictions."""

from __future__ import annotations

import html
import math


def svg_line_chart(series: dict[str, list[tuple[float, float | None]]], title: str, width: int = 560,
                   height: int = 300) -> str:
    """Line chart of ``{label: [(x, y), ...]}`` as an SVG string (each series scaled to its own
    min..max on a shared axis box, with its range in the legend)."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    pad_l, pad_r, pad_t, pad_b = 40, 10, 30, 30
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" height="{height - pad_t - pad_b}" '
             'fill="none" stroke="#999"/>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">epoch</text>']
    for i, (label, raw) in enumerate(series.items()):
        pts = [(x, y) for x, y in raw if y is not None and math.isfinite(y)]  # a NaN or inf point breaks the line
        if not pts:
            continue
        ys = [y for _, y in pts]
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def px(x: float) -> float:
            return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

        def py(y: float, y0: float = y0, y1: float = y1) -> float:
            return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

        colour = colours[i % len(colours)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        parts.append(f'<text x="{pad_l + 8}" y="{pad_t + 16 + 15 * i}" fill="{colour}">'
                     f'{html.escape(label)} ({y0:.3g} .. {max(ys):.3g})</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _fmt(v) -> str:
    return "null" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _confusion_table(metrics: dict) -> str:
    """The confusion matrix as a table of row percentages (each ground-truth class's pixels by the
    class predicted), or "" where the metrics have none."""
    cm = metrics.get("confusion_matrix")
    if not cm:
        return ""
    names = [html.escape(c["name"]) for c in metrics.get("per_class", [])] or [str(i) for i in range(len(cm))]
    head = "".join(f"<th>{n}</th>" for n in names)
    body = "".join(
        f"<tr><th>{name}</th>" + "".join(f"<td>{100 * v / sum(row):.1f}</td>" if sum(row) else "<td>-</td>"
                                         for v in row) + "</tr>"
        for name, row in zip(names, cm))
    return ("<h2>Confusion matrix</h2><p>% of each true class's pixels (rows) by the class predicted (columns)</p>"
            f"<table><tr><th>true class</th>{head}</tr>{body}</table>")


def render_report(title: str, metrics: dict, curve_svg: str, examples: list[dict], notes: list[str]) -> str:
    """The report page's HTML (the caller writes it atomically). examples: [{"name", "image",
    "truth", "pred", "overlay"}] with paths relative to the page."""
    keys = [k for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "dice", "bf_score", "boundary_iou", "num_images")
            if k in metrics]
    rows = "".join(f"<tr><th>{k}</th><td>{_fmt(metrics[k])}</td></tr>" for k in keys)
    per_class = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{_fmt(c['iou'])}</td><td>{_fmt(c['acc'])}</td></tr>"
        for c in metrics.get("per_class", []))
    confusion = _confusion_table(metrics)
    figs = "".join(
        "<tr>" + f"<td>{html.escape(e['name'])}</td>"
        + "".join(f'<td><img src="{html.escape(e[k])}" width="160"></td>'
                  for k in ("image", "truth", "pred", "overlay"))
        + "</tr>" for e in examples)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>{html.escape(title)}</h1>
{''.join(f'<p>{html.escape(n)}</p>' for n in notes)}
<h2>Held-out metrics</h2><table>{rows}</table>
<h2>Per class</h2><table><tr><th>class</th><th>IoU</th><th>accuracy</th></tr>{per_class}</table>
{confusion}
<h2>Training curve</h2>{curve_svg}
<h2>Predictions</h2><table>
<tr><th>scene</th><th>input</th><th>ground truth</th><th>prediction</th><th>overlay</th></tr>{figs}</table>
</body></html>"""
    return page
