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


QWEN3_VL_PIXELS = ["--min-pixels", "4096", "--max-pixels", "1310720"]  # multiples of 32: 4 to 1,280 image tokens


def test_gpu_deployments_run_each_models_family_launchers(tmp_path, monkeypatch):
    """gpu_commands (run by gpus(), planned by --plan): a Qwen3-VL policy (a shipped config's name) with a TRM of
    another family (a local folder): Qwen3-VL's launcher and pixel limits in steps 2 and 3, Qwen2.5-VL's recipe for
    the TRM; a Qwen2.5-VL run is what it was."""
    import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name that is neither shipped nor a folder asks the hub
    qwen2_vl = tmp_path / "qwen2-vl"
    qwen2_vl.mkdir()
    (qwen2_vl / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    policy = "Qwen/Qwen3-VL-8B-Instruct"
    args = train.parse_args(["--deployment-type", "multi_node", "--hostfile", "hosts", "--actor-model", policy,
                             "--trm-base-model", str(qwen2_vl), "--registry", "r.json", "--data-path", "d",
                             "--eval-data-path", "e", "--trm-data", "labels.jsonl", "--output-dir", "out"])
    labels, hosts, registry = (os.path.abspath(name) for name in ("labels.jsonl", "hosts", "r.json"))  # made absolute

    def out(*parts):
        return "/".join(["OUT", *parts])

    step3 = "step3_eval/training_scripts/run_qwen2_5_vl_7b.sh"
    assert train.gpu_commands(args, out, "URL") == {
        "step1": ["bash", "step1_reward_model/training_scripts/train_qwen2_5_vl_3b.sh", "OUT/step1", labels,
                  str(qwen2_vl)],
        "step2": ["bash", "step2_trust_grpo/training_scripts/run_multinode.sh", "OUT/step2", hosts, policy, registry,
                  "d", "URL", *QWEN3_VL_PIXELS],
        "step3_before": ["bash", step3, "OUT/step3_before", policy, registry, "e", *QWEN3_VL_PIXELS],
        "step3_after": ["bash", step3, "OUT/step3_after", "OUT/step2/final", registry, "e", *QWEN3_VL_PIXELS]}
    assert "step2" not in train.gpu_commands(args, out, None)  # gpus() asks for it once the TRM server is up

    args.deployment_type, args.trm_base_model = "single_node", "Qwen/Qwen3-VL-4B-Instruct"
    commands = train.gpu_commands(args, out, "URL")
    assert commands["step1"][1] == "step1_reward_model/training_scripts/train_qwen3_vl_4b.sh"
    assert commands["step2"] == ["bash", "step2_trust_grpo/training_scripts/run_qwen3_vl_8b.sh", "OUT/step2", policy,
                                 registry, "d", "URL"]  # the wrapper adds the pixel limits itself
    args.actor_model, args.trm_path, args.steps = "Qwen/Qwen2.5-VL-7B-Instruct", "trm", [2, 3]  # an existing TRM
    assert train.gpu_commands(args, out, "URL") == {
        "step2": ["bash", "step2_trust_grpo/training_scripts/run_qwen2_5_vl_7b.sh", "OUT/step2",
                  "Qwen/Qwen2.5-VL-7B-Instruct", registry, "d", "URL"],
        "step3_before": ["bash", step3, "OUT/step3_before", "Qwen/Qwen2.5-VL-7B-Instruct", registry, "e"],
        "step3_after": ["bash", step3, "OUT/step3_after", "OUT/step2/final", registry, "e"]}


def test_plan_follows_each_family_to_its_stages_main_py(tmp_path, monkeypatch, capfd):
    """train.py --plan for the mixed pair, with the launchers' `python` a stub that prints its command line: each
    stage's main.py gets its own model's pixel limits (the last value of a flag wins)."""
    import train

    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "main.py:$*"\n')
    stub.chmod(0o755)
    monkeypatch.setattr(train, "PYTHON", str(stub))
    code = train.main(["--plan", "--deployment-type", "single_node", "--actor-model", "Qwen/Qwen3-VL-8B-Instruct",
                       "--trm-base-model", "Qwen/Qwen2.5-VL-3B-Instruct", "--registry", "r.json", "--data-path", "d",
                       "--eval-data-path", "e", "--trm-data", "labels.jsonl"])
    printed = capfd.readouterr().out
    assert code == 0
    step1, step2 = (line for line in printed.splitlines() if line.startswith("main.py:"))
    assert "--model-path Qwen/Qwen2.5-VL-3B-Instruct" in step1 and step1.endswith("--plan")
    assert "--min-pixels 3136 --max-pixels 1003520" in step1 and "4096" not in step1
    assert "--model-path Qwen/Qwen3-VL-8B-Instruct" in step2
    assert step2.endswith(" ".join(QWEN3_VL_PIXELS) + " --plan")  # after the 7B recipe's 3136 / 1003520
    assert "[step2] bash step2_trust_grpo/training_scripts/run_qwen3_vl_8b.sh" in printed


def test_plan_refuses_a_model_of_no_supported_family_in_one_line(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    flags = ["--plan", "--deployment-type", "single_node", "--trm-base-model", "Qwen/Qwen2.5-VL-3B-Instruct",
             "--registry", "r.json", "--data-path", "d", "--eval-data-path", "e", "--trm-data", "labels.jsonl"]
    assert train.main([*flags, "--actor-model", str(llava)]) == 2
    assert capsys.readouterr().err == (f"error: {llava}/config.json: model_type 'llava' is not supported "
                                       "(supported: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5)\n")
    assert train.main([*flags, "--actor-model", "nobody/no-such-model"]) == 2
    assert capsys.readouterr().err.startswith("error: nobody/no-such-model: neither a model folder nor a shipped "
                                              "config, and its config.json could not be fetched from the hub")
