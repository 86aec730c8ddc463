"""mmserve serving app (HTTP, runtimes, dynamic batching, metrics). Never imports torch or `training`."""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("mmserve")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
