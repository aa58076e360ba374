"""A real HTTP server on 127.0.0.1 that speaks enough of /v1/chat/completions for tests.

The test decides what each request gets through `respond(body, index) -> action`:
    reply("<answer>0.7</answer>")   a normal completion with that text
    status(500)                     an error status with an OpenAI-style error body
    INVALID_JSON                    200 with a body that is not JSON
    NO_CHOICES                      200 with JSON that is not a completion
    HANG                            never answers (until the server stops)
    DROP                            promises a body, sends part of it and closes the connection
Every request body is recorded, and so is the largest number of requests in flight at once.

    with FakeJudge(fixed_score(0.7), delay_s=0.1) as judge:   # port=0: any free port
        TRMClient(judge.url, "judge") ...
"""
import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

HANG_LIMIT_S = 120  # a hanging handler still ends, so no test can leave a thread behind forever

INVALID_JSON = ("raw", b'{"id": "x", "choices": [')
NO_CHOICES = ("raw", b'{"object": "chat.completion", "note": "no choices here"}')
HANG = ("hang",)
DROP = ("drop",)


def reply(text: str):
    return ("reply", text)


def status(code: int):
    return ("status", code)


def fixed_score(score: float):
    return lambda body, index: reply(f"<answer>{score}</answer>")


def fail_first(k: int, failure, then):
    """The first k requests get `failure`, the rest go to `then(body, index)`."""
    return lambda body, index: failure if index < k else then(body, index)


def request_text(body: dict) -> str:
    """All text parts of the request's messages, joined (to pick a score from the request)."""
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "\n".join(parts)


def request_images(body: dict) -> list[Image.Image]:
    """The images of the request, decoded from their data URLs, in message order."""
    images = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    data = part["image_url"]["url"].split(",", 1)[1]
                    images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return images


class _Server(ThreadingHTTPServer):
    # the default listen backlog (5) can reset a connection when 16+ requests arrive at once on a busy
    # machine: a request the judge never sees, which a test counting requests would take for a client bug
    request_queue_size = 128


class FakeJudge:
    def __init__(self, respond=fixed_score(0.5), delay_s: float = 0.0, port: int = 0):
        self.respond = respond
        self.port = port
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                judge._handle(self)

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._server is None:  # never started
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handle(self, handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self._lock:
            index = len(self.requests)
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in handler.headers.items()})
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay_s:
                self._stop.wait(self.delay_s)
            self._send(handler, self.respond(body, index), body)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _send(self, handler, action, body):
        kind = action[0]
        if kind == "hang":
            self._stop.wait(HANG_LIMIT_S)
            handler.close_connection = True
            return
        if kind == "reply":
            payload = {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": action[1]}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            self._write(handler, 200, json.dumps(payload).encode())
        elif kind == "status":
            code = action[1]
            payload = {"error": {"message": f"fake judge error {code}", "type": "fake", "code": code}}
            self._write(handler, code, json.dumps(payload).encode())
        elif kind == "raw":
            self._write(handler, 200, action[1])
        elif kind == "drop":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            handler.wfile.write(b'{"id": "chatcmpl-fake", "choi')
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise ValueError(f"unknown fake judge action {action!r}")

    @staticmethod
    def _write(handler, code, data):
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
