"""The few pieces of SVG our pictures share: the document, text escaped, a
colour per name. Written by hand: the pictures are rectangles and text."""

from __future__ import annotations

import zlib
from xml.sax.saxutils import escape, quoteattr

FONT = "Verdana, sans-serif"

__all__ = ["attr", "document", "escape", "text", "warm_colour"]


def document(width: float, height: float, body: list[str], script: str = "") -> str:
    """A standalone SVG document of `width` x `height` px around `body`."""
    head = (f'<?xml version="1.0" standalone="no"?>\n'
            f'<svg version="1.1" width="{width:g}" height="{height:g}" '
            f'viewBox="0 0 {width:g} {height:g}" xmlns="http://www.w3.org/2000/svg" '
            f'font-family="{FONT}" font-size="12">\n')
    code = f"<script><![CDATA[{script}]]></script>\n" if script else ""
    return head + code + "\n".join(body) + "\n</svg>\n"


def text(x: float, y: float, content: str, **attrs: str) -> str:
    extra = "".join(f" {k.replace('_', '-')}={quoteattr(v)}" for k, v in attrs.items())
    return f'<text x="{x:.2f}" y="{y:.2f}"{extra}>{escape(content)}</text>'


def attr(value: str) -> str:
    """A value for an attribute, quoted and escaped."""
    return quoteattr(value)


def warm_colour(name: str) -> str:
    """A colour in the reds and yellows, the same for the same name in every
    picture (flame graphs colour frames by name so a function stands out)."""
    h = zlib.crc32(name.encode())
    red = 205 + h % 50
    green = (h >> 8) % 230
    blue = (h >> 16) % 55
    return f"rgb({red},{green},{blue})"
