"""HTTP fetching against real local servers (127.0.0.1, free ports, started here)."""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pairmill import __version__
from pairmill.errors import ConfigError
from pairmill.fetch import (
    FetchConfig,
    Fetcher,
    check_url,
    fetch_one,
    host_key,
    make_session,
    opted_out,
    retry_after_seconds,
)
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

# short timeouts keep the file fast; backoff small so retries cost little
FAST = FetchConfig(timeout=0.5, retries=1, backoff=0.02, max_retry_after=5.0)


# ------------------------------------------------------------------ test server


class Gauge:
    """Requests in flight now and at most, shared by servers to count a group."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self):
        with self.lock:
            self.now -= 1


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients hang up on purpose
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        app: Server = self.server.app
        with app.lock:
            app.hits[self.path] += 1
            app.user_agents.append(self.headers.get("User-Agent"))
            app.connections.add(self.client_address)
        route = app.routes.get(self.path)
        self._gauges = [g for g in (app.gauge, app.group) if g is not None]
        for gauge in self._gauges:
            gauge.enter()
        try:
            if route is None:
                respond(self, 404, b"not found")
            else:
                route(self)
        except OSError:  # the client went away (a cut body, a timeout)
            self.close_connection = True
        finally:
            self.stop_counting()

    def stop_counting(self):
        """Leave the in-flight gauges once. `respond` calls this before sending: a client
        that has read the whole body may start its next request before this handler
        thread returns, and counting until then would see more in flight than there are."""
        for gauge in self._gauges:
            gauge.leave()
        self._gauges = []


class Server:
    """A scripted HTTP server on 127.0.0.1 with a free port, in a background thread."""

    def __init__(self, group: Gauge | None = None):
        self.routes = {}
        self.hits = Counter()
        self.user_agents = []
        self.connections = set()
        self.lock = threading.Lock()
        self.gauge = Gauge()
        self.group = group
        self.stopping = threading.Event()
        self.httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.app = self
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def respond(handler, status=200, body=b"", headers=()):
    handler.stop_counting()
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def static(status=200, body=b"", headers=()):
    return lambda handler: respond(handler, status, body, headers)


def sequence(*routes):
    """A route answering with each route in turn, then the last one for ever."""
    calls = iter(routes)
    last = [routes[-1]]

    def route(handler):
        step = next(calls, None)
        if step is not None:
            last[0] = step
        last[0](handler)

    return route


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def session():
    sess = make_session(FAST)
    yield sess
    sess.close()


@pytest.fixture(scope="module")
def jpeg(jpeg_of):
    return jpeg_of("astronaut", (64, 48))


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def rejected(result, reason: str) -> Rejection:
    assert isinstance(result, Rejection), f"expected {reason}, got {len(result)} bytes"
    assert result.reason == reason, result
    assert "\n" not in result.detail
    return result


# ----------------------------------------------------------------- config, URLs


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"timeout": 0}, "--fetch-timeout"),
        ({"timeout": float("inf")}, "--fetch-timeout"),
        ({"max_bytes": 0}, "--max-image-bytes"),
        ({"retries": -1}, "--retries"),
        ({"retries": 1.5}, "--retries"),
        ({"backoff": -0.1}, "--retry-backoff"),
        ({"max_retry_after": -1}, "--max-retry-after"),
        ({"per_host": 0}, "--fetch-per-host"),
        ({"concurrency": 0}, "--fetch-concurrency"),
        ({"user_agent": "bad\r\nX-Injected: 1"}, "--user-agent"),
    ],
)
def test_config_is_validated(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        FetchConfig(**kwargs)


def test_default_user_agent_names_pairmill():
    config = FetchConfig()
    assert config.user_agent.startswith(f"pairmill/{__version__} ")
    assert "pairmill" in config.agent_names


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        None,
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "ftp://example.com/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "/images/a.jpg",
        "images/a.jpg",
        "//example.com/a.jpg",
        "C:\\images\\a.jpg",
        "http://",
        "http:///etc/passwd",
        "http://[::1",
        "http://example.com:99999/a.jpg",
        "http://exa\nmple.com/a.jpg",
    ],
)
def test_check_url_refuses(url):
    assert rejected(check_url(url), DISALLOWED_URL)


@pytest.mark.parametrize(
    "url",
    ["http://example.com/a.jpg", "HTTPS://Example.com:8443/a.jpg?x=1", " http://[::1]/a.jpg "],
)
def test_check_url_accepts(url):
    assert check_url(url) is None


def test_host_key():
    assert host_key("http://Example.com/a") == "example.com:80"
    assert host_key("https://example.com/a") == "example.com:443"
    assert host_key("http://127.0.0.1:8080/a") == "127.0.0.1:8080"
    assert host_key("http://[::1]:81/a") == "[::1]:81"


def test_fetch_one_disallowed_without_request(server, session):
    rejected(fetch_one(session, "file:///etc/passwd", FAST), DISALLOWED_URL)
    rejected(fetch_one(session, "", FAST), DISALLOWED_URL)
    assert sum(server.hits.values()) == 0


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("-5") == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    assert 115 <= retry_after_seconds(future) <= 121
    for value in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(value) is None


@pytest.mark.parametrize(
    ("values", "out"),
    [
        (["noai"], True),
        (["NoImageAI"], True),
        (["noindex, noai"], True),
        (["pairmill: noai"], True),
        (["otherbot: none, pairmill: noimageai"], True),
        (["PairMill: NOAI"], True),
        (["*: noai"], True),
        (["googlebot: noindex", "noai"], True),
        (["noai, otherbot: none"], True),
        (["otherbot: noai"], False),
        (["otherbot: none, noai"], False),  # the bare noai still belongs to otherbot
        (["noindex, nofollow"], False),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
        (["max-image-preview: none"], False),
        ([], False),
    ],
)
def test_opted_out_parsing(values, out):
    assert opted_out(values, {"pairmill"}) is out


# ------------------------------------------------------------- fetch_one paths


def test_image_200_and_user_agent(server, session, jpeg):
    server.routes["/a.jpg"] = static(200, jpeg, [("Content-Type", "image/jpeg")])
    assert fetch_one(session, server.url("/a.jpg"), FAST) == jpeg
    assert server.user_agents[0].startswith(f"pairmill/{__version__}")


def test_connections_are_reused(server, session, jpeg):
    for i in range(5):
        server.routes[f"/{i}.jpg"] = static(200, jpeg)
    for i in range(5):
        assert fetch_one(session, server.url(f"/{i}.jpg"), FAST) == jpeg
    assert len(server.connections) == 1


def test_404_is_http_error_without_retry(server, session):
    result = fetch_one(session, server.url("/missing.jpg"), FAST)
    assert rejected(result, HTTP_ERROR).detail == "HTTP 404"
    assert server.hits["/missing.jpg"] == 1


def test_500_then_200_is_retried(server, session, jpeg):
    server.routes["/flaky.jpg"] = sequence(static(500, b"oops"), static(200, jpeg))
    assert fetch_one(session, server.url("/flaky.jpg"), FAST) == jpeg
    assert server.hits["/flaky.jpg"] == 2


def test_429_retry_after_is_honoured(server, session, jpeg):
    server.routes["/busy.jpg"] = sequence(
        static(429, b"slow down", [("Retry-After", "1")]), static(200, jpeg)
    )
    result, elapsed = timed(fetch_one, session, server.url("/busy.jpg"), FAST)
    assert result == jpeg
    assert server.hits["/busy.jpg"] == 2
    assert 0.95 <= elapsed < 3.0


def test_429_forever_gives_up_after_retries(server, session):
    server.routes["/banned.jpg"] = static(429, b"no")
    config = FetchConfig(timeout=0.5, retries=2, backoff=0.02)
    result, elapsed = timed(fetch_one, session, server.url("/banned.jpg"), config)
    assert rejected(result, HTTP_ERROR).detail == "HTTP 429 after 3 attempts"
    assert server.hits["/banned.jpg"] == 3
    assert elapsed < 2.0


def test_retry_after_above_cap_gives_up_at_once(server, session):
    server.routes["/later.jpg"] = static(503, b"", [("Retry-After", "3600")])
    config = FetchConfig(timeout=0.5, retries=3, backoff=0.02, max_retry_after=2)
    result, elapsed = timed(fetch_one, session, server.url("/later.jpg"), config)
    detail = rejected(result, HTTP_ERROR).detail
    assert detail.startswith("HTTP 503") and "--max-retry-after" in detail
    assert server.hits["/later.jpg"] == 1
    assert elapsed < 1.0


def test_slow_response_times_out(server, session):
    def slow(handler):
        server.stopping.wait(3.0)
        respond(handler, 200, b"late")

    server.routes["/slow.jpg"] = slow
    result, elapsed = timed(fetch_one, session, server.url("/slow.jpg"), FAST)
    rejected(result, TIMEOUT)
    assert server.hits["/slow.jpg"] == 2  # retried once
    assert elapsed < FAST.timeout * 2 + 1.0


def test_slow_drip_body_times_out(server, session):
    def drip(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        for _ in range(100000):  # one byte every 20 ms: a socket read timeout never fires
            if server.stopping.wait(0.02):
                return
            handler.wfile.write(b"x")

    server.routes["/drip.jpg"] = drip
    result, elapsed = timed(fetch_one, session, server.url("/drip.jpg"), FAST)
    assert "within" in rejected(result, TIMEOUT).detail
    assert elapsed < FAST.timeout * (FAST.retries + 1) + 1.0


def test_slow_drip_headers_time_out(server, session):
    def drip_headers(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        for _ in range(100000):  # a header line that never ends
            if server.stopping.wait(0.02):
                return
            handler.wfile.write(b"x")

    server.routes["/headers.jpg"] = drip_headers
    result, elapsed = timed(fetch_one, session, server.url("/headers.jpg"), FAST)
    rejected(result, TIMEOUT)
    assert elapsed < FAST.timeout * (FAST.retries + 1) + 1.0


def test_connection_refused_is_fetch_error(session):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = fetch_one(session, f"http://127.0.0.1:{port}/a.jpg", FAST)
    detail = rejected(result, FETCH_ERROR).detail
    assert "Connection refused" in detail and detail.endswith("after 2 attempts")


def test_redirect_to_image(server, session, jpeg):
    server.routes["/old.jpg"] = static(302, b"", [("Location", "/new.jpg")])
    server.routes["/new.jpg"] = static(200, jpeg)
    assert fetch_one(session, server.url("/old.jpg"), FAST) == jpeg
    assert server.hits["/new.jpg"] == 1


class RecordingSession:
    """Wraps a session and records every URL it is asked to get."""

    def __init__(self, inner):
        self.inner = inner
        self.urls = []

    def get(self, url, **kwargs):
        self.urls.append(url)
        return self.inner.get(url, **kwargs)


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "javascript:alert(1)"]
)
def test_redirect_to_other_scheme_is_disallowed(server, session, location):
    server.routes["/evil.jpg"] = static(302, b"", [("Location", location)])
    recording = RecordingSession(session)
    result = fetch_one(recording, server.url("/evil.jpg"), FAST)
    assert location[:10] in rejected(result, DISALLOWED_URL).detail
    assert recording.urls == [server.url("/evil.jpg")]  # the target was never requested


def test_redirect_loop_and_limit(server, session, jpeg):
    server.routes["/loop.jpg"] = static(301, b"", [("Location", "/loop.jpg")])
    result = fetch_one(session, server.url("/loop.jpg"), FAST)
    assert "too many redirects" in rejected(result, FETCH_ERROR).detail
    assert server.hits["/loop.jpg"] == 6  # the first request and 5 redirects, no retry
    for n in range(1, 7):
        server.routes[f"/chain{n}"] = static(307, b"", [("Location", f"/chain{n - 1}")])
    server.routes["/chain0"] = static(200, jpeg)
    assert fetch_one(session, server.url("/chain5"), FAST) == jpeg  # 5 hops: fine
    rejected(fetch_one(session, server.url("/chain6"), FAST), FETCH_ERROR)


def test_oversize_stream_is_cut_early(server, session):
    total = 128 * 2**20
    sent = {}
    finished = threading.Event()

    def huge(handler):
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        count = 0
        block = b"\xff" * 65536
        try:
            while count < total:
                handler.wfile.write(block)
                count += len(block)
        except OSError:
            pass
        finally:
            sent["bytes"] = count
            finished.set()

    server.routes["/huge.jpg"] = huge
    config = FetchConfig(timeout=5.0, retries=0, max_bytes=256 * 1024)
    result = fetch_one(session, server.url("/huge.jpg"), config)
    assert "streamed" in rejected(result, FILE_TOO_LARGE).detail
    assert finished.wait(5.0)
    assert sent["bytes"] < total // 4, sent  # the connection was cut, not read to the end


def test_oversize_content_length_is_refused_before_reading(server, session):
    def announced(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(2**30))
        handler.end_headers()
        handler.wfile.write(b"\xff" * 1024)
        server.stopping.wait(3.0)

    server.routes["/big.jpg"] = announced
    config = FetchConfig(timeout=2.0, retries=0, max_bytes=2**20)
    result, elapsed = timed(fetch_one, session, server.url("/big.jpg"), config)
    assert "Content-Length" in rejected(result, FILE_TOO_LARGE).detail
    assert elapsed < 1.0


def test_empty_body(server, session):
    server.routes["/empty.jpg"] = static(200, b"")
    server.routes["/none.jpg"] = static(204, b"")
    rejected(fetch_one(session, server.url("/empty.jpg"), FAST), EMPTY)
    rejected(fetch_one(session, server.url("/none.jpg"), FAST), EMPTY)


def test_html_served_as_jpg_is_returned_for_decoding_to_reject(server, session):
    page = b"<!doctype html><html><body>Not an image</body></html>"
    server.routes["/fake.jpg"] = static(200, page, [("Content-Type", "text/html")])
    assert fetch_one(session, server.url("/fake.jpg"), FAST) == page


@pytest.mark.parametrize(
    "header", ["noai", "NoImageAI", "otherbot: none, pairmill: noimageai", "noindex, noai"]
)
def test_x_robots_tag_opts_out(server, session, jpeg, header):
    server.routes["/private.jpg"] = static(200, jpeg, [("X-Robots-Tag", header)])
    result = fetch_one(session, server.url("/private.jpg"), FAST)
    assert header in rejected(result, OPTED_OUT).detail


def test_x_robots_tag_other_lines_and_agents(server, session, jpeg):
    server.routes["/two.jpg"] = static(
        200, jpeg, [("X-Robots-Tag", "googlebot: noindex"), ("X-Robots-Tag", "noai")]
    )
    server.routes["/other.jpg"] = static(200, jpeg, [("X-Robots-Tag", "otherbot: noai")])
    rejected(fetch_one(session, server.url("/two.jpg"), FAST), OPTED_OUT)
    assert fetch_one(session, server.url("/other.jpg"), FAST) == jpeg
    ignore = FetchConfig(timeout=0.5, respect_opt_out=False)
    assert fetch_one(session, server.url("/two.jpg"), ignore) == jpeg


def test_compressed_body_is_decoded_and_bounded(server, session, jpeg):
    bomb = gzip.compress(b"\0" * (8 * 2**20))  # 8 MiB of zeros in a few KiB
    server.routes["/gz.jpg"] = static(200, gzip.compress(jpeg), [("Content-Encoding", "gzip")])
    server.routes["/bomb.jpg"] = static(200, bomb, [("Content-Encoding", "gzip")])
    assert fetch_one(session, server.url("/gz.jpg"), FAST) == jpeg
    config = FetchConfig(timeout=2.0, retries=0, max_bytes=2**20)
    rejected(fetch_one(session, server.url("/bomb.jpg"), config), FILE_TOO_LARGE)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_image_drip_and_certificate_errors(tls_files, jpeg):
    cert, key = tls_files
    srv = Server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv.httpd.socket = context.wrap_socket(srv.httpd.socket, server_side=True)

    def drip_headers(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        for _ in range(100000):
            if srv.stopping.wait(0.02):
                return
            handler.wfile.write(b"x")

    srv.routes["/a.jpg"] = static(200, jpeg)
    srv.routes["/drip.jpg"] = drip_headers
    base = f"https://127.0.0.1:{srv.port}"
    try:
        with make_session(FAST) as sess:
            # an untrusted certificate is a fetch_error, and is not retried
            result = fetch_one(sess, base + "/a.jpg", FAST)
            assert "CERTIFICATE_VERIFY_FAILED" in rejected(result, FETCH_ERROR).detail
            assert srv.hits["/a.jpg"] == 0
        with make_session(FAST) as sess:
            sess.trust_env = False  # else REQUESTS_CA_BUNDLE would override verify
            sess.verify = str(cert)
            assert fetch_one(sess, base + "/a.jpg", FAST) == jpeg
            result, elapsed = timed(fetch_one, sess, base + "/drip.jpg", FAST)
            rejected(result, TIMEOUT)
            assert elapsed < FAST.timeout * (FAST.retries + 1) + 1.0
    finally:
        srv.close()


# ------------------------------------------------------------------- Fetcher


def test_fetcher_many_hosts_limits_and_slow_host(jpeg):
    group = Gauge()
    servers = [Server(group) for _ in range(3)]
    slow, fast1, fast2 = servers
    try:
        delays = {slow: 0.5, fast1: 0.04, fast2: 0.04}
        counts = {slow: 8, fast1: 21, fast2: 21}
        items = []
        for srv in servers:

            def route(handler, delay=delays[srv], srv=srv):
                srv.stopping.wait(delay)
                respond(handler, 200, jpeg)

            for i in range(counts[srv]):
                srv.routes[f"/img{i}.jpg"] = route
                items.append(((srv.port, i), srv.url(f"/img{i}.jpg")))
        items.append((("bad", 0), "ftp://127.0.0.1/x.jpg"))
        items.append((("bad", 1), ""))
        # interleave so the slow host's URLs come first and mixed with the others
        items.sort(key=lambda item: (item[0][1], item[0][0] != slow.port))

        config = FetchConfig(timeout=2.0, retries=0, per_host=2, concurrency=5)
        finished_at = {}
        results = {}
        start = time.monotonic()
        with Fetcher(config) as fetcher:
            for key, result in fetcher.fetch(iter(items)):
                assert key not in results, f"{key} yielded twice"
                results[key] = result
                finished_at[key] = time.monotonic() - start
        total = time.monotonic() - start

        assert set(results) == {key for key, _ in items}
        assert len(results) == 52
        for key, result in results.items():
            if key[0] == "bad":
                rejected(result, DISALLOWED_URL)
            else:
                assert result == jpeg
        for srv in servers:
            assert srv.gauge.peak <= config.per_host
            assert sum(srv.hits.values()) == counts[srv]
        assert group.peak <= config.concurrency
        assert slow.gauge.peak == config.per_host  # the limit is actually used

        slow_time = counts[slow] / config.per_host * delays[slow]  # 2.0 s
        fast_done = max(t for k, t in finished_at.items() if k[0] in (fast1.port, fast2.port))
        assert fast_done < slow_time * 0.6, (fast_done, total)  # never waited on the slow host
        assert slow_time * 0.95 <= total < slow_time + 1.0
        assert fetcher.stats.snapshot()["requests"] == 50
    finally:
        for srv in servers:
            srv.close()


def test_fetcher_429_throttles_the_host(server, jpeg):
    # /t0 gets 429 + Retry-After: 1; /t2 and /t3, started later, must wait for it too
    server.routes["/t0.jpg"] = sequence(static(429, b"", [("Retry-After", "1")]), static(200, jpeg))

    def busy(handler):
        server.stopping.wait(0.2)
        respond(handler, 200, jpeg)

    times = []

    def later(handler):
        times.append(time.monotonic())
        respond(handler, 200, jpeg)

    server.routes["/t1.jpg"] = busy
    server.routes["/t2.jpg"] = server.routes["/t3.jpg"] = later
    config = FetchConfig(timeout=2.0, retries=1, backoff=0.02, per_host=2, concurrency=4)
    start = time.monotonic()
    with Fetcher(config) as fetcher:
        results = dict(fetcher.fetch((i, server.url(f"/t{i}.jpg")) for i in range(4)))
    assert all(results[i] == jpeg for i in range(4))
    assert len(times) == 2
    assert min(times) - start >= 0.95  # without the throttle /t2 would come at 0.2 s
    stats = fetcher.stats.snapshot()
    assert stats["retry_after"] == 1 and stats["throttled"] >= 1


def test_fetcher_close_and_empty_input(server, jpeg):
    fetcher = Fetcher(FAST)
    assert list(fetcher.fetch([])) == []
    server.routes["/x.jpg"] = static(200, jpeg)
    assert list(fetcher.fetch([("k", server.url("/x.jpg"))])) == [("k", jpeg)]
    fetcher.close()
    fetcher.close()
    with pytest.raises(RuntimeError):
        list(fetcher.fetch([("k", server.url("/x.jpg"))]))
