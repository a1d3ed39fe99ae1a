"""JSON output: one document, or one object per line (JSON Lines)."""

from __future__ import annotations

import json
from typing import Any, TextIO


def write_json(out: TextIO, doc: Any) -> None:
    out.write(json.dumps(doc, separators=(",", ":")) + "\n")
