"""A flame graph of counted stacks, as SVG (`uprobes stacks --svg FILE`).

What flamegraph.pl and inferno draw from folded stacks, drawn here from
the same folded paths (`comm;main;parse;malloc 42`): each frame a box as
wide as the hits of the paths through it, its callees stacked on it,
roots at the bottom, siblings in name order (merged, so one function is
one box per caller path). Hovering a box shows its name, hits and share;
clicking zooms into it, clicking the bottom bar zooms out.

Each box is `<g class="frame" data-name=... data-hits=...>` holding its
`<rect>` (x and width in px): a program can read the picture back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from uprobes.render.svg import attr, document, escape, text, warm_colour

WIDTH = 1200
FRAME_H = 16
PAD = 10
TOP = 34  # the title's room
MIN_W = 0.1  # px: narrower boxes are left out (their hits are in their parent's)
_CHAR_W = 7.0  # px of a 12px Verdana character, near enough to cut labels


@dataclass
class Node:
    name: str
    hits: int = 0
    children: dict[str, Node] = field(default_factory=dict)


def tree(folded: Iterable[tuple[str, int]]) -> Node:
    """The call tree of folded paths; the root is every path (`all`)."""
    root = Node("all")
    for path, count in folded:
        root.hits += count
        node = root
        for name in path.split(";"):
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = Node(name)
            child.hits += count
            node = child
    return root


def _depth(node: Node) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=0)


def flamegraph_svg(folded: Iterable[tuple[str, int]], title: str = "Flame Graph") -> str:
    root = tree(folded)
    levels = _depth(root)
    height = TOP + levels * FRAME_H + PAD * 2 + 16
    scale = (WIDTH - 2 * PAD) / root.hits if root.hits else 0.0
    body = [f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f0"/>',
            text(WIDTH / 2, 22, title, text_anchor="middle", font_size="17"),
            text(PAD, height - 8, " ", id="details")]

    def place(node: Node, x: float, depth: int) -> None:
        w = node.hits * scale
        if w < MIN_W:
            return
        y = height - PAD - 16 - (depth + 1) * FRAME_H
        share = 100.0 * node.hits / root.hits
        label = f"{node.name} ({node.hits} hits, {share:.2f}%)"
        fill = "rgb(200,200,200)" if depth == 0 else warm_colour(node.name)
        chars = int((w - 6) / _CHAR_W)
        shown = node.name if len(node.name) <= chars else (
            node.name[:chars - 2] + ".." if chars > 2 else "")
        body.append(f'<g class="frame" data-name={attr(node.name)} data-hits="{node.hits}" '
                    f'data-depth="{depth}"><title>{escape(label)}</title>'
                    f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{FRAME_H - 1}" '
                    f'fill="{fill}" rx="2" ry="2"/>'
                    + text(x + 3, y + FRAME_H - 4.5, shown) + "</g>")
        for name in sorted(node.children):
            child = node.children[name]
            place(child, x, depth + 1)
            x += child.hits * scale

    if root.hits:
        place(root, PAD, 0)
    else:
        body.append(text(WIDTH / 2, height / 2, "no stacks", text_anchor="middle"))
    return document(WIDTH, height, body, _ZOOM_JS)


def write_flamegraph(out: TextIO, folded: Iterable[tuple[str, int]],
                     title: str = "Flame Graph") -> None:
    out.write(flamegraph_svg(folded, title))


# Zoom: a click on a box stretches it and its callees to the full width and
# hides what is not above or below it; a click on the root restores. Each
# box keeps its original x and width in data attributes the first time.
_ZOOM_JS = """
var frames = document.querySelectorAll('g.frame');
function orig(g, k) { var r = g.querySelector('rect');
  if (!g.dataset.x) { g.dataset.x = r.getAttribute('x'); g.dataset.w = r.getAttribute('width'); }
  return parseFloat(g.dataset[k]); }
function zoom(target) {
  var x0 = orig(target, 'x'), w0 = orig(target, 'w'), d0 = +target.dataset.depth;
  var full = orig(frames[0], 'w'), left = orig(frames[0], 'x');
  frames.forEach(function (g) {
    var x = orig(g, 'x'), w = orig(g, 'w');
    var r = g.querySelector('rect'), t = g.querySelector('text');
    var inside = x >= x0 - 1e-6 && x + w <= x0 + w0 + 1e-6;
    var below = +g.dataset.depth < d0 && x <= x0 + 1e-6 && x + w >= x0 + w0 - 1e-6;
    g.style.display = (inside || below || target === frames[0]) ? '' : 'none';
    var nx = inside ? left + (x - x0) * full / w0 : (below ? left : x);
    var nw = inside ? w * full / w0 : (below ? full : w);
    r.setAttribute('x', nx); r.setAttribute('width', nw);
    if (t) { t.setAttribute('x', nx + 3);
      var n = g.dataset.name, c = Math.floor((nw - 6) / 7);
      t.textContent = n.length <= c ? n : (c > 2 ? n.slice(0, c - 2) + '..' : ''); }
  });
}
frames.forEach(function (g) {
  g.addEventListener('click', function () { zoom(g); });
  g.addEventListener('mouseover', function () {
    document.getElementById('details').textContent = g.querySelector('title').textContent; });
});
"""
