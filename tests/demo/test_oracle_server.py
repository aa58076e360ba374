"""The oracle judge behind /v1/chat/completions: step 1's annotate.py, unchanged, labels real task rows through it
with the oracle's own scores; a request for a task it does not hold fails with the reason."""
import json
import os
import subprocess
import sys

import jsonlines
import pytest
from PIL import Image

from sophiavl.demo.build_tiny_assets import asset_paths, write_data
from sophiavl.demo.trace_quality import oracle_score
from sophiavl.demo.trm_traces import read_raw_rows
from sophiavl.utils import vllm_server
from sophiavl.utils.data import load_rows
from sophiavl.utils.prompts import format_question
from tests.helpers import REPO, free_port, run_script

pytestmark = pytest.mark.timeout(120)


def responses(raw):
    """The correct chain (1.0), a repeated step (0.9), an answer the steps do not reach (0.3), fillers only (0.1)."""
    steps, answer = raw["reasoning"], raw["solution"][len("<answer>"):-len("</answer>")]
    return [f"<think>{'. '.join(steps)}.</think><answer>{answer}</answer>",
            f"<think>{'. '.join(steps + steps[-1:])}.</think><answer>{answer}</answer>",
            f"<think>{'. '.join(steps)}.</think><answer>{answer}x</answer>",
            "<think>hmm. let me think.</think><answer>1</answer>"]


def test_annotate_labels_rollouts_with_the_oracles_scores(tmp_path):
    paths = asset_paths(str(tmp_path / "assets"))
    os.makedirs(paths["data_dir"])
    write_data(paths, seed=0, num_train=5, num_test=5)  # one row of each family per split, no model needed
    raw = read_raw_rows(paths["registry"], "tiny_train,tiny_test")
    rollouts = []
    for row in load_rows("tiny_train,tiny_test", paths["registry"]):
        question = format_question(row["prompt"], row["problem_type"], row["options"])
        images = [os.path.relpath(ref["path"], tmp_path) for ref in row["images"]]
        rollouts += [{"id": f"{row['id']}#{k}", "question": question, "response": text, "images": images}
                     for k, text in enumerate(responses(raw[row["id"]]))]
    Image.new("RGB", (112, 112), "white").save(tmp_path / "blank.png")  # no task has this image
    rollouts.append({"id": "unknown", "question": rollouts[0]["question"], "response": "<think>x</think>",
                     "images": ["blank.png"]})
    with jsonlines.open(tmp_path / "rollouts.jsonl", "w") as writer:
        writer.write_all(rollouts)

    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "demo/oracle_server.py", "--registry", paths["registry"],
                                   "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        vllm_server.wait_ready(url, timeout=60, proc=server, poll_s=0.2, model_name="oracle")
        result = run_script([sys.executable, "step1_reward_model/annotate.py", "--input", str(tmp_path / "rollouts.jsonl"),
                             "--output", str(tmp_path / "labels.jsonl"), "--judge-url", url, "--judge-model", "oracle",
                             "--max-retries", "0"], timeout=90)
    finally:
        vllm_server.stop(server)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "scored 40 / failed 1 / skipped 0"
    labels = {label["id"]: label for label in jsonlines.open(tmp_path / "labels.jsonl")}
    for rollout in rollouts[:-1]:
        label = labels[rollout["id"]]
        expected = oracle_score(rollout["response"], raw[rollout["id"].split("#")[0]])
        assert label["status"] == "scored" and label["score"] == expected, (rollout, label)
        assert label["judge_text"] == f"<answer>{expected:.1f}</answer>"
    assert sorted({label["score"] for label in labels.values() if label["score"] is not None}) == [0.1, 0.3, 0.9, 1.0]
    failed = labels["unknown"]
    assert failed["status"] == "failed" and "HTTP 400" in failed["error"] and "no task with this question" in failed["error"]
    assert "oracle judge on 10 tasks" in (tmp_path / "server.log").read_text()


def test_a_request_that_is_not_the_trm_prompt_is_refused():
    from sophiavl.demo.oracle_server import OracleServer

    import urllib.error
    import urllib.request

    with OracleServer({}) as server:
        body = json.dumps({"model": "oracle", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is 2 + 2?"}]}]}).encode()
        request = urllib.request.Request(server.url + "/chat/completions", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and "not the TRM prompt" in err.value.read().decode()
