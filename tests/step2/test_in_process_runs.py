"""Step 2's main() in the test process (one rank, the hf engine, 2 steps of full Trust-GRPO), against a real local
HTTP judge whose handler holds each answer until the trainer's first log-prob pass of the step has begun (or 3 s
have passed). Switches that must not change the numbers are compared with the default run:
- --trm-overlap (the default): the judge's requests are in flight during the reference pass, and the rewards, their
  order and the failure counts are those of --no-trm-overlap, which waits for the judge first;
- --offload-reference: the same losses with the reference's parameters offloaded to CPU memory;
- --gradient-checkpointing with --offload (DeepSpeed's CPU Adam), with and without LoRA: the same losses, and each
  decoder layer runs twice in every pass with gradients (its forward is recomputed in backward)."""
import json
import math
import re
import threading
import zlib

import pytest
import torch
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer as DecoderLayer

import step2_trust_grpo.main as step2
from tests.fake_judge import FakeJudge, reply, request_text, status
from tests.helpers import metrics, without_timings

HOLD_S = 3.0


def response_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def fails(text: str) -> bool:
    return response_hash(text) % 3 == 0


class JudgeHeldUntilTheReferencePass:
    """Scores a response by a hash of its text (so a reordered reward would show) and answers 503 to a third of
    them. Each answer waits for `pass_began`, and records whether it came before the wait ran out."""

    def __init__(self):
        self.pass_began, self.answered_during_pass = threading.Event(), []
        # what the run did besides: the reference engine's offload_param device (None: LoRA's reference), and the
        # number of decoder-layer forwards with gradients on
        self.reference_offload, self.layer_forwards_with_grad = None, 0

    def __call__(self, body, index):
        self.answered_during_pass.append(self.pass_began.wait(HOLD_S))
        response = re.search(r"Reasoning process: (.*)\n    Your response format", request_text(body), re.DOTALL)[1]
        return status(503) if fails(response) else reply(f"<answer>{response_hash(response) % 11 / 10}</answer>")


def run_step2_in_process(tiny_assets, output_dir, *flags) -> JudgeHeldUntilTheReferencePass:
    judge = JudgeHeldUntilTheReferencePass()
    logps = step2.completion_logps

    def first_pass_of_the_step_begins(*args, **kwargs):
        judge.pass_began.set()
        return logps(*args, **kwargs)

    def clear_at_each_rollout(generate):
        def wrapped(*args, **kwargs):
            judge.pass_began.clear()
            return generate(*args, **kwargs)
        return wrapped

    build_policy_engines = step2.build_policy_engines

    def recording_the_reference(*args, **kwargs):
        engine, ref_engine = build_policy_engines(*args, **kwargs)
        if hasattr(ref_engine, "zero_offload_param"):
            judge.reference_offload = ref_engine.zero_offload_param().device
        return engine, ref_engine

    layer_forward = DecoderLayer.forward

    def counted(*args, **kwargs):
        judge.layer_forwards_with_grad += torch.is_grad_enabled()
        return layer_forward(*args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch, FakeJudge(judge) as server:
        monkeypatch.setattr(step2, "build_policy_engines", recording_the_reference)
        monkeypatch.setattr(DecoderLayer, "forward", counted)
        monkeypatch.setattr(step2, "completion_logps", first_pass_of_the_step_begins)
        monkeypatch.setattr(step2.HFRollout, "generate", clear_at_each_rollout(step2.HFRollout.generate))
        monkeypatch.setattr(step2, "shutdown", lambda *close: None)  # the test process keeps its group
        step2.main(["--model-path", tiny_assets["model"], "--registry", tiny_assets["registry"],
                    "--data-path", "tiny_train", "--output-dir", str(output_dir), "--rollout-engine", "hf",
                    "--variant", "full", "--trm-url", server.url, "--trm-max-retries", "0",
                    "--num-generations", "4", "--rollout-batch-size", "2", "--micro-batch-size", "4",
                    "--max-completion-length", "16", "--max-prompt-length", "512", "--min-pixels", "12544",
                    "--max-pixels", "12544", "--learning-rate", "1e-3", "--kl-coef", "0.05",
                    "--zero-param-persistence-threshold", "0", "--temperature", "1.0", "--max-steps", "2",
                    "--save-every", "0", "--log-completions", *flags])
    unset_hf_deepspeed_config()  # a process runs one main(); this one runs two, so ZeRO-3 loading must end here
    return judge


def completions(output_dir) -> list[dict]:
    with open(output_dir / "completions" / "rank0.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def default_run(tiny_assets, _single_process_group, tmp_path_factory):
    """The run with the default flags: (its output folder, its judge)."""
    output_dir = tmp_path_factory.mktemp("in_process") / "default"
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in _single_process_group.items():
            monkeypatch.setenv(name, value)
        return output_dir, run_step2_in_process(tiny_assets, output_dir)


@pytest.mark.slow
def test_the_judge_answers_during_the_reference_pass_and_the_rewards_are_the_waiting_runs(
        default_run, tiny_assets, process_group, tmp_path):
    overlap_dir, overlapped = default_run
    waited = run_step2_in_process(tiny_assets, tmp_path / "wait", "--no-trm-overlap")

    # 2 steps x 2 prompts x 4 completions, every one held until the reference pass had begun
    assert overlapped.answered_during_pass == [True] * 16
    assert waited.answered_during_pass == [False] * 16  # waiting first, the trainer never reaches the pass
    assert completions(overlap_dir) == completions(tmp_path / "wait")
    overlap_metrics, wait_metrics = metrics(overlap_dir), metrics(tmp_path / "wait")
    assert [without_timings(m) for m in overlap_metrics] == [without_timings(m) for m in wait_metrics]
    for step, logged in ((1, completions(overlap_dir)[:2]), (2, completions(overlap_dir)[2:])):
        failed = [any(fails(text) for text in row["completions"]) for row in logged]
        assert overlap_metrics[step - 1]["trm/failures"] == sum(fails(t) for row in logged for t in row["completions"])
        assert overlap_metrics[step - 1]["trm/failed_groups"] == sum(failed)
        for row, group_failed in zip(logged, failed):  # a group with a failed request gets R^t = 0 throughout
            assert row["thinking"] == ([0.0] * 4 if group_failed else
                                       [response_hash(text) % 11 / 10 for text in row["completions"]])
    assert 0 < sum(m["trm/failures"] for m in overlap_metrics) < 16
    # micro-batches of 4 = one prompt's completions each: its image is encoded once per pass
    assert [m["update/encodings_per_image"] for m in overlap_metrics] == [1.0, 1.0]
    assert all(0 <= m["update/padding_share"] < 1 for m in overlap_metrics)


@pytest.mark.slow
def test_an_offloaded_reference_gives_the_same_losses(default_run, tiny_assets, process_group, tmp_path):
    assert run_step2_in_process(tiny_assets, tmp_path / "offload", "--offload-reference").reference_offload == "cpu"
    assert default_run[1].reference_offload == "none"
    offloaded, default = metrics(tmp_path / "offload"), metrics(default_run[0])
    assert [without_timings(m) for m in offloaded] == [without_timings(m) for m in default]
    assert all(m["kl"] > 0 for m in offloaded[1:])  # the reference is there and the policy has moved from it


def layers(tiny_assets) -> int:
    with open(f"{tiny_assets['model']}/config.json") as f:
        config = json.load(f)
    return config.get("text_config", config)["num_hidden_layers"]


def assert_same_losses(run, reference):
    got, expected = [without_timings(m) for m in metrics(run)], [without_timings(m) for m in metrics(reference)]
    assert [sorted(m) for m in got] == [sorted(m) for m in expected]
    for g, e in zip(got, expected):  # DeepSpeed's CPU Adam rounds unlike torch's AdamW in the last bits
        assert g == {k: pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in e.items()}


@pytest.mark.slow
def test_checkpointing_and_offload_give_the_same_losses_and_recompute_each_layer(
        default_run, tiny_assets, process_group, tmp_path):
    # 2 steps x 2 micro-batches of 4 completions: 4 passes with gradients; without the policy in train mode
    # gradient checkpointing was silently off (each layer once per pass), and --offload refused torch's AdamW
    run = run_step2_in_process(tiny_assets, tmp_path / "ckpt", "--gradient-checkpointing", "--offload")
    assert default_run[1].layer_forwards_with_grad == 4 * layers(tiny_assets)
    assert run.layer_forwards_with_grad == 2 * 4 * layers(tiny_assets)
    assert_same_losses(tmp_path / "ckpt", default_run[0])


@pytest.mark.slow
def test_lora_with_checkpointing_and_offload_gives_lora_alone_its_losses(tiny_assets, process_group, tmp_path):
    lora = ("--lora-rank", "4", "--lora-alpha", "8")
    alone = run_step2_in_process(tiny_assets, tmp_path / "lora", *lora)
    both = run_step2_in_process(tiny_assets, tmp_path / "both", *lora, "--gradient-checkpointing", "--offload")
    assert (alone.layer_forwards_with_grad, both.layer_forwards_with_grad) == (4 * layers(tiny_assets),
                                                                               8 * layers(tiny_assets))
    assert_same_losses(tmp_path / "both", tmp_path / "lora")
    assert all(m["kl"] > 0 for m in metrics(tmp_path / "both")[1:])  # the adapters train: the policy moves


@pytest.mark.slow
def test_the_real_launchers_bf16_settings_train(tiny_assets, process_group, tmp_path):
    # run_qwen2_5_vl_7b.sh's precision and memory settings, which no other step-2 test runs: bf16 weights under
    # ZeRO-3 (fp32 master copies in the optimizer), gradient checkpointing, an entropy bonus
    run = run_step2_in_process(tiny_assets, tmp_path / "bf16", "--dtype", "bfloat16", "--gradient-checkpointing",
                               "--entropy-coef", "1e-3")
    rows = metrics(tmp_path / "bf16")
    assert len(rows) == 2 and all(math.isfinite(m["loss"]) and math.isfinite(m["entropy"]) for m in rows)
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0  # the first update moved the bf16 policy from its reference
    assert run.layer_forwards_with_grad == 8 * layers(tiny_assets)
    final = json.loads((tmp_path / "bf16" / "final" / "config.json").read_text())
    assert final.get("dtype", final.get("torch_dtype")) == "bfloat16"
