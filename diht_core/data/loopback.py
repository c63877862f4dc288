"""A loopback HTTP server that serves every kind of URL a web list holds, for tests and benchmarks."""

from __future__ import annotations

import io
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import numpy as np
import pandas as pd
from PIL import Image

MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@lru_cache(maxsize=512)
def image_bytes(w: int, h: int, seed: int, fmt: str = "jpg") -> bytes:
    """A deterministic picture: two gradients and a block, in the seed's colours."""
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (np.linspace(0, 1, w)[None, :, None] + np.linspace(0, 1, h)[:, None, None]) / 2
    arr = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    arr[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


@lru_cache(maxsize=1)
def bomb_png(w: int = 20_000, h: int = 20_000) -> bytes:
    """A valid 1-bit PNG of w x h pixels whose zeros compress to a few tens of kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.record(self.path)
        try:
            self._route(self.path.strip("/").split("/"), {})
        except (ConnectionError, socket.timeout):  # the client gave up (timeouts, size caps)
            pass

    def _route(self, parts: list[str], headers: dict, trickle_ms: int = 0) -> None:
        head = parts[0]
        if head == "slow":
            time.sleep(int(parts[1]) / 1000)
            return self._route(parts[2:], headers, trickle_ms)
        if head == "trickle":
            return self._route(parts[2:], headers, int(parts[1]))
        if head == "noai":
            return self._route(parts[1:], {**headers, "X-Robots-Tag": "noai"}, trickle_ms)
        if head == "octet":
            return self._route(parts[1:], {**headers, "Content-Type": "application/octet-stream"}, trickle_ms)
        if head == "flaky":
            if self.server.count(parts[1]) <= int(parts[2]):
                return self.send_error(503)
            return self._route(parts[3:], headers, trickle_ms)
        if head == "redirect":
            n, rest = int(parts[1]), "/".join(parts[2:])
            return self._redirect(f"/{rest}" if n <= 1 else f"/redirect/{n - 1}/{rest}")
        if head == "to":
            return self._redirect(unquote(parts[1]))
        if head == "loop":
            return self._redirect("/loop/b" if parts[1] == "a" else "/loop/a")
        if head == "status":
            return self.send_error(int(parts[1]))
        if head == "html":
            return self._send(b"<html><body>not an image</body></html>", "text/html; charset=utf-8", headers)
        if head == "as_jpeg":
            return self._send(b"<html><body>not an image</body></html>", "image/jpeg", headers)
        if head == "bomb.png":
            return self._send(bomb_png(), "image/png", headers)
        if head in ("huge", "huge_nolength"):
            return self._send_huge(int(parts[1]), with_length=head == "huge")
        if head in ("img", "truncated") and len(parts) == 3:
            w, h = (int(v) for v in parts[1].split("x"))
            seed, fmt = parts[2].split(".")
            data = image_bytes(w, h, int(seed), fmt)
            if head == "truncated":
                data = data[: len(data) // 2]
            return self._send(data, MIME[fmt], headers, trickle_ms)
        self.send_error(404)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, data: bytes, ctype: str, headers: dict, trickle_ms: int = 0) -> None:
        self.send_response(200)
        self.send_header("Content-Type", headers.pop("Content-Type", ctype))
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        step = 1024 if trickle_ms else len(data) or 1
        for i in range(0, len(data), step):
            self.wfile.write(data[i: i + step])
            if trickle_ms:
                self.wfile.flush()
                time.sleep(trickle_ms / 1000)

    def _send_huge(self, n: int, with_length: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if with_length:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        block = b"\xff" * 65536
        for i in range(0, n, len(block)):
            self.wfile.write(block[: min(len(block), n - i)])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a burst of connections from many threads must not overflow the backlog

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._counts: Counter = Counter()
        self._lock = threading.Lock()
        self.paths: list[str] = []

    def record(self, path: str) -> None:
        with self._lock:
            self.paths.append(path)

    def count(self, token: str) -> int:
        with self._lock:
            self._counts[token] += 1
            return self._counts[token]

    def handle_error(self, request, client_address) -> None:
        pass


class LoopbackServer:
    """`with LoopbackServer() as srv: srv.url("/img/64x64/0.jpg")`, on 127.0.0.1 and a free port.

    Paths (prefixes compose: `/slow/3000/redirect/2/img/300x200/1.jpg`):
    - `/img/<w>x<h>/<seed>.<jpg|png|webp>`: a good image;
    - `/truncated/<w>x<h>/<seed>.jpg`: the first half of a JPEG; `/as_jpeg/html`: HTML sent as image/jpeg;
    - `/html`: a text/html page; `/status/<code>`: that HTTP error;
    - `/huge/<bytes>` (with Content-Length), `/huge_nolength/<bytes>` (without): a big image/jpeg body;
    - `/bomb.png`: a 50 kB PNG of 20,000 x 20,000 pixels;
    - `/loop/a` <-> `/loop/b`: a redirect loop; `/redirect/<n>/<rest>`: n redirects, then rest;
    - `/to/<url, percent-quoted>`: a redirect to that absolute URL (file://, another host);
    - `/slow/<ms>/<rest>`: wait, then rest; `/trickle/<ms>/<rest>`: rest's body in 1 kB pieces, ms apart;
    - `/flaky/<token>/<k>/<rest>`: 503 for the first k requests of token, then rest;
    - `/noai/<rest>`, `/octet/<rest>`: rest with `X-Robots-Tag: noai` / as application/octet-stream.

    `python -m diht_core.data.loopback [port]` serves until killed and prints its base URL.
    """

    def __init__(self, port: int = 0):
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def requests(self) -> list[str]:
        """The path of every request served so far, in arrival order."""
        return list(self.httpd.paths)

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def closed_port() -> int:
    """A port on 127.0.0.1 with nobody listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# kind: (path, expected reason) in a mixed list; {s} is a seed (97 distinct pictures, so that the server's
# cache holds them all), {w}x{h} its size (48 to 647 px), {slow} the delay in ms
KINDS = {
    "good_jpg": ("/img/{w}x{h}/{s}.jpg", "ok"),
    "good_png": ("/img/{w}x{h}/{s}.png", "ok"),
    "redirect_ok": ("/redirect/2/img/{w}x{h}/{s}.jpg", "ok"),
    "dead_404": ("/status/404", "http_404"),
    "dead_refused": (None, "connection_error"),
    "slow": ("/slow/{slow}/img/64x64/{s}.jpg", "timeout"),
    "html": ("/html", "not_image"),
    "html_as_jpeg": ("/as_jpeg/html", "decode_error"),
    "truncated": ("/truncated/{w}x{h}/{s}.jpg", "decode_error"),
    "redirect_loop": ("/loop/a", "redirect_loop"),
    "huge": ("/huge/30000000", "too_large"),
    "bomb": ("/bomb.png", "decompression_bomb"),
}
DEFAULT_MIX = {"good_jpg": 0.50, "good_png": 0.10, "redirect_ok": 0.05, "dead_404": 0.10, "dead_refused": 0.10,
               "slow": 0.04, "html": 0.03, "html_as_jpeg": 0.02, "truncated": 0.02, "redirect_loop": 0.02,
               "huge": 0.01, "bomb": 0.01}


def mixed_url_list(base: str, n: int, mix: dict | None = None, slow_ms: int = 3000, seed: int = 0) -> pd.DataFrame:
    """n rows (url, caption, kind, expected reason) in shuffled order, each kind's share from mix."""
    mix = mix or DEFAULT_MIX
    rng = np.random.default_rng(seed)
    counts = {k: int(round(f * n)) for k, f in mix.items()}
    biggest = max(counts, key=counts.get)
    counts[biggest] += n - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    refused = f"http://127.0.0.1:{closed_port()}"
    rows = []
    for i, kind in enumerate(kinds):
        path, reason = KINDS[kind]
        s = int(rng.integers(97))
        w, h = 48 + s * 37 % 600, 48 + s * 53 % 600
        url = f"{refused}/img/{i}.jpg" if path is None else base + path.format(s=s, w=w, h=h, slow=slow_ms)
        rows.append({"url": url, "caption": f"picture number {i}, a {kind.replace('_', ' ')}", "kind": kind,
                     "expected": reason})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    with LoopbackServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0) as srv:
        print(srv.base, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
