"""REST (/v1) request bodies -> `Item`s: multipart (`text` / `question`, `image`, `audio` files, `model`,
`top_k`, `timeout_ms`) and JSON (same fields, media as base64 strings, data: URLs accepted), single or
batch. `top_k` is settled here, once per item (item's own, else the batch's, else DEFAULT_TOP_K)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

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


# -- multipart, the common case without a state machine ----------------------------------------------------
# A well-formed body with nothing unusual in it (what curl, httpx, requests, aiohttp and browsers send) is split
# with bytes.find; anything else (a charset parameter, a quoted-printable name, RFC 2231 filenames, header lines
# that are not "Name: value", a part count or field size over the limits, a delimiter followed by neither CRLF
# nor "--", text that is not UTF-8, a missing final delimiter...) goes to starlette's parser exactly as before, so
# its answers, errors included, are what they were. A profile of a served request put starlette's multipart
# parsing (a callback per header byte run, per part, per chunk) at over a quarter of the event loop's CPU.
_BOUNDARY = re.compile(r'multipart/form-data[ \t]*;[ \t]*boundary=(?:"([0-9A-Za-z\'()+_,\-./:=? ]{1,70})"|'
                       r"([0-9A-Za-z'()+_,\-./:=?]{1,70}))[ \t]*", re.IGNORECASE)
_DISPOSITION = re.compile(r'form-data[ \t]*;[ \t]*name="([\x20-\x21\x23-\x5b\x5d-\x7e]*)"'
                          r'(?:[ \t]*;[ \t]*filename="([\x20-\x21\x23-\x5b\x5d-\x7e]*)")?[ \t]*', re.IGNORECASE)


def split_multipart(body: bytes, content_type: str, *, max_files: int, max_fields: int, max_part_size: int
                    ) -> list[tuple[str, str | None, bytes | str]] | None:
    """[(name, filename or None, bytes of a file / text of a field)] of a plain multipart/form-data body, or None
    when the body is anything but plain (the caller then runs starlette's parser, which knows every case)."""
    m = _BOUNDARY.fullmatch(content_type)
    if m is None:
        return None
    delimiter = b"--" + (m.group(1) or m.group(2)).encode("ascii")
    if not body.startswith(delimiter + b"\r\n"):
        return None
    sep = b"\r\n" + delimiter
    parts: list[tuple[str, str | None, bytes | str]] = []
    files = fields = 0
    pos = len(delimiter) + 2
    while True:
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return None
        name = filename = None
        for line in body[pos:head_end].split(b"\r\n"):
            key, colon, value = line.partition(b":")
            if not colon or not key or key != key.strip() or not key.isascii() or b"\r" in line or b"\n" in line:
                return None
            key = key.lower()
            if key == b"content-disposition":
                if name is not None:
                    return None
                d = _DISPOSITION.fullmatch(value.decode("latin-1").strip(" \t"))
                if d is None:
                    return None
                name, filename = d.group(1), d.group(2)
            elif key != b"content-type" or not value.isascii():
                return None
        if name is None:
            return None
        end = body.find(sep, head_end + 4)
        if end < 0:
            return None
        data = body[head_end + 4:end]
        if filename is not None:
            files += 1
            if files > max_files:
                return None
            parts.append((name, filename, data))
        else:
            fields += 1
            if fields > max_fields or len(data) > max_part_size:
                return None
            try:
                parts.append((name, None, data.decode("utf-8")))
            except UnicodeDecodeError:
                return None
        after = end + len(sep)
        tail = body[after:after + 2]
        if tail == b"--":
            return parts
        if tail != b"\r\n":
            return None
        pos = after + 2


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _content_headers(request: Request) -> tuple[str, str]:
    """(Content-Type, Content-Encoding) in one pass over the raw headers (the last of each, as starlette's)."""
    ctype = encoding = ""
    for k, v in request.scope["headers"]:
        if len(k) == 12 and k.lower() == b"content-type":
            ctype = v.decode("latin-1")
        elif len(k) == 16 and k.lower() == b"content-encoding":
            encoding = v.decode("latin-1")
    return ctype, encoding


async def parse(request: Request, task: Task, *, batch: bool, max_upload: int, max_items: int) -> Parsed:
    content_type, encoding = _content_headers(request)
    encoding = encoding.strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_content_encoding",
                       f"Content-Encoding '{encoding}' is not accepted on /v1: send the body uncompressed "
                       "(/v2 infer accepts gzip and deflate)")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return _parse_json(await request.body(), task, batch=batch, max_items=max_items)
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded") and not batch:
        return await _parse_form(request, task, max_upload, content_type)
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


@dataclass
class _Upload:
    filename: str
    data: bytes


async def _parse_form(request: Request, task: Task, max_upload: int, content_type: str) -> Parsed:
    text_field = task.text_field
    allowed = {text_field, "image", "audio", "model", "top_k", "timeout_ms"}
    from starlette.exceptions import HTTPException

    multipart = content_type[:10].lower() == "multipart/"
    if multipart:
        body = await request.body()
        parts = split_multipart(body, content_type, max_files=4, max_fields=16, max_part_size=max_upload)
        if parts:
            return _form_values([(n, v if f is None else _Upload(f, v)) for n, f, v in parts],  # type: ignore[arg-type]
                                text_field, allowed)
    try:
        if multipart:
            form = await _StrictMultiPartParser(request.headers, _replay(body), max_files=4, max_fields=16,
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
        fields: list[tuple[str, str | _Upload]] = []
        for key, v in form.multi_items():
            fields.append((key, _Upload(v.filename or "", await v.read()) if isinstance(v, UploadFile) else v))
        return _form_values(fields, text_field, allowed)
    finally:
        await form.close()


def _form_values(fields: list[tuple[str, str | _Upload]], text_field: str, allowed: set[str]) -> Parsed:
    """The form's fields (in order; files as `_Upload`) -> one item, or InvalidInput naming what is wrong."""
    unknown = sorted({k for k, _ in fields} - allowed)
    if unknown:
        raise InvalidInput(f"unknown form field(s) {unknown}; allowed: {sorted(allowed)}")
    values: dict[str, Any] = {}
    for key in allowed:
        got = [v for k, v in fields if k == key]
        if len(got) > 1:
            raise InvalidInput(f"form field '{key}' given {len(got)} times")
        if got:
            values[key] = got[0]
    for key in ("image", "audio"):
        v = values.get(key)
        if isinstance(v, _Upload):
            # an empty part with an empty filename is an HTML form's "no file chosen": absent. Any other
            # empty upload reaches the core as b"", which refuses it by name (check_input)
            values[key] = None if not v.data and not v.filename else v.data
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
            ints[key] = int(v)
        except (TypeError, ValueError):
            raise InvalidInput(f"form field '{key}' must be an integer") from None
        if ints[key] < lo:  # type: ignore[operator]
            raise InvalidInput(f"form field '{key}' must be >= {lo}")
    top_k = ints["top_k"]
    if top_k is not None and top_k > 1000:
        raise InvalidInput("form field 'top_k' must be <= 1000")
    return Parsed([Item(values.get(text_field), values.get("image"), values.get("audio"), _top_k(top_k))],
                  values.get("model") or None, ints["timeout_ms"])
