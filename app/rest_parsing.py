"""REST (/v1) request bodies -> `Item`s: multipart (`text` / `question`, `image`, `audio` files, `model`,
`top_k`, `timeout_ms`) and JSON (same fields, media as base64 strings, data: URLs accepted), single or
batch. `top_k` is settled here, once per item (item's own, else the batch's, else DEFAULT_TOP_K)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from app.core.errors import InvalidInput, ServingError
from app.core.items import DEFAULT_TOP_K, Item, decode_b64
from app.core.jsonbody import parse_json
from app.errors import ApiError
from app.tasks import Task


@dataclass
class Parsed:
    items: list[Item]
    model: str | None = None
    timeout_ms: int | None = None
    errors: dict[int, ServingError] = field(default_factory=dict)  # per-item parse errors (batch form)


def _top_k(*requested: int | None) -> int:
    return next((k for k in requested if k is not None), DEFAULT_TOP_K)


def _validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


class _StrictMultiPartParser(MultiPartParser):
    """starlette's multipart parser, except that a text field which is not valid UTF-8 is refused by name
    (starlette falls back to latin-1 and the model would read mojibake)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except (UnicodeDecodeError, LookupError):
                raise MultiPartException(f"form field '{part.field_name}' is not valid {self._charset} text") from None
        super().on_part_end()


async def parse(request: Request, task: Task, *, batch: bool, max_upload: int, max_items: int) -> Parsed:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_content_encoding",
                       f"Content-Encoding '{encoding}' is not accepted on /v1: send the body uncompressed "
                       "(/v2 infer accepts gzip and deflate)")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return _parse_json(await request.body(), task, batch=batch, max_items=max_items)
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded") and not batch:
        return await _parse_form(request, task, max_upload)
    allowed = "application/json" if batch else "multipart/form-data or application/json"
    raise ApiError(415, "unsupported_content_type", f"Content-Type must be {allowed}, got '{ctype or 'none'}'")


def _parse_json(raw: bytes, task: Task, *, batch: bool, max_items: int) -> Parsed:
    body = parse_json(raw)
    model_cls = task.batch_request_model if batch else task.request_model
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput("invalid request body", details=_validation_details(exc)) from None

    def item(rec: Any, *top_k: int | None) -> Item:
        return Item(getattr(rec, task.text_field), decode_b64(rec.image, "image"), decode_b64(rec.audio, "audio"),
                    _top_k(*top_k))

    if not batch:
        return Parsed([item(req, req.top_k)], req.model, req.timeout_ms)
    if len(req.inputs) > max_items:
        raise InvalidInput(f"at most {max_items} inputs per batch request (MAX_BATCH_ITEMS), got {len(req.inputs)}")
    parsed = Parsed([], req.model, req.timeout_ms)
    for i, rec in enumerate(req.inputs):
        try:
            parsed.items.append(item(rec, rec.top_k, req.top_k))
        except ServingError as err:
            parsed.items.append(Item())
            parsed.errors[i] = err
    return parsed


async def _parse_form(request: Request, task: Task, max_upload: int) -> Parsed:
    text_field = task.text_field
    allowed = {text_field, "image", "audio", "model", "top_k", "timeout_ms"}
    from starlette.exceptions import HTTPException

    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            form = await _StrictMultiPartParser(request.headers, request.stream(), max_files=4, max_fields=16,
                                                max_part_size=max_upload).parse()
            if not form:
                raise ApiError(400, "invalid_multipart", "the multipart body holds no complete form field "
                               "(a boundary that does not match the Content-Type's, or a truncated body)")
        else:
            form = await request.form(max_files=4, max_fields=16, max_part_size=max_upload)
    except MultiPartException as exc:  # malformed multipart
        raise ApiError(400, "invalid_multipart", exc.message) from None
    except HTTPException as exc:  # malformed multipart
        raise ApiError(400, "invalid_multipart", str(exc.detail)) from None
    try:
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            raise InvalidInput(f"unknown form field(s) {unknown}; allowed: {sorted(allowed)}")
        values: dict[str, Any] = {}
        for key in allowed:
            got = form.getlist(key)
            if len(got) > 1:
                raise InvalidInput(f"form field '{key}' given {len(got)} times")
            if got:
                values[key] = got[0]
        for key in ("image", "audio"):
            v = values.get(key)
            if isinstance(v, UploadFile):
                data = await v.read()
                # an empty part with an empty filename is an HTML form's "no file chosen": absent. Any other
                # empty upload reaches the core as b"", which refuses it by name (check_input)
                values[key] = None if not data and not v.filename else data
            elif isinstance(v, str):  # a text field: accept base64, as in JSON (empty: refused as empty)
                values[key] = decode_b64(v, key)
        for key in (text_field, "model"):
            v = values.get(key)
            if v is not None and not isinstance(v, str):
                raise InvalidInput(f"form field '{key}' must be text, not a file")
        ints: dict[str, int | None] = {}
        if values.get("model") == "":
            raise InvalidInput("form field 'model' must name a model (or be left out)")
        for key, lo in (("top_k", 1), ("timeout_ms", 1)):
            v = values.get(key)
            if v is None:
                ints[key] = None
                continue
            try:
                ints[key] = int(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise InvalidInput(f"form field '{key}' must be an integer") from None
            if ints[key] < lo:  # type: ignore[operator]
                raise InvalidInput(f"form field '{key}' must be >= {lo}")
        top_k = ints["top_k"]
        if top_k is not None and top_k > 1000:
            raise InvalidInput("form field 'top_k' must be <= 1000")
        return Parsed([Item(values.get(text_field), values.get("image"), values.get("audio"), _top_k(top_k))],
                      values.get("model") or None, ints["timeout_ms"])
    finally:
        await form.close()
