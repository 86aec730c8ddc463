"""What a protocol front-end hands the core for one record: `Item` (already parsed, media still encoded)."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from app.core.errors import InvalidInput

DEFAULT_TOP_K = 5  # labels / answers returned when the request names no top_k


@dataclass
class Item:
    text: str | None = None  # the task's text field (`text`, or `question` for VQA)
    image: bytes | None = None  # encoded image file
    audio: bytes | None = None  # encoded audio file
    top_k: int = DEFAULT_TOP_K  # settled by the front-end; capped by the model's label count


def decode_b64(value: str | None, name: str) -> bytes | None:
    """Media sent as text: base64 or a data: URL. None stays None; bad or empty data is InvalidInput."""
    if value is None:
        return None
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"'{name}' is not valid base64") from None
    if not data:
        raise InvalidInput(f"'{name}' is empty")
    return data
