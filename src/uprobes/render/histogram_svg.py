"""Latency histograms as SVG (`uprobes latency --svg FILE`).

One panel per function (most calls first): a bar per log2 bucket, as tall
as its share of the panel's fullest bucket, labelled with its range and
count, and a heading with the count and the percentiles. Each bar is
`<g class="bucket" data-function=... data-lo=... data-hi=... data-count=...>`
around its `<rect>`: a program can read the picture back. Hovering a bar
shows its numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from uprobes.analysis.histogram import Histogram
from uprobes.render.histogram import UNITS, human, rebucket
from uprobes.render.svg import attr, document, escape, text

WIDTH = 900
BAR_AREA = 180  # px of the tallest bar
PANEL = BAR_AREA + 90
PAD = 20
LABEL_ROOM = 60  # px under the bars for their ranges


def histograms_svg(hists: Mapping[str, Histogram], unit: str = "ns") -> str:
    ranked = [(n, h) for n, h in sorted(hists.items(), key=lambda kv: (-kv[1].count, kv[0]))
              if h.count]
    height = PAD * 2 + max(1, len(ranked)) * (PANEL + LABEL_ROOM)
    body = [f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>']
    if not ranked:
        body.append(text(WIDTH / 2, height / 2, "no calls seen", text_anchor="middle"))
    top = PAD
    for name, h in ranked:
        body += _panel(name, h, unit, top)
        top += PANEL + LABEL_ROOM
    return document(WIDTH, height, body)


def _panel(name: str, h: Histogram, unit: str, top: float) -> list[str]:
    rows = rebucket(h, UNITS[unit])
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
        out.append(f'<g class="bucket" data-function={attr(name)} data-lo="{lo}" '
                   f'data-hi="{hi}" data-count="{n}"><title>{escape(label)}</title>'
                   f'<rect x="{x + 2:.2f}" y="{base - bar_h:.2f}" width="{slot - 4:.2f}" '
                   f'height="{bar_h:.2f}" fill="rgb(70,130,180)"/></g>')
        if n:
            out.append(text(x + slot / 2, base - bar_h - 3, str(n), text_anchor="middle",
                            font_size="10"))
        out.append(text(x + slot / 2, base + 14, f"{lo}", text_anchor="middle", font_size="10"))
    out.append(f'<line x1="{PAD}" y1="{base:.2f}" x2="{WIDTH - PAD}" y2="{base:.2f}" '
               f'stroke="black"/>')
    out.append(text(WIDTH / 2, base + 34, f"call duration, {unit} (log2 buckets, lower bound)",
                    text_anchor="middle", font_size="11"))
    return out


def write_histograms_svg(out: TextIO, hists: Mapping[str, Histogram], unit: str = "ns") -> None:
    out.write(histograms_svg(hists, unit))
