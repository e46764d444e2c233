#!/usr/bin/env python3
"""The official OpenAI Python SDK against `omnigen serve` on the committed tiny checkpoint.

    python3 tools/serve/openai_sdk_check.py PATH/TO/omnigen

Starts the server on 127.0.0.1 (any free port, an API key required), then, through the SDK:
`images.generate`, `images.edit` with one and with two images, a 400 whose `param` names the
field, a 401 for a wrong key, `models.list`; then SIGTERM and a clean exit. Exits non-zero,
saying what failed, on the first failure. Needs `pip install openai` (.ci/run makes a venv).
"""

import base64
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import openai

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "A")
KEY = "sdk-check-key"


def png_size(data):
    """(width, height) of PNG bytes; fails on anything that is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR", "no IHDR chunk"
    width, height = struct.unpack(">II", data[16:24])
    crc = struct.unpack(">I", data[16 + length : 20 + length])[0]
    assert zlib.crc32(data[12 : 16 + length]) == crc, "IHDR checksum"
    return width, height


def start(binary):
    server = subprocess.Popen(
        [binary, "serve", "--model", os.path.join(FIXTURES, "model"), "--port", "0",
         "--api-key", KEY, "--max-steps", "8"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=dict(os.environ, RUST_LOG="warn"),
    )
    port = None
    log = []
    deadline = time.time() + 60
    for line in server.stderr:
        log.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
        if time.time() > deadline:
            break
    if port is None:
        sys.exit("the server printed no address:\n" + "".join(log))
    # keep draining stderr so the server never blocks on a full pipe
    threading.Thread(target=lambda: [log.append(l) for l in server.stderr], daemon=True).start()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.time() > deadline or server.poll() is not None:
            sys.exit("the server did not become ready:\n" + "".join(log))
        time.sleep(0.05)
    return server, port, log


def check(label, condition, detail=""):
    if not condition:
        raise AssertionError(f"{label}: {detail}")
    print(f"ok: {label}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(f"openai SDK {openai.__version__}")
    server, port, log = start(sys.argv[1])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)

        models = client.models.list()
        check("models.list", [m.id for m in models.data] == ["omnigen"], models)

        result = client.images.generate(
            model="omnigen", prompt="a red cat sitting on a blue mat", size="64x64", n=2,
            response_format="b64_json", extra_body={"steps": 2, "seed": 0},
        )
        sizes = [png_size(base64.b64decode(d.b64_json)) for d in result.data]
        check("images.generate", sizes == [(64, 64), (64, 64)], sizes)
        again = client.images.generate(
            model="omnigen", prompt="a red cat sitting on a blue mat", size="64x64", n=2,
            extra_body={"steps": 2, "seed": 0},
        )
        check("images.generate is reproducible with a seed",
              [d.b64_json for d in again.data] == [d.b64_json for d in result.data])

        with open(os.path.join(FIXTURES, "edit_in.png"), "rb") as image:
            edit = client.images.edit(
                model="omnigen", image=image, prompt="make the cat green and add a hat",
                extra_body={"steps": 2, "seed": 0},
            )
        size = png_size(base64.b64decode(edit.data[0].b64_json))
        # `size` defaults to the input image's: 72x56, centre-cropped to multiples of 16
        check("images.edit, one image, output at the input's size", size == (64, 48), size)

        with open(os.path.join(FIXTURES, "edit_in.png"), "rb") as a, \
                open(os.path.join(FIXTURES, "img2_in.png"), "rb") as b:
            edit = client.images.edit(
                model="omnigen", image=[a, b], size="32x32",
                prompt="The cat in <img><|image_1|></img> and the dog in <img><|image_2|></img>",
                extra_body={"steps": 2, "seed": 1},
            )
        size = png_size(base64.b64decode(edit.data[0].b64_json))
        check("images.edit, two images", size == (32, 32), size)

        try:
            client.images.generate(prompt="a cat", size="33x32", extra_body={"steps": 2})
            check("a bad size is refused", False, "no error")
        except openai.BadRequestError as e:
            check("a bad size is refused with 400 naming `size`",
                  e.status_code == 400 and e.body.get("param") == "size", e.body)

        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
        try:
            wrong.images.generate(prompt="a cat", extra_body={"steps": 2})
            check("a wrong key is refused", False, "no error")
        except openai.AuthenticationError as e:
            check("a wrong key is refused with 401", e.status_code == 401, e)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed"
    check("SIGTERM: clean exit", code == 0, f"exit {code}\n" + "".join(log))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        sys.exit(f"FAILED: {e}")
