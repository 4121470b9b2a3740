"""Talking to the server: an OpenAI-compatible HTTP client and its timed completions."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

import requests

from .. import httpclient

# ---------------------------------------------------------------------------------------------
# Talking to the server


@dataclass(frozen=True)
class Completion:
    status: int
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    start: float          # perf_counter when the request was sent
    ttft: float | None    # seconds to the first content
    e2e: float            # seconds to the last byte
    itl: tuple[float, ...]
    headers: Mapping[str, str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class Client:
    def __init__(self, base: str, model: str, timeout: float):
        self.base = base
        self.model = model
        self.timeout = timeout
        self.session = httpclient.local_session()
        # (start, end) of every request, so the harness can tell its own time from the server's.
        self.intervals: list[tuple[float, float]] = []

    def busy(self, since: float = 0.0) -> float:
        """Seconds since `since` during which at least one request was in flight."""
        total, end = 0.0, since
        for a, b in sorted(self.intervals):
            a = max(a, end)
            if b > a:
                total += b - a
                end = b
        return total

    def get(self, path: str, timeout: float | None = None) -> requests.Response:
        start = time.perf_counter()
        try:
            return self.session.get(self.base + path, timeout=timeout or self.timeout)
        finally:
            self.intervals.append((start, time.perf_counter()))

    def post(self, path: str, body: Mapping[str, Any]) -> requests.Response:
        start = time.perf_counter()
        try:
            return self.session.post(self.base + path, json=body, timeout=self.timeout)
        finally:
            self.intervals.append((start, time.perf_counter()))

    def complete(self, prompt: str | list[int], **kw: Any) -> Completion:
        done = self._complete(prompt, **kw)
        self.intervals.append((done.start, done.start + done.e2e))
        return done

    def _complete(self, prompt: str | list[int], *, chat: bool = False, stream: bool = False, max_tokens: int = 16,
                  ignore_eos: bool = False, timeout: float | None = None) -> Completion:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension, as `vllm bench serve` uses it
        if stream:
            body["stream_options"] = {"include_usage": True}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        try:
            # A fresh connection per request: parallel streams must not share a session's pool.
            resp = requests.post(self.base + path, json=body, stream=stream, timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            return Completion(0, "", None, None, None, start, None, time.perf_counter() - start, (), {}, short_error(exc))
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if resp.status_code != 200:
            return Completion(resp.status_code, "", None, None, None, start, None, time.perf_counter() - start, (),
                              headers, f"HTTP {resp.status_code}: {resp.text[:200]}")
        if not stream:
            try:
                data = resp.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                usage = data.get("usage") or {}
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return Completion(200, "", None, None, None, start, None, time.perf_counter() - start, (), headers,
                                  f"malformed response: {exc!r}")
            end = time.perf_counter()
            return Completion(200, text or "", usage.get("prompt_tokens"), usage.get("completion_tokens"),
                              choice.get("finish_reason"), start, end - start, end - start, (), headers)
        return _read_stream(resp, chat, start, headers)


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _read_stream(resp: requests.Response, chat: bool, start: float, headers: Mapping[str, str]) -> Completion:
    parts: list[str] = []
    stamps: list[float] = []
    usage: Mapping = {}
    finish = None
    try:
        for line in resp.iter_lines(chunk_size=None):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            usage = chunk.get("usage") or usage
            choices = chunk.get("choices") or []
            for choice in choices:
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                parts.append(piece or "")
                finish = choice.get("finish_reason") or finish
            # A token whose bytes do not yet form a character arrives with empty text: it still counts.
            if choices and not (chat and all("role" in (c.get("delta") or {}) and not (c.get("delta") or {}).get("content")
                                             for c in choices)):
                stamps.append(time.perf_counter())
    except (requests.RequestException, ValueError) as exc:
        return Completion(200, "".join(parts), None, None, finish, start, None, time.perf_counter() - start, (),
                          headers, f"stream broke: {short_error(exc)}")
    end = time.perf_counter()
    ttft = stamps[0] - start if stamps else None
    itl = tuple(b - a for a, b in zip(stamps, stamps[1:]))
    return Completion(200, "".join(parts), usage.get("prompt_tokens"), usage.get("completion_tokens"), finish,
                      start, ttft, end - start, itl, headers)
