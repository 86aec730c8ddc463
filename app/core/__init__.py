"""The serving core: model registry and loading, batch-size calibration, dynamic batcher, request
execution (`service`) and its domain errors. It imports nothing from FastAPI or Starlette (a test
checks): the protocol front-ends (`app/rest.py`, `app/v2.py`) turn requests into plain values for it."""
