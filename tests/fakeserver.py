"""A small OpenAI-compatible server for the smoke tests: the subset stackbuild smoke speaks.

Started as a real subprocess by `stackbuild smoke` (through [smoke] command), so lifecycle,
readiness, crashes and process-tree cleanup are exercised for real. Flags make it misbehave.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fake")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--served-model-name", default="fake")
    p.add_argument("--report-max-model-len", type=int, help="lie about max_model_len in /v1/models")
    p.add_argument("--ready-after", type=float, default=0.0, help="/health answers 503 until then")
    p.add_argument("--never-ready", action="store_true", help="/health never answers 200")
    p.add_argument("--broken-generation", action="store_true", help="/health 200, completions 500")
    p.add_argument("--crash-after", type=int, help="exit(3) on this completion request")
    p.add_argument("--token-delay", type=float, default=0.001)
    p.add_argument("--salt", default="", help="changes every answer, like a different model")
    p.add_argument("--version", default="0.0.fake")
    p.add_argument("--version-field", action="append", default=[], metavar="K=V")
    p.add_argument("--header", action="append", default=[], metavar="K=V")
    p.add_argument("--pidfile")
    p.add_argument("--child", action="store_true", help="spawn a sleeping child in a session of its own")
    p.add_argument("--exit-after", type=float, help="exit(4) after this many seconds")
    return p.parse_args()


ARGS = parse()
STARTED = time.monotonic()
COUNT = {"completions": 0}
LOCK = threading.Lock()


def tokens_for(prompt, n: int) -> list[str]:
    seed = hashlib.sha256((ARGS.salt + json.dumps(prompt)).encode()).digest()
    return [f" w{(seed[i % 32] + i) % 97}" for i in range(n)]


def prompt_len(prompt) -> int:
    if isinstance(prompt, list):
        return len(prompt)
    return max(1, len(str(prompt).split()))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stdout.write("fake: " + fmt % args + "\n")
        sys.stdout.flush()

    def send(self, code: int, body: dict | str, ctype: str = "application/json") -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        for item in ARGS.header:
            k, _, v = item.partition("=")
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            ready = not ARGS.never_ready and time.monotonic() - STARTED >= ARGS.ready_after
            self.send(200 if ready else 503, "" if ready else "starting", "text/plain")
        elif self.path == "/v1/models":
            mml = ARGS.report_max_model_len or ARGS.max_model_len
            self.send(200, {"object": "list", "data": [{"id": ARGS.served_model_name, "object": "model",
                                                         "max_model_len": mml}]})
        elif self.path == "/version":
            body = {"version": ARGS.version}
            for item in ARGS.version_field:
                k, _, v = item.partition("=")
                body[k] = v
            self.send(200, body)
        else:
            self.send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        if self.path == "/tokenize":
            words = str(body.get("prompt", "")).split()
            self.send(200, {"count": len(words), "tokens": [len(w) * 7 % 500 for w in words], "max_model_len": ARGS.max_model_len})
            return
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self.send(404, {"error": "not found"})
            return
        with LOCK:
            COUNT["completions"] += 1
            number = COUNT["completions"]
        if ARGS.crash_after is not None and number >= ARGS.crash_after:
            sys.stdout.write("fake: crashing as told\n")
            sys.stdout.flush()
            os._exit(3)
        if ARGS.broken_generation:
            self.send(500, {"error": "Boolean value of Tensor with more than one value is ambiguous"})
            return
        chat = self.path.endswith("chat/completions")
        prompt = body["messages"] if chat else body["prompt"]
        n = int(body.get("max_tokens", 16))
        toks = tokens_for(prompt, n)
        usage = {"prompt_tokens": prompt_len(prompt), "completion_tokens": n, "total_tokens": prompt_len(prompt) + n}
        if not body.get("stream"):
            time.sleep(ARGS.token_delay * n)
            text = "".join(toks)
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            self.send(200, {"id": "x", "choices": [choice], "usage": usage})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def event(obj) -> None:
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        for i, tok in enumerate(toks):
            time.sleep(ARGS.token_delay)
            finish = "length" if i == n - 1 else None
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": {"content": tok}} if chat else {"text": tok})
            event({"id": "x", "choices": [choice]})
        if (body.get("stream_options") or {}).get("include_usage"):
            event({"id": "x", "choices": [], "usage": usage})
        event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main() -> None:
    child = None
    if ARGS.child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
    if ARGS.pidfile:
        with open(ARGS.pidfile, "w") as f:
            json.dump({"server": os.getpid(), "child": child.pid if child else None}, f)
    if ARGS.exit_after is not None:
        threading.Timer(ARGS.exit_after, lambda: os._exit(4)).start()
    server = ThreadingHTTPServer((ARGS.host, ARGS.port), Handler)
    server.daemon_threads = True
    print(f"fake: listening on {ARGS.host}:{ARGS.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
