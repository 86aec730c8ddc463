"""Launch the real server (`python -m app` path) for live tests; TEST_INFERENCE_DELAY_MS slows every
inference call down so queueing, disconnects and shutdown can be observed deterministically."""
import os
import time

from app import runtime

delay = float(os.environ.get("TEST_INFERENCE_DELAY_MS", "0")) / 1000
if delay:
    _run = runtime.OnnxRuntime.run

    def run(self, feeds):
        time.sleep(delay)
        return _run(self, feeds)

    runtime.OnnxRuntime.run = run

from app.__main__ import main  # noqa: E402

main()
