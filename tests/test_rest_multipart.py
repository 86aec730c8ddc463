"""The plain-multipart splitter of /v1 (app/rest_parsing.split_multipart) against starlette's parser, which it
stands in for: on every body it accepts (well-formed and randomly mutated ones), the fields, file names and bytes
are exactly starlette's; everything else it leaves to starlette (returns None)."""
from __future__ import annotations

import asyncio
import random

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException

from app.rest_parsing import _replay, _StrictMultiPartParser, split_multipart


async def ref(body, ctype):
    try:
        form = await _StrictMultiPartParser(Headers({"content-type": ctype}), _replay(body), max_files=4, max_fields=16, max_part_size=1000).parse()
    except MultiPartException as e:
        return "error"
    out = []
    for k, v in form.multi_items():
        if isinstance(v, UploadFile):
            out.append((k, v.filename, await v.read()))
        else:
            out.append((k, None, v))
    await form.close()
    return out


def gen(rng):
    b = rng.choice(["b", "xyz123", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "a'b(c)"])
    parts = []
    for i in range(rng.randint(1, 5)):
        name = rng.choice(["text", "image", "audio", "model", "top_k", "x y", "n\xe9"])
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            if rng.random() < 0.2: data += b"\r\n--" + b.encode()
            fn = rng.choice(["a.jpg", "", "we ird.wav"])
            head = f'Content-Disposition: form-data; name="{name}"; filename="{fn}"\r\nContent-Type: application/octet-stream\r\n'
        else:
            data = rng.choice([b"hello", b"", "h\xe9llo".encode(), b"\xff\xfe", b"a" * 1200, b"12"])
            head = f'Content-Disposition: form-data; name="{name}"\r\n'
        parts.append(f"--{b}\r\n".encode() + head.encode("latin-1") + b"\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{b}--\r\n".encode()
    q = rng.choice(["", '"'])
    ctype = f"multipart/form-data; boundary={q}{b}{q}"
    if " " in b or "'" in b: ctype = f'multipart/form-data; boundary="{b}"'
    # mutations
    for _ in range(rng.choice([0, 0, 1, 2])):
        kind = rng.random(); pos = rng.randrange(len(body) + 1)
        if kind < 0.33: body = body[:pos] + bytes([rng.choice(b"\r\n-:;= \"abx")]) + body[pos:]
        elif kind < 0.66: body = body[:pos] + body[pos + 1:]
        else: body = body[:pos] + bytes([rng.randrange(256)]) + body[pos + 1:]
    if rng.random() < 0.1: body = b"preamble\r\n" + body
    if rng.random() < 0.1: body = body + b"epilogue"
    if rng.random() < 0.05: ctype = ctype.replace("form-data", "Form-Data")
    if rng.random() < 0.05: ctype += "; charset=latin-1"
    return body, ctype


def test_the_splitter_agrees_with_starlette_on_every_body_it_accepts():
    async def main():
        rng = random.Random(15)
        accepted = refused = 0
        for _ in range(4000):
            body, ctype = gen(rng)
            got = split_multipart(body, ctype, max_files=4, max_fields=16, max_part_size=1000)
            if got is None:
                refused += 1
                continue
            accepted += 1
            assert await ref(body, ctype) == got, (body, ctype)
        return accepted, refused

    accepted, refused = asyncio.run(main())
    assert accepted > 300 and refused > 300  # both ways exercised


def test_what_the_splitter_leaves_to_starlette():
    plain = (b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n'
             b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
             b'\x89PNG\r\n--b--\r\n')
    ct = "multipart/form-data; boundary=b"
    opts = dict(max_files=4, max_fields=16, max_part_size=1000)
    assert split_multipart(plain, ct, **opts) == [("text", None, "hi"), ("image", "a.png", b"\x89PNG")]
    assert split_multipart(plain, ct + "; charset=latin-1", **opts) is None  # another charset
    assert split_multipart(plain, "multipart/form-data", **opts) is None  # no boundary
    assert split_multipart(plain[:-4], ct, **opts) is None  # no final delimiter
    assert split_multipart(plain.replace(b"hi", b"\xff"), ct, **opts) is None  # text that is not UTF-8
    assert split_multipart(plain.replace(b'name="text"', b"name*=UTF-8''t"), ct, **opts) is None  # RFC 2231
    assert split_multipart(plain.replace(b"hi", b"x" * 1001), ct, **opts) is None  # a field over max_part_size
    assert split_multipart(b"preamble\r\n" + plain, ct, **opts) is None
    five = plain[:-9] + b"".join(b'\r\n--b\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\ny'
                                 for _ in range(4)) + b"\r\n--b--\r\n"
    assert split_multipart(five, ct, **opts) is None  # five files: starlette's "Too many files"
