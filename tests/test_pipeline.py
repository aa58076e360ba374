"""The one-click pipeline (train.py), end to end on a short tiny configuration: every stage runs,
the TRM server is started and stopped, and every output file exists and is well formed. (The
learning targets need the full tiny run; its figures are in the README.)"""
import json
import os
import subprocess
import sys

import psutil
import pytest

from tests.helpers import copy_finished_stages, run_short_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {"trm_mae", "trm_mae_constant_baseline", "trm_spearman", "outcome_reward_first", "outcome_reward_last",
                "acc_before", "acc_after", "wall_seconds", "stage_seconds"}
STAGES = ("assets", "warm_start", "step1", "step2", "step3_before", "step3_after")


def vllm_servers_of(output_dir) -> list:
    """The vLLM servers still running on a model under output_dir."""
    return [p for p in psutil.process_iter(["cmdline"])
            if any("vllm.entrypoints.openai.api_server" in part for part in (p.info["cmdline"] or []))
            and str(output_dir) in " ".join(p.info["cmdline"])]


@pytest.mark.slow
@pytest.mark.vllm
def test_tiny_pipeline_writes_every_output_and_stops_the_trm_server(short_pipeline):
    tmp_path, result = short_pipeline
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not vllm_servers_of(tmp_path), "the TRM server outlived the pipeline"
    assert "[trm-server] stopped" in result.stdout

    summary = json.load(open(tmp_path / "summary.json"))
    assert SUMMARY_KEYS <= set(summary)
    assert set(STAGES) <= set(summary["stage_seconds"])
    for key in ("trm_mae", "trm_mae_constant_baseline", "outcome_reward_first", "outcome_reward_last",
                "acc_before", "acc_after"):
        assert 0 <= summary[key] <= 1, (key, summary[key])
    assert summary["wall_seconds"] == pytest.approx(sum(summary["stage_seconds"].values()), abs=0.5)
    assert summary["step2_steps"] == 2
    for stage in STAGES:
        assert os.path.getsize(tmp_path / f"{stage}.log") > 0
    report = (tmp_path / "report.md").read_text()
    for image in ("training.png", "accuracy.png", "step1/eval/calibration.png"):
        assert f"({image})" in report
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("step3_before", "step3_after"):
        rows = [json.loads(line) for line in open(tmp_path / stage / "predictions.jsonl")]
        assert len(rows) == 20
    assert os.path.exists(tmp_path / "step2" / "final" / "model.safetensors")
    # the TRM server and step 2's client share the data's image cap (one image per tiny prompt)
    assert json.load(open(tmp_path / "step2" / "args.json"))["trm_max_images"] == 1
    assert "at most 1 images per request" in result.stdout

    # a second run finds every stage done and redoes none of them
    again = run_short_tiny("train.py", tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done already") == len(STAGES)
    assert "[trm-server] starting" not in again.stdout


@pytest.mark.slow
@pytest.mark.vllm
def test_a_failing_stage_stops_the_pipeline_and_prints_its_log_tail(short_pipeline, tmp_path):
    # step 3 alone, the earlier stages done: "after" finds no step-2 policy and fails (exit 2)
    copy_finished_stages(short_pipeline[0], tmp_path, {s: s for s in ("assets", "policy_init", "step3_before")})
    result = run_short_tiny("train.py", tmp_path, "--steps", "3", timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "[step3_before] done already" in result.stdout
    assert "[step3_after] failed (exit 2)" in result.stderr
    assert "error: cannot load a processor from" in result.stderr  # the tail of the stage's log
    assert not os.path.exists(tmp_path / "step3_after" / "summary.json")


def test_steps_without_step_1_need_a_trm(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--output-dir", str(tmp_path), "--steps", "2", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--trm-path" in result.stderr


def test_gpu_deployments_run_and_plan_the_same_launcher_commands():
    import train

    args = train.parse_args(["--deployment-type", "multi_node", "--hostfile", "hosts", "--actor-model", "A",
                             "--trm-base-model", "B", "--registry", "r.json", "--data-path", "d", "--eval-data-path", "e",
                             "--trm-data", "labels.jsonl", "--output-dir", "out"])
    labels, hosts, registry = (os.path.abspath(name) for name in ("labels.jsonl", "hosts", "r.json"))  # made absolute
    commands = train.gpu_commands(args, lambda stage: f"OUT/{stage}")
    assert commands == {
        "step1": ["bash", "step1_reward_model/training_scripts/train_qwen2_5_vl_3b.sh", "OUT/step1", labels, "B"],
        "step2": ["bash", "step2_trust_grpo/training_scripts/run_multinode.sh", "OUT/step2", hosts, "A", registry,
                  "d"]}
    args.deployment_type, args.trm_path, args.steps = "single_node", "trm", [1, 2]  # an existing TRM: no step 1
    assert train.gpu_commands(args, lambda stage: stage) == {
        "step2": ["bash", "step2_trust_grpo/training_scripts/run_qwen2_5_vl_7b.sh", "step2", "A", registry, "d"]}
