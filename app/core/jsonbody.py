"""JSON request bodies for every front-end: `parse_json(raw)` returns the document or raises `InvalidJson`.

Whatever the parser cannot take is the client's fault, never a 500: malformed JSON, invalid UTF-8,
integers past Python's digit limit, and documents nested deeper than `MAX_JSON_DEPTH` (the C decoder
recurses per level: 5,000 levels raise RecursionError; a few hundred pass it but would make any recursive
walk downstream fail). No request the service accepts comes near the limit.
"""
from __future__ import annotations

import json
from typing import Any

from app.core.errors import InvalidJson

MAX_JSON_DEPTH = 64


def _depth_over(doc: Any, limit: int) -> bool:
    """True when `doc` nests lists / objects deeper than `limit` (iterative: no recursion of our own)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON document in `raw`; InvalidJson (with a message naming the problem) for anything else."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise InvalidJson(f"body is not valid JSON: nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits in an integer
        raise InvalidJson(f"body is not valid JSON: {exc}") from None
    if isinstance(doc, (dict, list)):
        opened = raw.count(b"[" if isinstance(raw, bytes) else "[") + raw.count(b"{" if isinstance(raw, bytes) else "{")
        if opened > max_depth and _depth_over(doc, max_depth):  # fewer brackets than the limit: cannot be deeper
            raise InvalidJson(f"body is not valid JSON: nested deeper than {max_depth} levels")
    return doc
