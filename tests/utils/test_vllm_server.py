"""The vLLM server process manager (utils/vllm_server.py): its command, the bounded readiness wait, and a stop
that reaches the whole process group. A real server is started in tests/step1/test_serve.py."""
import signal
import subprocess
import sys
import time

import pytest

from sophiavl.utils import vllm_server
from tests.helpers import alive, closed_port

pytestmark = pytest.mark.timeout(300)


def test_command_has_the_cpu_settings_only_on_the_cpu_build():
    cpu = vllm_server.serve_command("/m", 8123, cpu=True, max_images=3)
    assert cpu[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cpu[3::2], cpu[4::2]))
    assert flags["--model"] == "/m" and flags["--port"] == "8123" and flags["--dtype"] == "float32"
    assert flags["--served-model-name"] == "thinking-reward-model" and flags["--max-model-len"] == "8192"
    assert flags["--limit-mm-per-prompt"] == '{"image": 3, "video": 0}' and cpu[-1] == "--enforce-eager"
    gpu = vllm_server.serve_command("/m", 8123, cpu=False, max_images=1, extra_args=["--tensor-parallel-size", "2"])
    assert "--enforce-eager" not in gpu and gpu[gpu.index("--dtype") + 1] == "bfloat16"
    assert gpu[-2:] == ["--tensor-parallel-size", "2"]


def test_models_url_accepts_the_usual_spellings():
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/", "http://h:1/v1/chat/completions"):
        assert vllm_server.models_url(url) == "http://h:1/v1/models"


def test_wait_ready_is_bounded_and_notices_a_dead_server():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no vLLM server ready"):
        vllm_server.wait_ready(f"http://127.0.0.1:{closed_port()}/v1", timeout=1, poll_s=0.2)
    assert time.monotonic() - start < 5
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        vllm_server.wait_ready(f"http://127.0.0.1:{closed_port()}/v1", timeout=30, proc=dead)


def process_tree(script):
    """A process group like the server's: a leader that starts a child (printing the child's pid)."""
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', " + repr(script) + "])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc, int(proc.stdout.readline())


def test_stop_ends_the_whole_process_group():
    proc, child = process_tree("import time; time.sleep(60)")
    start = time.monotonic()
    assert vllm_server.stop(proc, timeout=10) == -signal.SIGTERM
    assert time.monotonic() - start < 5
    time.sleep(0.2)
    assert not alive(proc.pid) and not alive(child)


def test_stop_kills_what_ignores_sigterm():
    proc, child = process_tree("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")
    time.sleep(0.5)  # let the child install its handler
    start = time.monotonic()
    vllm_server.stop(proc, timeout=1)
    assert time.monotonic() - start < 5
    time.sleep(0.2)
    assert not alive(proc.pid) and not alive(child)
