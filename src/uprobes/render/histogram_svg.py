"""Latency histograms as SVG (`uprobes latency --svg FILE`).

One panel per function (most calls first): a bar per log2 bucket, as tall
as its share of the panel's fullest bucket, labelled with its range and
count, and a heading with the count and the percentiles. Each bar is
`<g class="bucket" data-function=... data-lo=... data-hi=... data-count=...>`
around its `<rect>`: a program can read the picture back. Hovering a bar
shows its numbers. With `latency --breakdown`, each function's bars are
stacked by what their calls were made of (on the CPU, off it by reason):
each part a `<rect class="part" data-part=... data-ns=...>` in its bar,
as tall as its share of the bar's calls' time, with a legend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from uprobes.analysis.histogram import Histogram
from uprobes.render.histogram import UNITS, human, rebucket
from uprobes.render.svg import attr, document, escape, text, warm_colour

WIDTH = 900
BAR_AREA = 180  # px of the tallest bar
PANEL = BAR_AREA + 90
PAD = 20
LABEL_ROOM = 60  # px under the bars for their ranges
PART_COLOURS = {"on-cpu": "rgb(60,160,80)", "off-cpu runnable": "rgb(240,160,40)",
                "off-cpu sleeping": "rgb(70,130,180)", "off-cpu blocked": "rgb(200,60,50)",
                "off-cpu stopped": "rgb(150,150,150)"}
Stacks = Mapping[int, Mapping[str, int]]
"""A function's parts summed per log2 bucket of call duration in ns
(`analysis.breakdown.Breakdown.by_bucket`)."""


def histograms_svg(hists: Mapping[str, Histogram], unit: str = "ns",
                   stacks: Mapping[str, Stacks] | None = None) -> str:
    ranked = [(n, h) for n, h in sorted(hists.items(), key=lambda kv: (-kv[1].count, kv[0]))
              if h.count]
    height = PAD * 2 + max(1, len(ranked)) * (PANEL + LABEL_ROOM)
    body = [f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>']
    if not ranked:
        body.append(text(WIDTH / 2, height / 2, "no calls seen", text_anchor="middle"))
    top = PAD
    for name, h in ranked:
        body += _panel(name, h, unit, top, (stacks or {}).get(name))
        top += PANEL + LABEL_ROOM
    return document(WIDTH, height, body)


def _in_unit(stack: Stacks, div: int) -> dict[int, dict[str, int]]:
    """`stack` re-keyed by the lower bound of each row in `unit` (as `rebucket`)."""
    out: dict[int, dict[str, int]] = {}
    for b, parts in stack.items():
        lo_ns = 0 if b == 1 else 1 << (b - 1)
        ub = max((lo_ns // div).bit_length(), 1)
        row = out.setdefault(0 if ub == 1 else 1 << (ub - 1), {})
        for part, ns in parts.items():
            row[part] = row.get(part, 0) + ns
    return out


def _panel(name: str, h: Histogram, unit: str, top: float,
           stack: Stacks | None = None) -> list[str]:
    rows = rebucket(h, UNITS[unit])
    parts_by_row = _in_unit(stack, UNITS[unit]) if stack else {}
    peak = max(n for _, _, n in rows) or 1
    heading = (f"{name}: {h.count} calls, mean {human(h.mean)}, p50 {human(h.percentile(50))}, "
               f"p99 {human(h.percentile(99))}, max {human(h.max)}")
    out = [text(PAD, top + 16, heading, font_size="14")]
    base = top + 30 + BAR_AREA
    slot = (WIDTH - 2 * PAD) / len(rows)
    for i, (lo, hi, n) in enumerate(rows):
        x = PAD + i * slot
        bar_h = BAR_AREA * n / peak
        label = f"{lo} -> {hi} {unit}: {n} calls"
        segments = ""
        parts = parts_by_row.get(lo, {})
        whole = sum(parts.values())
        y = base
        for part in sorted(parts, key=_part_order):
            seg_h = bar_h * parts[part] / whole if whole else 0.0
            y -= seg_h
            segments += (f'<rect class="part" data-part={attr(part)} data-ns="{parts[part]}" '
                         f'x="{x + 2:.2f}" y="{y:.2f}" width="{slot - 4:.2f}" '
                         f'height="{seg_h:.2f}" fill="{_colour(part)}"/>')
        out.append(f'<g class="bucket" data-function={attr(name)} data-lo="{lo}" '
                   f'data-hi="{hi}" data-count="{n}"><title>{escape(label)}</title>'
                   f'<rect x="{x + 2:.2f}" y="{base - bar_h:.2f}" width="{slot - 4:.2f}" '
                   f'height="{bar_h:.2f}" fill="rgb(70,130,180)"/>{segments}</g>')
        if n:
            out.append(text(x + slot / 2, base - bar_h - 3, str(n), text_anchor="middle",
                            font_size="10"))
        out.append(text(x + slot / 2, base + 14, f"{lo}", text_anchor="middle", font_size="10"))
    out.append(f'<line x1="{PAD}" y1="{base:.2f}" x2="{WIDTH - PAD}" y2="{base:.2f}" '
               f'stroke="black"/>')
    out.append(text(WIDTH / 2, base + 34, f"call duration, {unit} (log2 buckets, lower bound)",
                    text_anchor="middle", font_size="11"))
    if parts_by_row:
        names = sorted({p for row in parts_by_row.values() for p in row}, key=_part_order)
        for i, part in enumerate(names):
            x = WIDTH - PAD - 170
            y = top + 30 + i * 14
            out.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{_colour(part)}"/>')
            out.append(text(x + 14, y + 9, part, font_size="10"))
    return out


def _part_order(part: str) -> tuple[bool, str]:
    return part != "on-cpu", part


def _colour(part: str) -> str:
    return PART_COLOURS.get(part) or warm_colour(part)


def write_histograms_svg(out: TextIO, hists: Mapping[str, Histogram], unit: str = "ns",
                         stacks: Mapping[str, Stacks] | None = None) -> None:
    out.write(histograms_svg(hists, unit, stacks))
