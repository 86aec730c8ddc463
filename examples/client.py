"""A minimal mmserve client: one multipart request per task endpoint, standard library only.

    python examples/client.py [--url http://127.0.0.1:8000]

Run `make serve` first (it builds the demo models and serves them on 127.0.0.1:8000).
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


def post_multipart(url: str, fields: dict[str, str], files: dict[str, Path], timeout: float = 30) -> dict:
    """POST multipart/form-data (text fields + files); returns the JSON body, raises on an HTTP error."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for name, value in fields.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    for name, path in files.items():
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{path.name}\"\r\n"
                 f"Content-Type: {kind}\r\n\r\n").encode() + path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=bytes(body), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:  # the service answers errors as JSON too
        raise SystemExit(f"{url}: HTTP {err.code}: {err.read().decode(errors='replace')}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")

    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
        models = json.load(response)["models"]
    print("models:", ", ".join(f"{m['name']} ({m['task']}, {m['state']})" for m in models))

    calls = [
        ("classify: cat photo + chirp", "classify", {"text": "Clip recorded in the garden.", "top_k": "2"},
         {"image": HERE / "cat.jpg", "audio": HERE / "chirp.wav"}),
        ("classify: cat photo + hum", "classify", {"text": "Clip recorded in the garden.", "top_k": "2"},
         {"image": HERE / "cat.jpg", "audio": HERE / "hum.wav"}),
        ("ner", "ner", {"text": "Alice Smith flew to Paris to meet Acme Corp ."}, {}),
        ("vqa: cat photo", "vqa", {"question": "what is in the picture?", "top_k": "3"}, {"image": HERE / "cat.jpg"}),
    ]
    for title, task, fields, files in calls:
        result = post_multipart(f"{base}/v1/{task}", fields, files)
        print(f"{title}: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
