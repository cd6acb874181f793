"""The HTTP layer (standard library only): routes, API key, body limits, JSON and SSE answers.

``Server`` wires the parts together: an AdapterSet loaded once, the AdapterRegistry watching the
adapters directory, the Batcher thread that owns the model, and a ThreadingHTTPServer whose
handler threads validate requests, queue jobs and relay their events to the client.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch

from tuneforge.adapters.manager import AdapterSet
from tuneforge.errors import ConfigError
from tuneforge.log import get_logger
from tuneforge.serve.batcher import DONE, ERROR, TEXT, Batcher, Job
from tuneforge.serve.logprobs import TokenBytes, chat_logprobs, completion_logprobs
from tuneforge.serve.prepare import check_tools, make_jobs
from tuneforge.serve.protocol import (
    Answer,
    APIError,
    ParsedRequest,
    bad_request,
    chunk_body,
    completion_body,
    model_card,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
    usage,
    usage_chunk,
)
from tuneforge.serve.registry import AdapterRegistry
from tuneforge.serve.tools import parse_calls

log = logging.getLogger("tuneforge.serve")

logger = get_logger(__name__)
DRAIN_FACTOR = 16  # an oversized body up to 16× the limit is read and dropped, so the client sees the 413
POLL_S = 0.25  # how often a request waiting for tokens checks that its client is still connected


@dataclass
class ServeOptions:
    """Everything ``tuneforge serve`` takes."""

    model: str
    adapters: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_tokens_limit: int = 512
    max_body_bytes: int = 1 << 20
    max_queue: int = 256  # prompts waiting for the model; beyond it new requests get 429
    batch_wait_ms: float = 5.0
    scan_interval_s: float = 2.0
    read_timeout_s: float = 30.0  # to send a whole request, to read an answer, and for an idle connection
    dtype: str = "float32"
    device: str = "cpu"

    def validate(self) -> None:
        checks = {"max_batch": self.max_batch >= 1, "max_tokens_limit": self.max_tokens_limit >= 1,
                  "max_body_bytes": self.max_body_bytes >= 1024,
                  "max_queue": self.max_queue >= 1, "port": 0 <= self.port <= 65535,
                  "batch_wait_ms": self.batch_wait_ms >= 0, "scan_interval_s": self.scan_interval_s >= 0,
                  "read_timeout_s": self.read_timeout_s > 0,
                  "dtype": self.dtype in ("float32", "bfloat16", "float16")}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"serve option {bad[0]}={getattr(self, bad[0])!r} is out of range")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key (--api-key, serve.api_key or $TUNEFORGE_API_KEY) is empty, which would "
                              "let anyone in; give a non-empty key, or leave it unset to serve without one")
        if not Path(self.adapters).is_dir():  # checked before the model loads, so the mistake shows at once
            raise ConfigError(f"adapters directory {self.adapters} does not exist; create it (it may be empty) "
                              "or pass --adapters DIR")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of concurrent clients must not be refused at accept time
    app: Server


class Server:
    """A running server: HTTP threads, the batcher thread and the adapter registry."""

    def __init__(self, options: ServeOptions, adapter_set: AdapterSet | None = None) -> None:
        options.validate()
        self.options = options
        self.adapter_set = adapter_set or AdapterSet.from_pretrained(
            options.model, dtype=getattr(torch, options.dtype), device=options.device)
        self.registry = AdapterRegistry(self.adapter_set, options.adapters, base_id=options.model)
        self.registry.sync()
        self.batcher = Batcher(self.adapter_set, options.max_batch, options.batch_wait_ms / 1000)
        self.token_bytes = TokenBytes(self.adapter_set.tokenizer)
        self.created = int(time.time())
        server_class = _HTTPServer
        if ":" in options.host:
            server_class = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6})
        try:
            self.httpd = server_class((options.host, options.port), Handler)
        except OSError as e:
            raise ConfigError(f"cannot listen on {options.host}:{options.port} ({e}); pick another --port "
                              "or stop the program using it") from e
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"http://{host}:{self.port}"

    def start(self) -> Server:
        """Serve in background threads (tests, benchmarks); ``close`` stops everything."""
        self.batcher.start()
        self.registry.start(self.options.scan_interval_s)
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), name="tuneforge-http",
                                        daemon=True)  # poll 0.1 s: close() returns quickly
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until the HTTP thread ends (Ctrl-C interrupts the wait)."""
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.registry.close()
        if self.batcher.alive:
            self.batcher.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(options: ServeOptions) -> None:
    """Load the base model and adapters, serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = Server(options)
    if not is_loopback(options.host) and not options.api_key:
        logger.warning(f"serving on {options.host} without an API key; anyone who can reach it can use it "
                       "(pass --api-key or bind to 127.0.0.1)")
    logger.info(f"serving {', '.join(server.registry.model_ids())} at {server.url}/v1 (Ctrl-C stops)")
    server.start()
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


class DeadlineReader(io.RawIOBase):
    """The socket's input; while ``deadline`` is set, a read past it raises TimeoutError.

    A per-read socket timeout alone lets a client that sends one byte every few seconds hold a
    thread forever; the deadline bounds the whole request.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took longer than the read timeout")
            self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection; the OpenAI routes."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    server_version = "tuneforge"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """Wait for a request (idle up to the read timeout), then give all of it the read timeout to arrive."""
        timeout = self.app.options.read_timeout_s
        self.reader.deadline = None
        self.connection.settimeout(timeout)
        try:
            if not self.rfile.peek(1):  # the client closed the connection
                self.close_connection = True
                return
        except OSError:  # idle for too long, or reset
            self.close_connection = True
            return
        self.reader.deadline = time.monotonic() + timeout
        super().handle_one_request()  # a request line or headers arriving too late: TimeoutError, closed

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)

    @property
    def app(self) -> Server:
        return self.server.app

    def _handle(self, method: str) -> None:
        has_body = self.headers.get("Content-Length", "0") not in ("", "0") or "Transfer-Encoding" in self.headers
        self._body_read, self._streaming = not has_body, False
        # The body keeps the request's deadline (see _read_body); answers get the plain timeout per send.
        self._deadline, self.reader.deadline = self.reader.deadline, None
        self.connection.settimeout(self.app.options.read_timeout_s)
        try:
            path = urlsplit(self.path).path.rstrip("/")
            if path == "/health":
                self._json(200, {"status": "ok"})
                return
            self._authorize()
            self._route(method, path)
        except APIError as e:
            self._json(e.status, e.body())
        except (ConnectionError, TimeoutError):  # the client went away, or stopped reading the answer
            self.close_connection = True
        except Exception as e:
            log.exception("request failed")
            if self._streaming:  # headers are sent: all that is left is to hang up
                self.close_connection = True
                return
            self._json(500, APIError(500, f"internal error: {e}", "server_error").body(), close=True)

    def _route(self, method: str, path: str) -> None:
        routes = {"/v1/models": self._models, "/v1/chat/completions": lambda: self._complete(chat=True),
                  "/v1/completions": lambda: self._complete(chat=False)}
        want = "GET" if path.startswith("/v1/models") else "POST"
        if path not in routes and not path.startswith("/v1/models/"):
            raise APIError(404, f"no route {method} {path}; this server has GET /v1/models, "
                                "POST /v1/chat/completions and POST /v1/completions", code="not_found")
        if method != want:
            raise APIError(405, f"use {want} for {path}", code="method_not_allowed")
        if path in routes:
            routes[path]()
        else:
            self._model(unquote(path[len("/v1/models/"):]))

    def _authorize(self) -> None:
        key = self.app.options.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):  # constant time
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "send the body with a Content-Length header (chunked bodies are not accepted)")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(411, "send a Content-Length header") from None
        limit = self.app.options.max_body_bytes
        if n < 0:
            raise bad_request("Content-Length is negative")
        self.reader.deadline = self._deadline
        try:
            if n > limit:
                if n <= DRAIN_FACTOR * limit:
                    self._drain(n)
                raise APIError(413, f"the request body has {n} bytes; this server accepts at most {limit}",
                               code="request_too_large")
            body = self.rfile.read(n)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.app.options.read_timeout_s:g} s "
                                f"(Content-Length: {n})", code="request_timeout") from None
        finally:
            self.reader.deadline = None
            self.connection.settimeout(self.app.options.read_timeout_s)
        if len(body) < n:
            raise bad_request(f"the request body ended after {len(body)} of the {n} bytes its Content-Length "
                              "announced")
        self._body_read = True
        return body

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                return
            n -= len(chunk)

    def _json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if close or not self._body_read:  # an unread body would otherwise be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _models(self) -> None:
        reg = self.app.registry
        reg.sync()  # a GET /v1/models shows what is in the directory now
        cards = [model_card(reg.base_id, None, self.app.created)]
        cards += [model_card(name, reg.base_id, self.app.created) for name in reg.adapters]
        failed = [{"id": name, "error": error} for name, error in reg.errors.items()]
        self._json(200, {"object": "list", "data": cards, "failed": failed})

    def _model(self, model_id: str) -> None:
        adapter = self.app.registry.lookup(model_id)
        self._json(200, model_card(model_id, None if adapter is None else self.app.registry.base_id,
                                   self.app.created))

    def _complete(self, chat: bool) -> None:
        limit = self.app.options.max_tokens_limit
        body = parse_json(self._read_body())
        req = parse_chat(body, limit) if chat else parse_completion(body, limit)
        check_tools(req, self.app.batcher)
        with self.app.registry.lease(req.model) as adapter:  # this version stays loaded until the answer is sent
            self._run(req, adapter)

    def _run(self, req: ParsedRequest, adapter: str | None) -> None:
        tools = None if req.tools is None else req.tools.schemas()
        ids = [self._encode(p, req.sampling.max_tokens, tools) for p in req.prompts]
        sink: queue.Queue = queue.Queue()
        jobs = make_jobs(req, ids, adapter, sink, self.app.batcher)
        if self.app.batcher.pending + len(jobs) > self.app.options.max_queue:
            raise APIError(429, f"the server is busy ({self.app.batcher.pending} prompts queued); retry shortly",
                           "server_error", code="server_busy")
        self.app.batcher.submit(jobs)
        try:
            events = self._events(jobs)
            first = next(events)  # errors found before any token still get a proper HTTP status
            if req.stream:
                self._stream(req, first, events, sum(map(len, ids)))
            else:
                self._answer(req, first, events, sum(map(len, ids)))
        finally:
            for job in jobs:  # the batcher drops rows nobody waits for any more
                job.cancelled.set()

    def _encode(self, prompt, max_tokens: int, tools: list[dict] | None) -> list[int]:
        try:
            ids = self.app.batcher.encode(prompt, tools)
        except Exception as e:  # a chat template may reject a conversation (e.g. roles out of order)
            raise bad_request(f"cannot encode the prompt: {e}") from e
        if not ids:
            raise bad_request("the prompt is empty", "prompt")
        context = self.app.batcher.context
        if context and len(ids) + max_tokens > context:
            raise bad_request(f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds "
                              f"the model's context of {context} tokens", "max_tokens")
        return ids

    def _events(self, jobs: list[Job]):
        """(index, kind, payload) events until every job is done; an error event raises."""
        open_jobs = len(jobs)
        while open_jobs:
            try:
                event = jobs[0].sink.get(timeout=POLL_S)
            except queue.Empty:
                if not self.app.batcher.alive:
                    raise APIError(503, "the server is shutting down", "server_error") from None
                if self._client_gone():  # the caller's finally cancels the jobs
                    raise ConnectionAbortedError("the client disconnected") from None
                continue
            if event[1] == ERROR:
                raise event[2]
            open_jobs -= event[1] == DONE
            yield event

    def _client_gone(self) -> bool:
        """Whether the client closed or reset its connection (a pipelined next request is not that)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def _answer(self, req: ParsedRequest, first, events, prompt_tokens: int) -> None:
        answers = [Answer() for _ in range(len(req.prompts) * req.n)]
        picks: list[list] = [[] for _ in answers]
        completion = 0
        for index, kind, payload in _chain(first, events):
            if kind == TEXT:
                answers[index].text += payload[0]
                picks[index] += payload[1]
            elif kind == DONE:
                answers[index].finish, count = payload
                completion += count
        for answer, chosen in zip(answers, picks, strict=True):
            if req.logprobs:
                answer.logprobs = self._logprobs(req, chosen)[0]
            if req.tools is not None:
                self._tool_calls(req, answer)
        self._json(200, completion_body(req, new_id(req.chat), answers, usage(prompt_tokens, completion)))

    def _logprobs(self, req: ParsedRequest, chosen: list, before: bytes = b"") -> tuple[dict, bytes]:
        """The endpoint's logprobs object for ``chosen`` and the answer's bytes after them (see completion_logprobs)."""
        if req.chat:
            return chat_logprobs(chosen, self.app.token_bytes), b""
        return completion_logprobs(chosen, self.app.token_bytes, before)

    @staticmethod
    def _tool_calls(req: ParsedRequest, answer: Answer) -> None:
        content, calls = parse_calls(answer.text, req.tools)
        if calls:
            answer.text, answer.tool_calls, answer.finish = content or "", calls, "tool_calls"

    def _stream(self, req: ParsedRequest, first, events, prompt_tokens: int) -> None:
        """Server-sent events; an answer that may hold tool calls is sent whole when it ends (it is parsed first)."""
        rid, completion = new_id(req.chat), 0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        rows = len(req.prompts) * req.n
        if req.chat:
            for index in range(rows):
                self._sse(chunk_body(req, rid, index, None, first=True))
        held = [Answer() for _ in range(rows)]
        picks: list[list] = [[] for _ in range(rows)]
        sent = [b""] * rows  # each choice's bytes so far, for the legacy text_offset
        try:
            for index, kind, payload in _chain(first, events):
                if kind == TEXT and req.tools is not None:
                    held[index].text += payload[0]
                    picks[index] += payload[1]
                elif kind == TEXT:
                    text, chosen = payload
                    logprobs = None
                    if req.logprobs:
                        logprobs, sent[index] = self._logprobs(req, chosen, sent[index])
                    self._sse(chunk_body(req, rid, index, text, logprobs=logprobs))
                elif kind == DONE:
                    finish, count = payload
                    completion += count
                    if req.tools is not None:
                        answer = held[index]
                        answer.finish = finish
                        self._tool_calls(req, answer)
                        finish = answer.finish
                        logprobs = self._logprobs(req, picks[index])[0] if req.logprobs else None
                        self._sse(chunk_body(req, rid, index, answer.text, logprobs=logprobs,
                                             tool_calls=answer.tool_calls))
                    self._sse(chunk_body(req, rid, index, None, finish))
        except APIError as e:  # the status line is gone: report in-band, as OpenAI does
            self._sse(e.body())
        if req.include_usage:
            self._sse(usage_chunk(req, rid, usage(prompt_tokens, completion)))
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _sse(self, obj: dict) -> None:
        self._write_chunk(f"data: {json.dumps(obj)}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _chain(first, rest):
    yield first
    yield from rest
