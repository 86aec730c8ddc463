"""The /v1 part of the OpenAPI document, made to describe the models really served.

A task route's generic request model cannot say what a given model needs: whether `text` is required, which
media it takes at all (any other is refused with 422), which model names serve the task. Once the repository
has been scanned, `install(app, service)` makes `app.openapi()` rewrite each task's request bodies from the
served models' manifests: one variant per model (`oneOf`, told apart by `model`, which is then required), with
exactly the fields that model takes, the ones it needs marked required, `text` holding a non-blank character,
media as base64 (`format: byte`, JSON) or files (multipart), and the examples cut to what the model takes. The
document is rebuilt whenever the served set changes (model control).

What a schema cannot say stays in the status codes: an upload whose bytes are no image or sound the service can
decode is 400 / 415 (or 413 past the size limits), whatever its encoding looks like.
"""
from __future__ import annotations

from typing import Any, Callable

from app.core.loading import FAILED
from app.core.service import Service
from app.tasks import TASKS, Task

# check_input refuses text that is only white space (Python's str.isspace). Said with `not` and an explicit class,
# so that every regex engine (ECMA, Rust, Python) reads it alike.
_SPACE = "\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
_BLANK = f"^[{_SPACE}]*$"
_NOT_BLANK = f"^[\\s\\S]*[^{_SPACE}][\\s\\S]*$"


def _served(service: Service, task: Task) -> list[Any]:
    return sorted((e for e in service.registry.entries.values()
                   if e.task == task.name and e.manifest is not None and e.state != FAILED), key=lambda e: e.name)


def _required(task: Task, entry: Any) -> tuple[list[str], list[str]]:
    """(fields the model takes, fields it needs) in the task's names (check_input's rules)."""
    m = entry.manifest
    mods = m.modality_names
    need = [mod for mod in mods if mod == "text" or mod in m.required_modalities
            or (mod in task.required_media and mod != "text")]
    return [task.field_name(mod) for mod in mods], [task.field_name(mod) for mod in need]


def _field(task: Task, name: str, *, required: bool, form: bool) -> dict[str, Any]:
    schema: dict[str, Any]
    if name == task.text_field:
        schema = {"type": "string", "minLength": 1, "description": task.text_description + " (not blank)"}
        if form:  # (schemathesis 4.32 cannot combine `not` with the files of a multipart body)
            schema["allOf"] = [{"pattern": _NOT_BLANK}]
        else:
            schema["not"] = {"pattern": _BLANK}
    elif form:
        schema = {"type": "string", "format": "binary", "minLength": 1, "description": f"{name} file (not empty)"}
    else:
        what = "PNG/JPEG/GIF/WEBP/BMP/TIFF" if name == "image" else "WAV/FLAC/OGG"
        schema = {"type": "string", "format": "byte", "minLength": 4,
                  "description": f"base64 of a {what} file (not empty); a data: URL is accepted too"}
    if not required and not form:
        schema = {"anyOf": [schema, {"type": "null"}], "description": schema["description"] + "; null: none"}
    return schema


def _variant(task: Task, entry: Any, *, several: bool, form: bool) -> dict[str, Any]:
    takes, need = _required(task, entry)
    props: dict[str, Any] = {f: _field(task, f, required=f in need, form=form) for f in takes}
    required = list(need)
    model: dict[str, Any] = {"type": "string", "enum": [entry.name] if several or form else [entry.name, ""],
                             "description": f"model '{entry.name}' (takes {takes}, needs {need or 'one of them'})"
                             + ("" if several else "; absent (JSON: or empty): the only model of the task")}
    props["model"] = model if several or form else {"anyOf": [model, {"type": "null"}]}
    if several:
        required.append("model")
    timeout: dict[str, Any] = {"type": "integer", "minimum": 1}
    top_k: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 1000}
    props["timeout_ms"] = timeout if form else {"anyOf": [timeout, {"type": "null"}]}
    props["timeout_ms"]["description"] = "deadline for this request in ms, at most REQUEST_TIMEOUT_S (504 past it)"
    props["top_k"] = top_k if form else {"anyOf": [top_k, {"type": "null"}]}
    props["top_k"]["description"] = "how many labels / answers to return"
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False,
                              "title": f"{entry.name} request"}
    if required:
        schema["required"] = required
    else:  # a model that needs no single field needs one of them
        schema["anyOf"] = [{"required": [f], "properties": {f: {"type": "string"}}} for f in takes]
    return schema


def _one_of(variants: list[dict[str, Any]]) -> dict[str, Any]:
    return variants[0] if len(variants) == 1 else {"oneOf": variants}


def _examples(task: Task, entries: list[Any], examples: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for entry in entries:
        takes, need = _required(task, entry)
        for key, ex in examples.items():
            value = {k: v for k, v in ex["value"].items() if k in takes or k in ("top_k", "timeout_ms")}
            if not all(f in value for f in need):
                continue
            if len(entries) > 1:
                value["model"] = entry.name
            out[f"{entry.name}_{key}" if len(entries) > 1 else key] = {**ex, "value": value}
    return out


def refine(doc: dict[str, Any], service: Service, max_batch_items: int) -> dict[str, Any]:
    """`doc` with each /v1 task route's request bodies written from the served models (tasks nobody serves keep
    the generic bodies: they answer 404)."""
    for task in TASKS.values():
        entries = _served(service, task)
        single = doc["paths"].get(f"/v1/{task.name}", {}).get("post")
        batch = doc["paths"].get(f"/v1/{task.name}/batch", {}).get("post")
        if not entries or single is None or batch is None:
            continue
        several = len(entries) > 1
        content = single["requestBody"]["content"]
        content["application/json"]["schema"] = _one_of(
            [_variant(task, e, several=several, form=False) for e in entries])
        if "examples" in content["application/json"]:
            content["application/json"]["examples"] = _examples(task, entries, content["application/json"]["examples"])
        content["multipart/form-data"]["schema"] = _one_of(
            [_variant(task, e, several=several, form=True) for e in entries])
        bcontent = batch["requestBody"]["content"]["application/json"]
        model = {"type": "string", "enum": [e.name for e in entries] + ([] if several else [""]),
                 "description": "model name" + ("" if several else "; empty or absent: the only model of the task")}
        needs = "; ".join("'{}' takes {}, needs {}".format(e.name, *_required(task, e)) for e in entries)
        bcontent["schema"] = {
            "allOf": [bcontent["schema"]], "type": "object", "required": ["inputs", *(["model"] if several else [])],
            "properties": {"model": model if several else {"anyOf": [model, {"type": "null"}]},
                           "inputs": {"type": "array", "minItems": 1, "maxItems": max_batch_items}},
            "description": f"Each record is checked against the model on its own ({needs}): a record that lacks a "
                           "field the model needs, has one it does not take, or carries media that cannot be "
                           "decoded gets its own error result (its `status`), the others are answered."}
        served = [ex["value"] for ex in content["application/json"].get("examples", {}).values()]
        if "examples" in bcontent and served:
            first = [v for v in served if v.get("model") == served[0].get("model")][:2]  # one model's records
            inputs = [{k: x for k, x in v.items() if k not in ("model", "timeout_ms")} for v in first]
            model = {"model": served[0]["model"]} if several else {}
            bcontent["examples"] = {"two_items": {"summary": "records answered independently",
                                                  "value": {**model, "inputs": inputs}}}
    _v2_parameters(doc, service)
    named = doc["paths"].get("/v1/models/{name}", {}).get("get")
    names = sorted(e.name for e in service.registry.entries.values())
    for param in (named or {}).get("parameters", []):
        if param.get("name") == "name" and names:
            param["schema"] = {"type": "string", "enum": names, "description": "a served model (others: 404)"}
    return doc


def _v2_parameters(doc: dict[str, Any], service: Service) -> None:
    """/v2/models/{model}[/versions/{version}]/...: the served model names and their loaded versions."""
    entries = [e for e in service.registry.entries.values() if e.state != FAILED and e.version is not None]
    if not entries:
        return
    names = sorted(e.name for e in entries)
    versions = sorted({str(e.version) for e in entries}, key=int)
    for path, ops in doc["paths"].items():
        if not path.startswith("/v2/models/{model}"):
            continue
        for op in ops.values():
            for param in op.get("parameters", []):
                if param.get("in") == "path" and param.get("name") == "model":
                    param["schema"] = {"type": "string", "enum": names}
                elif param.get("in") == "path" and param.get("name") == "version":
                    param["schema"] = {"type": "string", "enum": versions}


def install(app: Any, service: Service, *, max_batch_items: int) -> None:
    """Make `app.openapi()` describe the served models (rebuilt when the served set changes)."""
    generic: Callable[[], dict[str, Any]] = app.openapi
    built: dict[str, Any] = {"key": None}

    def openapi() -> dict[str, Any]:
        key = tuple(sorted((e.name, e.version, e.task, e.state == FAILED, e.manifest is not None)
                           for e in service.registry.entries.values()))
        if app.openapi_schema is None or key != built["key"]:
            app.openapi_schema = None
            app.openapi_schema = refine(generic(), service, max_batch_items)
            built["key"] = key
        return app.openapi_schema

    app.openapi = openapi
