"""Fetch one URL the way img2dataset does, with every way of failing named."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

from ..config import UrlListParams

CHUNK = 64 * 1024
REDIRECT_CODES = (301, 302, 303, 307, 308)
# img2dataset's default --disallowed_header_directives: the site opts out of AI training / indexing
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
IMAGE_LIKE_TYPES = ("application/octet-stream", "binary/octet-stream", "application/binary")


class FetchError(Exception):
    def __init__(self, reason: str, message: str = "", attempts: int = 1):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason, self.message, self.attempts = reason, message, attempts


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand every 3xx back as an HTTPError so that fetch_once follows it under its own rules."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def retryable(reason: str) -> bool:
    return reason in ("timeout", "connection_error", "http_429") or reason.startswith("http_5")


def fetch(url: str, cfg: UrlListParams = UrlListParams(), sleep=time.sleep) -> bytes:
    """The body of url, or FetchError with the reason of the last attempt (cfg: the `download.url_list` params).

    `FetchError(reason, message)`'s reason is one of: timeout, http_<code>, too_large, not_image, redirect_loop,
    too_many_redirects, unsafe_redirect, connection_error, invalid_url, opted_out. Redirects are followed by hand (a
    limit, loops detected, only to public http(s) hosts: check_redirect), the body is read in chunks and abandoned past `max_bytes` or past the per-attempt deadline, and
    retryable failures (timeouts, connection errors, 429 and 5xx) are retried with exponential backoff.
    """
    attempt = 1
    while True:
        try:
            return fetch_once(url, cfg)
        except Exception as exc:  # every failure becomes a reason
            reason, message = classify(exc)
        if attempt > cfg.retries or not retryable(reason):
            raise FetchError(reason, message, attempt)
        sleep(cfg.backoff * 2 ** (attempt - 1))
        attempt += 1


def fetch_once(url: str, cfg: UrlListParams) -> bytes:
    deadline = time.monotonic() + cfg.timeout
    seen = set()
    for _ in range(cfg.max_redirects + 1):
        if urlsplit(url).scheme not in ("http", "https"):
            raise FetchError("invalid_url", f"not an http(s) URL: {url[:200]!r}")
        seen.add(url)
        request = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
        try:
            response = _OPENER.open(request, timeout=_remaining(deadline))
        except urllib.error.HTTPError as err:
            location = err.headers.get("Location") if err.headers else None
            err.close()
            if err.code not in REDIRECT_CODES or not location:
                raise FetchError(f"http_{err.code}", str(err.reason)) from None
            url = urljoin(url, location)
            if url in seen:
                raise FetchError("redirect_loop", f"redirected back to {url[:200]}") from None
            check_redirect(url, cfg.allow_private)
            continue
        with response:
            _check_headers(response.headers, cfg)
            return _read_capped(response, cfg.max_bytes, deadline)
    raise FetchError("too_many_redirects", f"more than {cfg.max_redirects} redirects")


def check_redirect(url: str, allow_private: bool) -> None:
    """FetchError unsafe_redirect unless url is http(s) and (allow_private, or) every address its host resolves to
    is public: no loopback, private, link-local, shared (CGNAT), reserved or multicast address. The check resolves
    the name itself; the connection resolves it again (a DNS answer that changes in between is not caught)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError("unsafe_redirect", f"redirect to a {parts.scheme or 'schemeless'} URL: {url[:200]!r}")
    if allow_private:
        return
    if not parts.hostname:
        raise FetchError("invalid_url", f"redirect to a URL without a host: {url[:200]!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise FetchError("connection_error", f"cannot resolve redirect host {parts.hostname!r}: {err}") from None
    for addr in sorted({info[4][0] for info in infos}):
        if not public_address(addr):
            raise FetchError("unsafe_redirect", f"redirect to {url[:200]} resolves to the non-public address {addr} "
                                                "(download.url_list.allow_private: false)")


def public_address(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])  # an IPv6 zone index is not part of the address
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timeout", "deadline passed")
    return left


def _check_headers(headers, cfg: UrlListParams) -> None:
    if cfg.respect_opt_out:
        tags = ",".join(headers.get_all("X-Robots-Tag") or []).lower()
        words = {w.strip().split(":")[-1].strip() for w in tags.replace(";", ",").split(",")}
        if words & OPT_OUT_DIRECTIVES:
            raise FetchError("opted_out", f"X-Robots-Tag: {tags}")
    length = headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > {cfg.max_bytes}")
    ctype = (headers.get_content_type() if headers.get("Content-Type") else "").lower()
    if ctype and not ctype.startswith("image/") and ctype not in IMAGE_LIKE_TYPES:
        raise FetchError("not_image", f"Content-Type {ctype}")


def _read_capped(response, max_bytes: int, deadline: float) -> bytes:
    """The body, in chunks of one socket read each, so that the deadline is checked between them
    (one read blocks at most the socket timeout: a trickling server is cut off within 2x timeout)."""
    chunks, size = [], 0
    while chunk := response.read1(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("too_large", f"body larger than {max_bytes} bytes")
        chunks.append(chunk)
        _remaining(deadline)
    return b"".join(chunks)


def classify(exc: BaseException) -> tuple[str, str]:
    """(reason, message) of a failed attempt."""
    if isinstance(exc, FetchError):
        return exc.reason, exc.message
    if isinstance(exc, urllib.error.HTTPError):
        return f"http_{exc.code}", str(exc.reason)
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            reason, _ = classify(inner)
            return reason, str(inner)
        return "connection_error", str(inner)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout", str(exc) or "timed out"
    if isinstance(exc, (http.client.InvalidURL, ValueError)) and not isinstance(exc, OSError):
        return "invalid_url", str(exc)  # (a TLS certificate error is both an OSError and a ValueError)
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return "connection_error", f"{type(exc).__name__}: {exc}"  # refused, reset, DNS, TLS, bad status line
    return "error", f"{type(exc).__name__}: {exc}"
