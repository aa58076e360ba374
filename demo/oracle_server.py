"""The oracle judge (demo/trace_quality.py: oracle_score) behind an OpenAI-compatible /v1/chat/completions, the way
step 1's annotate.py calls a 72B judge: it reads the TRM prompt (utils.prompts.trm_messages), finds the task row by
its question text and the pixels of its image, and answers `<answer>0.6</answer>`.

    python demo/oracle_server.py --registry DIR/data/dataset_info.json --port 8000   # then annotate.py --judge-url
                                                                                      # http://127.0.0.1:8000/v1

GET /v1/models lists the served name (what utils.vllm_server.wait_ready polls). A request for a task the registry
does not hold gets HTTP 400 with the reason, which annotate.py records as a failed row.
"""
import argparse
import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from sophiavl.demo.trace_quality import oracle_score
from sophiavl.demo.trm_traces import read_raw_rows
from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.data import load_rows, open_images
from sophiavl.utils.prompts import TRM_PROMPT, format_question

PROMPT_HEAD, _after_question = TRM_PROMPT.split("{question}")
PROMPT_MIDDLE, PROMPT_TAIL = _after_question.split("{response}")


def pixels_key(image: Image.Image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha1(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def load_index(registry: str, data_path: str) -> dict:
    """(policy question text, pixel keys of its images) -> the raw task row (with `facts`)."""
    raw = read_raw_rows(registry, data_path)
    index = {}
    for row in load_rows(data_path, registry):
        question = format_question(row["prompt"], row["problem_type"], row["options"])
        index[(question, tuple(pixels_key(image) for image in open_images(row)))] = raw[row["id"]]
    return index


def read_request(body: dict) -> tuple[str, str, list[Image.Image]]:
    """(question, response, images) of one TRM request; ValueError when it is not one."""
    user = [m for m in body.get("messages", []) if m.get("role") == "user"]
    if len(user) != 1 or not isinstance(user[0].get("content"), list):
        raise ValueError("expected one user message with content parts (the TRM chat)")
    parts = user[0]["content"]
    text = "".join(part.get("text", "") for part in parts if part.get("type") == "text")
    images = [Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
              for part in parts if part.get("type") == "image_url"]
    if not (text.startswith(PROMPT_HEAD) and text.endswith(PROMPT_TAIL) and PROMPT_MIDDLE in text):
        raise ValueError("the user text is not the TRM prompt (utils.prompts.TRM_PROMPT)")
    question, response = text[len(PROMPT_HEAD):len(text) - len(PROMPT_TAIL)].split(PROMPT_MIDDLE, 1)
    if images:
        question = question.removeprefix("<image> ")  # trm_messages' prefix for image rows
    return question, response, images


class _Server(ThreadingHTTPServer):
    # annotate.py sends 32 requests at once; the default listen backlog (5), set when the socket starts listening
    # inside __init__, resets some of them on a busy machine
    request_queue_size = 128
    daemon_threads = True


class OracleServer:
    """The server on 127.0.0.1, in a thread: `with OracleServer(index) as server: server.url`."""

    def __init__(self, index: dict, port: int = 0, model_name: str = "oracle"):
        self.index, self.port, self.model_name = index, port, model_name
        self.requests = 0
        self._server = self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def answer(self, body: dict) -> tuple[int, dict]:
        try:
            question, response, images = read_request(body)
        except (ValueError, KeyError, TypeError, OSError) as err:
            return 400, {"error": {"message": f"not a TRM request: {err}", "type": "invalid_request_error"}}
        row = self.index.get((question, tuple(pixels_key(image) for image in images)))
        if row is None:
            return 400, {"error": {"message": f"no task with this question and image: {question[:80]!r}",
                                   "type": "invalid_request_error"}}
        self.requests += 1
        text = f"<answer>{oracle_score(response, row):.1f}</answer>"
        return 200, {"id": f"oracle-{self.requests}", "object": "chat.completion", "created": int(time.time()),
                     "model": self.model_name, "choices": [{"index": 0, "finish_reason": "stop",
                                                            "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}}

    def __enter__(self):
        oracle = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: annotate.py's client reuses its connections

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": oracle.model_name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                except (ValueError, TypeError):
                    return self._send(400, {"error": {"message": "the body is not JSON"}})
                self._send(*oracle.answer(body))

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="dataset_info.json of the synthetic tasks")
    parser.add_argument("--data-path", default="tiny_train,tiny_test", help="registry names whose tasks it judges")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default="oracle")
    return parser.parse_args(argv)


@exit_on_input_error
def main(argv=None):
    args = parse_args(argv)
    index = load_index(args.registry, args.data_path)
    if not index:
        raise InputError(f"{args.registry}: no tasks in {args.data_path}")
    with OracleServer(index, args.port, args.served_model_name) as server:
        print(f"oracle judge on {len(index)} tasks at {server.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
