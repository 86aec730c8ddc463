"""Logging: request id in every line (contextvar + filter), text or one-JSON-object-per-line output."""
from __future__ import annotations

import contextvars
import io
import json
import logging
import sys
import threading
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# attributes every LogRecord has; anything else passed through `extra=` is emitted as a JSON field
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


def _install_record_factory() -> None:
    """Stamp every LogRecord with the current request id at creation (any handler, any logger)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_mmserve", False):
        return

    def factory(*args, **kwargs):  # type: ignore[no-untyped-def]
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
        return record

    factory._mmserve = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_install_record_factory()


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


FLUSH_INTERVAL_S = 0.1  # INFO and DEBUG lines (the access log) reach stderr at most this late


class CoalescingHandler(logging.StreamHandler):
    """A stream handler that writes INFO / DEBUG lines (one access-log line per request) into a buffer flushed at
    most FLUSH_INTERVAL_S later by a background thread: one write for many lines instead of a write (and a release
    of the GIL, which the event loop must then win back from the preprocessing threads) per request. WARNING and
    above flush at once, with everything before them, in order. The buffer is flushed at exit (logging.shutdown)."""

    def __init__(self, stream: io.TextIOBase, interval: float = FLUSH_INTERVAL_S):
        super().__init__(stream)
        self.interval = interval
        self._dirty = threading.Event()
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
            elif not self._dirty.is_set():
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_later, name="log-flush", daemon=True)
                    self._flusher.start()
                self._dirty.set()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)

    def _flush_later(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(self.interval)
            self._dirty.clear()
            self.flush()


def _stderr_stream() -> io.TextIOBase:
    """stderr's file descriptor behind a 64 KiB buffer that only the handler flushes (sys.stderr flushes every line);
    sys.stderr itself when it has no descriptor (a test's capture)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr
    raw = open(fd, "wb", buffering=64 * 1024, closefd=False)  # noqa: SIM115 - lives as long as the handler
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", line_buffering=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the root logger; uvicorn's loggers propagate to it."""
    # neither format prints the caller's file and line, the thread or the process: not looking them up for every
    # record (the logging HOWTO's "Optimization") takes about a sixth off each access-log line
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = CoalescingHandler(_stderr_stream())
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_mmserve", False):
            root.removeHandler(old)
    handler._mmserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
