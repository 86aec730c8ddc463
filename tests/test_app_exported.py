"""The app on the real exported tiny models (training -> export -> serve), both backends."""
from __future__ import annotations

import base64

import pytest

from tests.media import audio_bytes, image_bytes
from tests.test_app_api import make_client, wait_ready

pytestmark = pytest.mark.slow


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_exported_models_serve_every_task(model_repository, backend):
    with make_client(model_repository, backend=backend, device="cpu") as c:
        body = wait_ready(c, timeout=120)
        assert set(body["models"].values()) == {"ready"}, body
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        for name, m in models.items():
            assert m["backend"] == backend and m["device"] == "cpu"
        png, wav = image_bytes(), audio_bytes()
        for name, m in models.items():
            mods = [x["name"] for x in m["modalities"]]
            item = {}
            if "text" in mods:
                item["question" if m["task"] == "vqa" else "text"] = "Alice flew from Paris to Berlin"
            if "image" in mods:
                item["image"] = b64(png)
            if "audio" in mods:
                item["audio"] = b64(wav)
            r = c.post(f"/v1/{m['task']}", json={**item, "model": name})
            assert r.status_code == 200, r.text
            batch = c.post(f"/v1/{m['task']}/batch", json={"model": name, "inputs": [item, item]})
            assert [x["status"] for x in batch.json()["results"]] == [200, 200]
