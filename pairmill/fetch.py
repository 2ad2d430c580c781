"""Fetching image bytes over HTTP(S): bounded, polite, and with a reason for every failure.

Real crawls give image URLs, not bytes. This module turns a URL into bytes or a
`Rejection`, and never raises for one bad URL. The policy:

* **Only http(s).** `check_url` refuses every other scheme (``file:``, ``ftp:``,
  ``data:``, ``javascript:``), relative URLs, local paths and empty strings
  (``disallowed_url``). Redirects are followed by hand (at most 5 hops) and every
  hop is checked the same way, so a redirect to ``file:///etc/passwd`` is a
  ``disallowed_url`` and is never opened. More than 5 hops, or a loop, is a
  ``fetch_error`` ("too many redirects").
* **Everything is bounded.** Each attempt has one deadline of ``timeout`` seconds
  that covers connecting, the headers, every redirect hop and the whole body. A
  watchdog thread shuts the socket down when the deadline passes, so a server that
  trickles headers or body bytes forever cannot hold a worker past it (a plain
  socket read timeout would never fire). Retries, backoff and Retry-After waits
  are bounded too; the worst case for one URL is about
  ``(retries + 1) * (timeout + max_retry_after) + retries * max_retry_after``.
* **Size.** A Content-Length above ``max_bytes`` is rejected before any body is
  read; otherwise the body is streamed and reading stops (and the connection is
  closed) as soon as it passes ``max_bytes`` (``file_too_large``). Bodies are never
  buffered beyond ``max_bytes`` plus one 64 KiB chunk. ``Accept-Encoding: identity``
  is asked for; a server that compresses anyway is decoded and the limit applies
  to the decoded bytes (no decompression bombs).
* **Retries.** After the first attempt, up to ``retries`` more on 408, 429, any 5xx,
  timeouts and connection errors (not on TLS certificate errors or a definitive
  DNS "no such host"). A 429 or 503 with ``Retry-After`` (seconds or an HTTP date)
  waits exactly that long. If the server asks for more than ``max_retry_after``,
  the URL is given up at once (``http_error``, the detail says so) instead of
  retrying early, which is what gets crawlers banned. Other failures back off
  exponentially, ``backoff * 2**n`` times a jitter in [0.5, 1.5) seeded by the URL
  (deterministic). Inside a `Fetcher`, a 429 or a Retry-After also pauses every
  other request to the same host (host:port) for that long.
* **Opt-outs.** With ``respect_opt_out`` an ``X-Robots-Tag`` of ``noai`` or
  ``noimageai`` (any casing, comma lists, several header lines, for everyone or
  prefixed with our product token as in ``pairmill: noai``) rejects the image as
  ``opted_out`` before its body is read. Directives for other agents
  (``otherbot: noai``) do not apply to us.
* **Status.** 2xx is success; an empty body is ``empty``. Any other final status
  is ``http_error`` with the status in the detail (``"HTTP 404"``; after retries
  ``"HTTP 503 after 4 attempts"``). The Content-Type is not checked: an HTML page
  served as ``.jpg`` with 200 is returned as bytes and rejected later by decoding
  (``decode_error``), because image servers mislabel types too often for the
  header to be trusted either way.
* **Everything else** (connection refused or reset, truncated bodies, TLS errors,
  URLs the client cannot encode) is ``fetch_error`` with a one-line detail.

`fetch_one` fetches one URL with a given `requests.Session` (best made by
`make_session`, whose connections register with the watchdog; with a plain
session the deadline is still checked between body chunks). `Fetcher` fetches
many URLs concurrently on a thread pool with one pooled session per thread,
never more than ``per_host`` requests in flight per host and ``concurrency``
overall; one slow host only holds its own ``per_host`` slots.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import http.client
import http.cookiejar
import itertools
import math
import queue
import random
import re
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from pairmill import __version__
from pairmill.errors import ConfigError
from pairmill.rejects import (
    DISALLOWED_URL,
    EMPTY,
    FETCH_ERROR,
    FILE_TOO_LARGE,
    HTTP_ERROR,
    OPTED_OUT,
    TIMEOUT,
    Rejection,
)

K = TypeVar("K")

DEFAULT_USER_AGENT = f"pairmill/{__version__} (image-pair corpus builder)"
MAX_REDIRECTS = 5
MAX_RETRIES = 20
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
ACCEPT = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"
_CHUNK = 64 * 1024  # largest single read; also the most of an error body drained for reuse
_MAX_PENDING = 10_000  # URLs a Fetcher buffers while their host is at its per-host limit
_POOL_PREFIX = re.compile(r"^\w+\(host=[^)]*\):\s*")  # urllib3's "Pool(host=.., port=..): "
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AGENT_TOKEN = re.compile(r"\*|[a-z0-9][a-z0-9_.-]*")
# X-Robots-Tag directives that take a value after a colon (not user-agent prefixes)
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


@dataclass(frozen=True)
class FetchConfig:
    """How images are fetched.

    Args:
      timeout: seconds for one attempt: connect, headers, redirects and body together.
      max_bytes: largest body accepted; reading stops just past it (file_too_large).
      retries: further attempts after the first, on 408, 429, 5xx, timeouts and
        connection errors.
      backoff: base of the exponential backoff (seconds) between retries.
      max_retry_after: the longest Retry-After honoured (and the longest single
        backoff); a server asking for more gets the URL given up.
      per_host: most requests in flight to one host (host:port) in a Fetcher.
      concurrency: most requests in flight in a Fetcher (its thread count).
      user_agent: the User-Agent header; its product token (before "/") is the
        name X-Robots-Tag directives are matched against, besides "pairmill".
      respect_opt_out: reject images whose X-Robots-Tag says noai / noimageai.
    """

    timeout: float = 10.0
    max_bytes: int = 20 * 2**20
    retries: int = 3
    backoff: float = 0.5
    max_retry_after: float = 60.0
    per_host: int = 4
    concurrency: int = 32
    user_agent: str = DEFAULT_USER_AGENT
    respect_opt_out: bool = True

    def __post_init__(self):
        _check(
            _finite(self.timeout) and self.timeout > 0,
            f"--fetch-timeout must be a positive number of seconds, got {self.timeout!r}",
        )
        _check(
            _integer(self.max_bytes) and self.max_bytes >= 1,
            f"--max-image-bytes must be a positive integer, got {self.max_bytes!r}",
        )
        _check(
            _integer(self.retries) and 0 <= self.retries <= MAX_RETRIES,
            f"--retries must be an integer from 0 to {MAX_RETRIES}, got {self.retries!r}",
        )
        _check(
            _finite(self.backoff) and self.backoff >= 0,
            f"--retry-backoff must be zero or more seconds, got {self.backoff!r}",
        )
        _check(
            _finite(self.max_retry_after) and self.max_retry_after >= 0,
            f"--max-retry-after must be zero or more seconds, got {self.max_retry_after!r}",
        )
        _check(
            _integer(self.per_host) and self.per_host >= 1,
            f"--fetch-per-host must be a positive integer, got {self.per_host!r}",
        )
        _check(
            _integer(self.concurrency) and self.concurrency >= 1,
            f"--fetch-concurrency must be a positive integer, got {self.concurrency!r}",
        )
        _check(
            isinstance(self.user_agent, str)
            and bool(self.user_agent.strip())
            and not _CONTROL.search(self.user_agent),
            "--user-agent must be a non-empty single line",
        )

    @property
    def agent_names(self) -> frozenset[str]:
        """Names an X-Robots-Tag user-agent prefix may use to address us."""
        words = self.user_agent.split("/", 1)[0].split()
        return frozenset({"pairmill", words[0].lower()} if words else {"pairmill"})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- URLs


def check_url(url: str) -> Rejection | None:
    """None if `url` may be fetched (absolute http or https with a host), else why not."""
    if not isinstance(url, str) or not url.strip():
        return Rejection(DISALLOWED_URL, "empty URL")
    url = url.strip()
    if _CONTROL.search(url):
        return Rejection(DISALLOWED_URL, "control characters in URL")
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return Rejection(DISALLOWED_URL, _one_line(f"unparsable URL: {exc}"))
    if not scheme:
        return Rejection(DISALLOWED_URL, "relative URL or local path (no scheme)")
    if scheme not in ("http", "https"):
        return Rejection(DISALLOWED_URL, f"scheme {scheme[:20]!r} is not http or https")
    if not host:
        return Rejection(DISALLOWED_URL, "no host in URL")
    return None


def host_key(url: str) -> str:
    """The host a per-host limit applies to: ``host:port`` (default ports filled in)."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme.lower() == "https" else 80
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ------------------------------------------------------------------ header parsing


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds a Retry-After header asks to wait (delay-seconds or HTTP date), or None."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def opted_out(values: Iterable[str], agents: Iterable[str] = ("pairmill",)) -> bool:
    """Whether X-Robots-Tag header values forbid AI use of the image for `agents`.

    Each value is a comma list of directives. ``name: directive`` starts a group
    addressed to user agent ``name`` (until the next such prefix in that value);
    directives before any prefix, or addressed to ``*``, apply to everyone.
    """
    names = {agent.lower() for agent in agents}
    for value in values:
        target = None
        for token in str(value).lower().split(","):
            token = token.strip()
            head, colon, rest = token.partition(":")
            head = head.strip()
            if colon and head not in _VALUED_DIRECTIVES and _AGENT_TOKEN.fullmatch(head):
                target, token = head, rest.strip()
            if token in OPT_OUT_DIRECTIVES and (target is None or target == "*" or target in names):
                return True
    return False


# ------------------------------------------------------------- deadline watchdog


class _Attempt:
    """One attempt's deadline and the socket it is currently waiting on."""

    __slots__ = ("deadline", "lock", "sock", "done", "expired")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.lock = threading.Lock()
        self.sock = None
        self.done = False
        self.expired = False

    def register(self, sock) -> None:
        with self.lock:
            if self.done:
                return
            self.sock = sock
            if self.expired:
                _shutdown(sock)

    def expire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.expired = True
            if self.sock is not None:
                _shutdown(self.sock)

    def finish(self) -> bool:
        """Stop watching; False if the deadline had already cut the attempt."""
        with self.lock:
            self.done = True
            self.sock = None
            return not self.expired


def _shutdown(sock) -> None:
    # the plain socket's shutdown: wakes a blocked read and leaves the TLS state alone
    with contextlib.suppress(OSError, TypeError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread that cuts the sockets of attempts past their deadline."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Attempt]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, attempt: _Attempt) -> None:
        with self._cond:
            heapq.heappush(self._heap, (attempt.deadline, next(self._order), attempt))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pairmill-fetch-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    deadline, _, attempt = self._heap[0]
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        heapq.heappop(self._heap)
                        break
                    self._cond.wait(wait)
            if not attempt.done:
                attempt.expire()


_WATCHDOG = _Watchdog()
_CURRENT = threading.local()  # .attempt: the attempt running in this thread


class _WatchedConnectionMixin:
    def getresponse(self):
        attempt = getattr(_CURRENT, "attempt", None)
        sock = getattr(self, "sock", None)
        if attempt is not None and sock is not None:
            attempt.register(sock)
        return super().getresponse()


class _WatchedHTTPConnection(_WatchedConnectionMixin, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnectionMixin, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections register their socket with the watchdog."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_WATCHED_POOLS)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is urllib3.ProxyManager:  # not SOCKS: it has its own pools
            manager.pool_classes_by_scheme = dict(_WATCHED_POOLS)
        return manager


def _headers(config: FetchConfig) -> dict[str, str]:
    return {"User-Agent": config.user_agent, "Accept": ACCEPT, "Accept-Encoding": "identity"}


def make_session(config: FetchConfig) -> requests.Session:
    """A pooled session for `fetch_one`: our User-Agent, no cookies, no client retries."""
    session = requests.Session()
    adapter = _WatchedAdapter(
        pool_connections=max(10, config.concurrency),
        pool_maxsize=config.per_host,
        max_retries=0,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update(_headers(config))
    # a crawler must not grow a cookie jar over millions of hosts (or send cookies back)
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return session


# ------------------------------------------------------------------ statistics


class FetchStats:
    """Thread-safe counters of what fetching did (requests, retries, bytes…)."""

    NAMES = (
        "requests",  # HTTP requests sent, redirect hops included
        "redirects",  # redirects followed
        "retries",  # attempts after the first
        "retry_after",  # waits that honoured a Retry-After header
        "throttled",  # attempts that first waited for their host to cool down
        "bytes",  # body bytes of accepted images
    )

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class HostThrottle:
    """Per-host "not before" times, shared by the workers of a Fetcher."""

    _PRUNE_AT = 4096

    def __init__(self):
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}

    def penalize(self, host: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        with self._lock:
            if until > self._until.get(host, 0.0):
                self._until[host] = until
            if len(self._until) > self._PRUNE_AT:
                now = time.monotonic()
                self._until = {h: t for h, t in self._until.items() if t > now}

    def delay(self, host: str) -> float:
        with self._lock:
            until = self._until.get(host)
            if until is None:
                return 0.0
            left = until - time.monotonic()
            if left <= 0:
                del self._until[host]
                return 0.0
            return left


# ----------------------------------------------------------------- fetch_one


@dataclass(frozen=True)
class _Retry:
    """A failed attempt that may be retried."""

    rejection: Rejection
    host: str
    status: int | None = None
    retry_after: float | None = None


class _Expired(Exception):
    """The attempt's deadline passed."""


def fetch_one(
    session: requests.Session,
    url: str,
    config: FetchConfig,
    *,
    throttle: HostThrottle | None = None,
    stats: FetchStats | None = None,
    cancel: threading.Event | None = None,
) -> bytes | Rejection:
    """Fetch one URL with retries: its bytes, or why not. Never raises for a bad URL.

    Args:
      session: a requests session, ideally from `make_session` (used by one thread at a time).
      url: an absolute http(s) URL.
      config: the fetch policy.
      throttle: per-host cool-downs shared with other workers (a Fetcher passes one).
      stats: counters to update.
      cancel: when set, waits between retries end at once and the last failure is returned.
    """
    bad = check_url(url)
    if bad is not None:
        return bad
    url = url.strip()
    stats = stats if stats is not None else FetchStats()
    host = host_key(url)
    rng = random.Random(zlib.crc32(url.encode("utf-8", "surrogatepass")))
    attempts = config.retries + 1
    last: _Retry | None = None
    made = 0
    for n in range(attempts):
        if throttle is not None:
            wait = min(throttle.delay(host), config.max_retry_after)
            if wait > 0:
                stats.add("throttled")
                if not _sleep(wait, cancel) and last is not None:
                    break
        made += 1
        outcome = _attempt(session, url, config, stats)
        if not isinstance(outcome, _Retry):
            return outcome
        last = outcome
        if n + 1 == attempts:
            break
        if outcome.retry_after is not None:
            if outcome.retry_after > config.max_retry_after:
                if throttle is not None:
                    throttle.penalize(outcome.host, config.max_retry_after)
                return Rejection(
                    outcome.rejection.reason,
                    f"{outcome.rejection.detail} with Retry-After {outcome.retry_after:.0f} s, "
                    f"above --max-retry-after {config.max_retry_after:g} s",
                )
            delay = outcome.retry_after
            stats.add("retry_after")
        else:
            delay = config.backoff * 2.0 ** min(n, 30) * (0.5 + rng.random())
            delay = min(delay, config.max_retry_after)
        if throttle is not None and (outcome.status == 429 or outcome.retry_after is not None):
            throttle.penalize(outcome.host, delay)
        stats.add("retries")
        if not _sleep(delay, cancel):
            break
    assert last is not None
    if made == 1:
        return last.rejection
    return Rejection(last.rejection.reason, f"{last.rejection.detail} after {made} attempts")


def _sleep(seconds: float, cancel: threading.Event | None) -> bool:
    """Wait; False if cancelled."""
    if cancel is None:
        time.sleep(seconds)
        return True
    return not cancel.wait(seconds)


def _attempt(
    session: requests.Session, url: str, config: FetchConfig, stats: FetchStats
) -> bytes | Rejection | _Retry:
    attempt = _Attempt(time.monotonic() + config.timeout)
    _WATCHDOG.watch(attempt)
    _CURRENT.attempt = attempt
    current = [url]  # the hop being fetched, for the host of a failure
    try:
        return _follow(session, url, config, attempt, stats, current)
    except Exception as exc:  # one URL's failure is never the caller's exception
        return _classify(exc, attempt, config, host_key(current[0]))
    finally:
        attempt.finish()
        _CURRENT.attempt = None


def _follow(session, url, config, attempt, stats, current) -> bytes | Rejection | _Retry:
    for hop in range(MAX_REDIRECTS + 1):
        left = attempt.deadline - time.monotonic()
        if left <= 0:
            raise _Expired()
        wait = min(config.timeout, left)
        stats.add("requests")
        response = session.get(
            url,
            headers=_headers(config),
            stream=True,
            allow_redirects=False,
            timeout=(wait, wait),
        )
        try:
            status = response.status_code
            location = response.headers.get("Location")
            if status in REDIRECT_STATUSES and location:
                target = urljoin(url, location.strip())
                bad = check_url(target)
                if bad is not None:
                    return Rejection(DISALLOWED_URL, f"redirect to {_short(target)}: {bad.detail}")
                if hop == MAX_REDIRECTS:
                    return Rejection(FETCH_ERROR, f"too many redirects (more than {MAX_REDIRECTS})")
                _drain(response, attempt)
                stats.add("redirects")
                url = current[0] = target.strip()
                continue
            if 200 <= status < 300:
                return _read_image(response, config, attempt, stats)
            _drain(response, attempt)
            rejection = Rejection(HTTP_ERROR, f"HTTP {status}")
            if status in (408, 429) or status >= 500:
                retry_after = None
                if status in (429, 503):
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                return _Retry(rejection, host_key(url), status, retry_after)
            return rejection
        finally:
            response.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _read_image(response, config, attempt, stats) -> bytes | Rejection:
    if config.respect_opt_out:
        values = response.raw.headers.getlist("X-Robots-Tag")
        if values and opted_out(values, config.agent_names):
            return Rejection(OPTED_OUT, _one_line(f"X-Robots-Tag: {', '.join(values)}"))
    length = (response.headers.get("Content-Length") or "").strip()
    if length.isdigit() and int(length) > config.max_bytes:
        return Rejection(
            FILE_TOO_LARGE, f"Content-Length {length} > --max-image-bytes {config.max_bytes}"
        )
    data = _read_limited(response.raw, config.max_bytes, attempt)
    if data is None:
        return Rejection(
            FILE_TOO_LARGE, f"more than --max-image-bytes {config.max_bytes} bytes (streamed)"
        )
    if not attempt.finish():  # the watchdog cut the body short: not a complete image
        raise _Expired()
    if not data:
        return Rejection(EMPTY, f"HTTP {response.status_code} with an empty body")
    stats.add("bytes", len(data))
    return data


def _read_limited(raw, limit: int, attempt: _Attempt) -> bytes | None:
    """The body, read in small pieces against the deadline; None past `limit` bytes."""
    buffer = bytearray()
    while True:
        if time.monotonic() >= attempt.deadline or attempt.expired:
            raise _Expired()
        chunk = raw.read1(min(_CHUNK, limit + 1 - len(buffer)), decode_content=True)
        if not chunk:
            return bytes(buffer)
        buffer += chunk
        if len(buffer) > limit:
            return None


def _drain(response, attempt) -> None:
    """Read a small unwanted body so the connection can be reused; else just close it."""
    length = (response.headers.get("Content-Length") or "").strip()
    if length.isdigit() and int(length) <= _CHUNK:
        with contextlib.suppress(Exception):  # a broken unwanted body costs the connection
            _read_limited(response.raw, _CHUNK, attempt)
    response.close()


def _classify(exc: BaseException, attempt: _Attempt, config, host: str) -> Rejection | _Retry:
    if attempt.expired or isinstance(exc, _Expired):
        detail = f"no complete response within {config.timeout:g} s"
        return _Retry(Rejection(TIMEOUT, detail), host)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return _Retry(Rejection(TIMEOUT, f"connect timeout ({config.timeout:g} s)"), host)
    if isinstance(
        exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)
    ):
        return _Retry(Rejection(TIMEOUT, f"read timeout ({config.timeout:g} s)"), host)
    root = _root_cause(exc)
    detail = _one_line(f"{type(root).__name__}: {_POOL_PREFIX.sub('', str(root))}")
    if isinstance(exc, requests.exceptions.SSLError) or isinstance(
        root, urllib3.exceptions.SSLError
    ):
        return Rejection(FETCH_ERROR, detail)
    if isinstance(root, urllib3.exceptions.NameResolutionError):
        if "temporary failure" in str(root).lower():
            return _Retry(Rejection(FETCH_ERROR, detail), host)
        return Rejection(FETCH_ERROR, detail)
    if isinstance(
        exc,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError,
            http.client.HTTPException,
            ConnectionError,
        ),
    ):
        return _Retry(Rejection(FETCH_ERROR, detail), host)
    return Rejection(FETCH_ERROR, detail)


def _root_cause(exc: BaseException) -> BaseException:
    """The urllib3 reason behind a requests exception, when there is one."""
    inner = exc.args[0] if exc.args else None
    if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
        return inner.reason
    return inner if isinstance(inner, BaseException) else exc


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _short(url: str, limit: int = 200) -> str:
    url = _one_line(url, limit + 1)
    return url if len(url) <= limit else url[: limit - 1] + "…"


# ------------------------------------------------------------------- Fetcher


class Fetcher:
    """Fetch many URLs concurrently, politely, with connection reuse.

    A thread pool of ``config.concurrency`` workers, each with its own pooled
    `make_session` session. `fetch` hands a URL to a worker only while its host
    has fewer than ``per_host`` requests in flight; URLs of a busy host wait in a
    buffer (at most 10,000) while other hosts' URLs go ahead, so a slow host only
    ever occupies its own slots. Hosts are ``host:port`` of the URL as given
    (redirect targets are not counted against their own host).

    Use from one thread at a time (one `fetch` running at a time); close it, or use
    it as a context manager, to stop the threads and close the sessions.
    """

    def __init__(self, config: FetchConfig | None = None):
        self.config = config if config is not None else FetchConfig()
        self.stats = FetchStats()
        self._throttle = HostThrottle()
        self._cancel = threading.Event()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.concurrency, thread_name_prefix="pairmill-fetch"
        )
        self._closed = False

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = make_session(self.config)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _work(self, url: str) -> bytes | Rejection:
        try:
            return fetch_one(
                self._session(),
                url,
                self.config,
                throttle=self._throttle,
                stats=self.stats,
                cancel=self._cancel,
            )
        except Exception as exc:  # pragma: no cover - fetch_one already catches
            return Rejection(FETCH_ERROR, _one_line(f"{type(exc).__name__}: {exc}"))

    def fetch(self, items: Iterable[tuple[K, str]]) -> Iterator[tuple[K, bytes | Rejection]]:
        """Yield ``(key, bytes or Rejection)`` once per item, in completion order.

        Items are read lazily, only while a worker is free; invalid URLs are
        answered at once without a request.
        """
        if self._closed:
            raise RuntimeError("Fetcher is closed")
        config = self.config
        done: queue.SimpleQueue = queue.SimpleQueue()
        waiting: dict[str, deque] = {}  # host -> items waiting for a per-host slot
        in_flight: dict[str, int] = {}
        total = 0
        buffered = 0
        source = iter(items)
        exhausted = False

        def start(host: str, key, url: str) -> None:
            nonlocal total
            in_flight[host] = in_flight.get(host, 0) + 1
            total += 1
            future = self._executor.submit(self._work, url)
            future.add_done_callback(lambda f, h=host, k=key: done.put((h, k, f)))

        while True:
            while not exhausted and total < config.concurrency and buffered < _MAX_PENDING:
                try:
                    key, url = next(source)
                except StopIteration:
                    exhausted = True
                    break
                bad = check_url(url)
                if bad is not None:
                    yield key, bad
                    continue
                host = host_key(url)
                if in_flight.get(host, 0) < config.per_host:
                    start(host, key, url)
                else:
                    waiting.setdefault(host, deque()).append((key, url))
                    buffered += 1
            if total == 0:
                if exhausted:
                    return
                continue  # only invalid URLs so far: read on
            host, key, future = done.get()
            total -= 1
            in_flight[host] -= 1
            queued = waiting.get(host)
            if queued:
                start(host, *queued.popleft())
                buffered -= 1
                if not queued:
                    del waiting[host]
            elif in_flight[host] == 0:
                del in_flight[host]
            yield key, _result(future)

    def close(self) -> None:
        """Stop retry waits, let running attempts end (each bounded), close sessions."""
        if self._closed:
            return
        self._closed = True
        self._cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _result(future: Future) -> bytes | Rejection:
    try:
        return future.result()
    except CancelledError:
        return Rejection(FETCH_ERROR, "cancelled: the fetcher was closed")
    except Exception as exc:  # pragma: no cover - _work already catches
        return Rejection(FETCH_ERROR, _one_line(f"{type(exc).__name__}: {exc}"))
