#!/usr/bin/env python3
"""Draws each Grafana dashboard's panels from a Prometheus's answers, one PNG per dashboard.

No Grafana server can be installed from the package registries this project builds with, so this
stands in for a screenshot: every panel of `scripts/observability.py`'s dashboards, its queries
(variables substituted) asked as range queries, drawn as lines in the dashboard's grid. A panel
whose series the given Prometheus does not have (the operator's, when only an agent is scraped)
says so in its box.

Usage: render_dashboards.py PROMETHEUS_URL NAMESPACE POOL START END OUT_DIR
(START and END in Unix seconds). Standard library only; the 5×7 font is the one
operator/src/autoscale/plot.rs draws `simulate --plot` with, read from that file.
"""

import json
import math
import re
import struct
import sys
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import observability  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PALETTE = [
    (255, 255, 255), (30, 30, 30), (225, 225, 225), (120, 120, 120),
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
]
WHITE, BLACK, GRID, MUTED = 0, 1, 2, 3
SERIES_COLOURS = [4, 5, 6, 7, 8, 9]
CELL_W, CELL_H = 600, 260  # one 12-column panel


def font():
    source = (ROOT / "operator/src/autoscale/plot.rs").read_text()
    glyphs = {" ": [0] * 7}
    for char, rows in re.findall(r"'(.)' => \[([0-9, ]+)\]", source):
        glyphs[char] = [int(r) for r in rows.split(",")]
    return glyphs


GLYPHS = font()


class Canvas:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.px = bytearray(width * height)

    def set(self, x, y, c):
        if 0 <= x < self.w and 0 <= y < self.h:
            self.px[y * self.w + x] = c

    def line(self, x0, y0, x1, y1, c):
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.set(x0, y0, c)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def rect(self, x0, y0, x1, y1, c):
        for x in range(x0, x1 + 1):
            self.set(x, y0, c)
            self.set(x, y1, c)
        for y in range(y0, y1 + 1):
            self.set(x0, y, c)
            self.set(x1, y, c)

    def text(self, x, y, text, c, scale=1, limit=None):
        for i, ch in enumerate(text):
            if limit is not None and (i + 1) * 6 * scale > limit:
                return
            rows = GLYPHS.get(ch.lower())
            if rows is None:
                continue
            for r, bits in enumerate(rows):
                for col in range(5):
                    if bits & (16 >> col):
                        for a in range(scale):
                            for b in range(scale):
                                self.set(x + (i * 6 + col) * scale + a, y + r * scale + b, c)

    def png(self):
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w:(y + 1) * self.w]) for y in range(self.h))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", b"".join(bytes(c) for c in PALETTE))
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def query_range(base, expr, start, end, step):
    url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step}
    )
    with urllib.request.urlopen(url, timeout=30) as answer:
        body = json.load(answer)
    out = []
    for series in body["data"]["result"]:
        points = [(float(t), float(v)) for t, v in series["values"]]
        points = [(t, v) for t, v in points if math.isfinite(v)]
        if points:
            out.append((series["metric"], points))
    return out


def legend_of(template, metric):
    return re.sub(r"\{\{(\w+)\}\}", lambda m: metric.get(m.group(1), ""), template).strip() or "value"


def short(value):
    if value == 0:
        return "0"
    magnitude = abs(value)
    for bound, suffix in ((1e9, "g"), (1e6, "m"), (1e3, "k")):
        if magnitude >= bound:
            return f"{value / bound:.3g}{suffix}"
    return f"{value:.3g}"


def draw_panel(canvas, x, y, w, h, panel, series, start, end):
    canvas.rect(x + 4, y + 4, x + w - 5, y + h - 5, GRID)
    canvas.text(x + 12, y + 12, panel["title"], BLACK, 2, limit=w - 24)
    if not series:
        canvas.text(x + 12, y + h // 2, "no data from this prometheus", MUTED, 1)
        return
    left, right, top, bottom = x + 60, x + w - 16, y + 40, y + h - 40
    values = [v for _, _, pts in series for _, v in pts]
    low, high = min(0.0, min(values)), max(values)
    if high <= low:
        high = low + 1.0
    canvas.line(left, bottom, right, bottom, MUTED)
    canvas.line(left, top, left, bottom, MUTED)
    for k in range(5):
        value = low + (high - low) * k / 4
        py = bottom - int((bottom - top) * k / 4)
        canvas.line(left + 1, py, right, py, GRID)
        label = short(value)
        canvas.text(left - 6 - 6 * len(label), py - 3, label, BLACK, 1)
    minutes = (end - start) / 60
    canvas.text(left, bottom + 6, f"last {minutes:.0f} min", MUTED, 1)
    for i, (legend, _, points) in enumerate(series[: len(SERIES_COLOURS)]):
        colour = SERIES_COLOURS[i]
        coords = [
            (left + int((t - start) / max(end - start, 1) * (right - left)),
             bottom - int((v - low) / (high - low) * (bottom - top)))
            for t, v in points
        ]
        for a, b in zip(coords, coords[1:]):
            canvas.line(a[0], a[1], b[0], b[1], colour)
        if len(coords) == 1:
            canvas.set(*coords[0], colour)
        lx = left + 8 + (i % 3) * ((right - left) // 3)
        ly = bottom + 18 + (i // 3) * 10
        canvas.line(lx, ly + 3, lx + 12, ly + 3, colour)
        canvas.text(lx + 16, ly, legend, BLACK, 1, limit=(right - left) // 3 - 24)


def render(base, namespace, pool, start, end, out):
    step = max(1, int((end - start) / 300))
    sub = lambda e: e.replace("$namespace", namespace).replace("$pool", pool).replace("$__rate_interval", "1m")
    out.mkdir(parents=True, exist_ok=True)
    for spec in observability.DASHBOARD_SPECS:
        board = observability.dashboard(spec)
        rows = max(p["gridPos"]["y"] for p in board["panels"]) // 8 + 1
        canvas = Canvas(2 * CELL_W, rows * CELL_H + 40)
        canvas.text(12, 10, f"{board['title']}   {namespace}/{pool}", BLACK, 2)
        empty = 0
        for p in board["panels"]:
            series = []
            for target in p["targets"]:
                for metric, points in query_range(base, sub(target["expr"]), start, end, step):
                    series.append((legend_of(target["legendFormat"], metric), metric, points))
            empty += not series
            g = p["gridPos"]
            draw_panel(
                canvas,
                g["x"] * CELL_W // 12,
                40 + g["y"] // 8 * CELL_H,
                g["w"] * CELL_W // 12,
                CELL_H,
                p,
                series,
                start,
                end,
            )
        path = out / f"{spec['file']}.png"
        path.write_bytes(canvas.png())
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {len(board['panels'])} panels, {empty} without data")


def main():
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    base, namespace, pool, start, end, out = sys.argv[1:]
    render(base.rstrip("/"), namespace, pool, float(start), float(end), Path(out))


if __name__ == "__main__":
    main()
