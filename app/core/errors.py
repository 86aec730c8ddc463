"""Domain errors of the serving core. They carry no HTTP status: each protocol front-end
(`app/rest.py` for /v1, `app/v2.py` for the Open Inference Protocol) maps them by `code` to its
own status and error shape."""
from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """`code` names the failure (a stable string users see); `retry_after` (seconds) when a retry may help."""

    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None, retry_after: int | None = None,
                 request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after = retry_after
        self.request_id = request_id  # set on internal errors, so a user can quote it to whoever reads the logs


class InvalidInput(ServingError):
    code = "invalid_request"


class InvalidJson(ServingError):
    """A body the JSON parser cannot take (malformed, bad UTF-8, nested too deeply)."""

    code = "invalid_json"


class MediaRejected(ServingError):
    """An upload that cannot become a model input; `code` is models.media.MediaError's
    (unsupported_media_type, undecodable_media, media_too_large)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ModelNotFound(ServingError):
    code = "model_not_found"


class NoModelForTask(ServingError):
    code = "no_model_for_task"


class WrongTask(ServingError):
    code = "wrong_task"


class AmbiguousModel(ServingError):
    code = "ambiguous_model"


class ModelFailed(ServingError):
    code = "model_failed"


class NotReady(ServingError):
    code = "not_ready"

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message, retry_after=retry_after)


class QueueFull(ServingError):
    code = "overloaded"

    def __init__(self, model: str, retry_after: int = 1):
        super().__init__(f"model '{model}' queue is full; retry later", retry_after=retry_after)
        self.model = model


class DeadlineExceeded(ServingError):
    code = "timeout"

    def __init__(self, message: str = "request deadline exceeded before inference"):
        super().__init__(message)


class InferenceFailed(ServingError):
    code = "inference_failed"

    def __init__(self, message: str = "inference failed for this input"):
        super().__init__(message)


class InternalError(ServingError):
    code = "internal_error"


class ClientGone(ServingError):
    code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("client closed the connection before the answer")


class ControlDisabled(ServingError):
    """Model control is off (MODEL_CONTROL=none): load and unload are refused."""

    code = "model_control_disabled"


class ControlForbidden(ServingError):
    """Model control asked on a non-loopback bind without the operator's opt-in."""

    code = "forbidden"


class InvalidModelName(ServingError):
    """A model name that cannot name a model directory (path separators, '..', control characters...)."""

    code = "invalid_model_name"


class ModelLoadFailed(ServingError):
    """A load through model control failed validation, loading or warm-up; what was serving keeps serving."""

    code = "model_load_failed"
