"""schemathesis hooks for `make fuzz` and the suite's bounded pass (SCHEMATHESIS_HOOKS=scripts.schemathesis_hooks).

A multipart form field is text on the wire, so the JSON-type mutations schemathesis makes for a "schema-violating"
multipart case mostly have valid wire spellings: a null, a number or a boolean in the `text` / `question` field
goes out as "null", "123", "true" (valid texts); an empty array in `top_k`'s place goes out as no field at all
(absent: valid), a one-item array as that item. The service rightly answers such requests 200 and schemathesis
reports ST201. Negative *multipart bodies* are therefore skipped; the same routes' JSON bodies carry the same
fields with the same rules into the same parsing of an item, and are negative-tested in full, and multipart bodies
are positive-tested in full (and hostile multipart is the corpus's job: tests/test_hostile_corpus.py).
"""
from __future__ import annotations

import schemathesis


def _negative_body(case) -> bool:
    meta = getattr(case, "meta", None) or getattr(case, "_meta", None)
    if meta is None:
        return False
    return any(loc.name.lower() == "body" and info.mode.is_negative for loc, info in meta.components.items())


@schemathesis.hook
def filter_case(context, case) -> bool:
    return not ((case.media_type or "").lower().startswith("multipart/") and _negative_body(case))
