"""A crawl of image URLs only, built end to end against a real local HTTP server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from pipelines import build_pairs


@pytest.fixture
def image_server(jpeg_of):
    images = {
        "/a.jpg": jpeg_of("chelsea", (160, 120)),
        "/b.jpg": jpeg_of("coffee", (150, 100)),
        "/c.jpg": jpeg_of("rocket", (140, 110)),
    }
    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path in images:
                self._send(200, images[self.path])
            elif self.path == "/flaky.jpg" and hits[self.path] == 1:
                self._send(500, b"try again")
            elif self.path == "/flaky.jpg":
                self._send(200, images["/c.jpg"] + b"")
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            elif self.path == "/noai.jpg":
                self._send(200, images["/a.jpg"], {"X-Robots-Tag": "noai"})
            elif self.path == "/page.jpg":
                self._send(
                    200, b"<html><body>not an image</body></html>", {"Content-Type": "text/html"}
                )
            else:
                self._send(404, b"nope")

        def _send(self, status, body, headers=None):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_urls_are_fetched_and_every_failure_is_a_reject(image_server, tmp_path):
    base, hits = image_server
    page = "https://shop.example/item/1"
    urls = {
        "a": f"{base}/a.jpg",
        "b": f"{base}/b.jpg",
        "flaky": f"{base}/flaky.jpg",
        "missing": f"{base}/missing.jpg",
        "redirect": f"{base}/to-file",
        "noai": f"{base}/noai.jpg",
        "html": f"{base}/page.jpg",
        "local": "file:///etc/passwd",
        "ftp": "ftp://127.0.0.1/x.jpg",
    }
    crawl = tmp_path / "crawl.jsonl"
    crawl.write_text(
        "".join(json.dumps({"page_url": page, "image_url": url}) + "\n" for url in urls.values())
    )
    manifest = build_pairs.run(
        [
            str(crawl),
            "--out",
            str(tmp_path / "run"),
            "--encoder",
            "tiny",
            "--device",
            "cpu",
            "--fetch-timeout",
            "3",
            "--retries",
            "1",
            "--low",
            "-1",
            "--high",
            "1",
        ]
    ).pairmill_manifest
    counts = manifest["counts"]
    assert manifest["reconciled"] and counts["records_in"] == len(urls)
    assert counts["images"] == 3 and counts["kept_pairs"] == 3
    rejects = {r["image_url"]: r for r in pq.read_table(tmp_path / "run" / "rejects").to_pylist()}
    assert rejects[urls["missing"]]["reason"] == "http_error"
    assert "404" in rejects[urls["missing"]]["detail"]
    assert rejects[urls["redirect"]]["reason"] == "disallowed_url"
    assert rejects[urls["local"]]["reason"] == "disallowed_url"
    assert rejects[urls["ftp"]]["reason"] == "disallowed_url"
    assert rejects[urls["noai"]]["reason"] == "opted_out"
    assert rejects[urls["html"]]["reason"] == "decode_error"
    assert hits["/flaky.jpg"] == 2  # 500, then a successful retry
    assert counts["funnel"]["loaded"] == 4  # a, b, flaky and the HTML page got bytes


def test_no_fetch_rejects_url_only_records(tmp_path):
    crawl = tmp_path / "crawl.jsonl"
    crawl.write_text(json.dumps({"page_url": "https://p.example/", "image_url": "https://x/y.jpg"}))
    manifest = build_pairs.run(
        [str(crawl), "--out", str(tmp_path / "run"), "--encoder", "tiny", "--no-fetch"]
    ).pairmill_manifest
    assert manifest["counts"]["rejects"] == {"no_image_data": 1}
