"""The host's HTTP session: transient server errors are retried, a refusal is not."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from builder import httpclient as http


def serve(answers: list[int]):
    """A real local server answering the codes in ANSWERS in turn (then 200); returns (url, hits, stop)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            code = answers.pop(0) if answers else 200
            body = b"patch body" if code == 200 else b"busy"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/p.patch", hits, server.shutdown


def test_5xx_is_retried_until_the_file_comes():
    url, hits, stop = serve([503, 502])
    try:
        assert http.get(url).content == b"patch body"
        assert len(hits) == 3
    finally:
        stop()


def test_4xx_fails_at_once():
    url, hits, stop = serve([404])
    try:
        with pytest.raises(requests.HTTPError, match="404"):
            http.get(url)
        assert len(hits) == 1
    finally:
        stop()


def test_a_persistent_5xx_gives_up_with_the_status():
    url, hits, stop = serve([500] * 10)
    try:
        with pytest.raises(requests.HTTPError, match="500"):
            http.get(url)
        assert len(hits) == 1 + http.RETRIES.status
    finally:
        stop()


def test_one_session_one_ca_policy(tmp_path, monkeypatch):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not checked here: only which file is chosen\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    assert http.ca_bundle() == str(bundle)
    assert http.session() is http.session()
