"""REST (/v1) error shape for every failure: `{"error": {"code", "message"}}` (+ `request_id` on 500),
and the HTTP status of each of the core's errors (`app/core/errors.py`)."""
from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from app.core.errors import ServingError


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 details: Any = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details
        self.request_id = request_id  # set on 500s, so a user can quote it to whoever reads the logs

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        if self.request_id is not None:
            err["request_id"] = self.request_id
        return {"error": err}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    err = {"code": code, "message": message, **extra}
    return JSONResponse({"error": err}, status_code=status, headers=headers)


# HTTP status of each core error code (models.media.MediaError codes included)
STATUS = {
    "invalid_request": 422, "wrong_task": 422, "ambiguous_model": 422, "invalid_json": 400,
    "undecodable_media": 400, "unsupported_media_type": 415, "media_too_large": 413,
    "model_not_found": 404, "no_model_for_task": 404,
    "model_failed": 503, "not_ready": 503, "overloaded": 503,
    "timeout": 504, "client_disconnected": 499, "inference_failed": 500, "internal_error": 500,
}


def api_error(err: ServingError) -> ApiError:
    """A core error as a /v1 error (Retry-After when the core says a retry may help)."""
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return ApiError(STATUS.get(err.code, 500), err.code, err.message, headers, err.details, err.request_id)


# Error responses documented in OpenAPI for the task endpoints.
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "details": {"description": "what was wrong, field by field (validation errors)"},
                           "request_id": {"type": "string", "description": "on 500: quote it to the operator"}},
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}


def openapi_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Undecodable media, or a body that is not valid JSON / multipart",
            401: "Missing or wrong API key (when API_KEYS is set)", 404: "Unknown model, or no model serves the task",
            413: "Body, image or audio too large", 415: "Unsupported media type (sniffed from bytes), or Content-Type",
            422: "Missing or invalid fields: a field the model needs is missing, one it does not take is present "
                 "(see each model's request schema), a model of another task is named",
            503: "Overloaded (Retry-After) or not ready",
            504: "Deadline exceeded before inference", 500: "Internal error (no details leaked)"}
    return {s: {"description": text.get(s, "Error"), "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for s in statuses}
