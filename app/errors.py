"""One error shape for every failure: `{"error": {"code", "message"}}` (+ `request_id` on 500)."""
from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


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


def invalid(message: str, details: Any = None) -> ApiError:
    return ApiError(422, "invalid_request", message, details=details)


class QueueFull(ApiError):
    def __init__(self, model: str, retry_after: int = 1):
        super().__init__(503, "overloaded", f"model '{model}' queue is full; retry later",
                         headers={"Retry-After": str(retry_after)})


class NotReady(ApiError):
    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(503, "not_ready", message, headers={"Retry-After": str(retry_after)})


class DeadlineExceeded(ApiError):
    def __init__(self, message: str = "request deadline exceeded before inference"):
        super().__init__(504, "timeout", message)


class InferenceFailed(ApiError):
    def __init__(self, message: str = "inference failed for this input"):
        super().__init__(500, "inference_failed", message)


# Error responses documented in OpenAPI for the task endpoints.
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "required": ["code", "message"],
        }
    },
}


def openapi_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Undecodable media", 401: "Missing or wrong API key", 404: "Unknown model",
            413: "Body, image or audio too large", 415: "Unsupported media type (sniffed from bytes)",
            422: "Missing or invalid fields", 503: "Overloaded (Retry-After) or not ready",
            504: "Deadline exceeded before inference", 500: "Internal error (no details leaked)"}
    return {s: {"description": text.get(s, "Error"), "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for s in statuses}
