"""Step-2 flags: the paper's defaults, --reference-parity, the ablation switches, and the checks made before any
model is loaded."""
import os
import subprocess
import sys
import time

import pytest

from step2_trust_grpo.arguments import check_args, parse_args
from sophiavl.utils.cli import InputError

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = ["--model-path", "m", "--registry", "r.json", "--data-path", "d", "--output-dir", "o"]
# valid on 2 ranks: 4 prompts / 2 ranks x N 2 = 4 completions per rank, micro-batches of 2
VALID = REQUIRED + ["--trm-url", "http://127.0.0.1:8000/v1", "--rollout-batch-size", "4", "--num-generations", "2",
                    "--micro-batch-size", "2"]


def test_defaults_follow_the_paper():
    args = parse_args(REQUIRED)
    assert args.learning_rate == 5e-7
    assert args.num_generations == 8
    assert args.kl_coef == 0.04
    assert args.entropy_coef == 1e-3
    assert args.alpha == 0.3
    assert args.clip_eps == 0.2
    assert args.max_completion_length == 1024
    assert args.max_steps == 1500 and args.anneal_horizon == 1500
    assert (args.variant, args.use_thinking_reward, args.use_trust, args.use_anneal) == ("full", True, True, True)
    assert args.reference_parity is False
    assert args.strict_format is False and parse_args(REQUIRED + ["--strict-format"]).strict_format is True
    assert args.trm_max_images is None and parse_args(REQUIRED + ["--trm-max-images", "3"]).trm_max_images == 3


def test_anneal_horizon_defaults_to_the_number_of_steps():
    assert parse_args(REQUIRED + ["--max-steps", "200"]).anneal_horizon == 200


def test_reference_parity_sets_the_reference_lr_and_horizon():
    args = parse_args(REQUIRED + ["--reference-parity", "--max-steps", "200"])
    assert args.learning_rate == 6e-7 and args.anneal_horizon == 12000


def test_explicit_lr_and_horizon_win_over_reference_parity():
    args = parse_args(REQUIRED + ["--reference-parity", "--learning-rate", "1e-6", "--anneal-horizon", "500"])
    assert args.learning_rate == 1e-6 and args.anneal_horizon == 500


@pytest.mark.parametrize("variant, switches", [
    ("full", (True, True, True)),
    ("wo-trust", (True, False, True)),
    ("wo-trust-and-annealing", (True, False, False)),
    ("grpo", (False, False, False)),
])
def test_variant_sets_thinking_trust_and_annealing(variant, switches):
    args = parse_args(REQUIRED + ["--variant", variant])
    assert (args.use_thinking_reward, args.use_trust, args.use_anneal) == switches


def test_unknown_variant_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(REQUIRED + ["--variant", "no-such-variant"])
    assert exit_info.value.code == 2 and "--variant" in capsys.readouterr().err


# --- check_args --------------------------------------------------------------------------------------


def test_a_valid_configuration_passes():
    check_args(parse_args(VALID), world_size=2)
    check_args(parse_args(VALID + ["--trm-max-failure-rate", "0"]), world_size=2)
    check_args(parse_args(VALID + ["--trm-max-failure-rate", "1", "--top-p", "1"]), world_size=2)
    check_args(parse_args(VALID + ["--trm-url", "http://judge:8000/v1/chat/completions"]), world_size=2)


def test_lora_alpha_defaults_to_twice_the_rank():
    args = parse_args(VALID + ["--lora-rank", "8"])
    check_args(args, world_size=2)
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout) == (8, 16.0, 0.0)
    assert args.lora_target_modules == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    args = parse_args(VALID)
    check_args(args, world_size=2)
    assert args.lora_rank == 0 and not args.lora_save_adapter


def test_the_grpo_baseline_needs_no_trm_url():
    argv = REQUIRED + ["--variant", "grpo", "--rollout-batch-size", "4", "--num-generations", "2",
                       "--micro-batch-size", "2"]
    check_args(parse_args(argv), world_size=2)


@pytest.mark.parametrize("extra, world_size, flag", [
    (["--rollout-batch-size", "3"], 2, "--rollout-batch-size 3"),
    (["--num-generations", "3", "--micro-batch-size", "4"], 2, "--micro-batch-size 4"),  # 6 per rank
    (["--micro-batch-size", "3"], 1, "--micro-batch-size 3"),  # 8 per rank
    (["--anneal-horizon", "0"], 2, "--anneal-horizon"),
    (["--anneal-horizon", "-5"], 2, "--anneal-horizon"),
    (["--anneal-horizon", "nan"], 2, "--anneal-horizon"),
    (["--trm-url", ""], 2, "--trm-url"),
    (["--trm-url", "localhost:8000"], 2, "--trm-url"),
    (["--trm-max-failure-rate", "1.5"], 2, "--trm-max-failure-rate"),
    (["--trm-max-failure-rate", "-0.1"], 2, "--trm-max-failure-rate"),
    (["--temperature", "0"], 2, "--temperature"),
    (["--temperature", "nan"], 2, "--temperature"),
    (["--top-p", "0"], 2, "--top-p"),
    (["--top-p", "1.5"], 2, "--top-p"),
    (["--rollout-engine", "hf", "--vllm-sleep-mode"], 2, "--vllm-sleep-mode"),
    (["--rollout-engine", "hf", "--vllm-tensor-parallel-size", "2"], 2, "--vllm-tensor-parallel-size"),
    (["--vllm-tensor-parallel-size", "4"], 2, "--vllm-tensor-parallel-size"),
    (["--vllm-tensor-parallel-size", "0"], 2, "--vllm-tensor-parallel-size"),
    (["--num-generations", "0"], 2, "--num-generations"),
    (["--sample-every", "0"], 2, "--sample-every"),
    (["--trm-timeout", "0"], 2, "--trm-timeout"),
    (["--trm-max-retries", "-1"], 2, "--trm-max-retries"),
    (["--trm-max-images", "-1"], 2, "--trm-max-images"),
    (["--alpha", "-0.3"], 2, "--alpha"),
    (["--lora-rank", "-1"], 2, "--lora-rank"),
    (["--lora-rank", "8", "--lora-alpha", "0"], 2, "--lora-alpha"),
    (["--lora-rank", "8", "--lora-dropout", "1"], 2, "--lora-dropout"),
    (["--lora-rank", "8", "--lora-target-modules", " , "], 2, "--lora-target-modules"),
    (["--lora-save-adapter"], 2, "--lora-save-adapter need LoRA"),
    (["--lora-dropout", "0.1"], 2, "--lora-dropout need LoRA"),
    (["--offload-reference", "--kl-coef", "0"], 2, "--offload-reference: --kl-coef 0"),
    (["--offload-reference", "--lora-rank", "8"], 2, "--offload-reference: with --lora-rank"),
])
def test_bad_flags_are_rejected_naming_the_flag(extra, world_size, flag):
    with pytest.raises(InputError, match=flag):
        check_args(parse_args(VALID + extra), world_size=world_size)


@pytest.mark.parametrize("variant", ["full", "wo-trust", "wo-trust-and-annealing"])
def test_thinking_variants_need_a_trm_url(variant):
    argv = REQUIRED + ["--variant", variant, "--rollout-batch-size", "4", "--num-generations", "2"]
    with pytest.raises(InputError, match="--trm-url"):
        check_args(parse_args(argv), world_size=1)


# --- the entry point: flag errors before anything is loaded or written ------------------------------


@pytest.mark.parametrize("world_size, extra, message", [
    (None, ["--num-generations", "2", "--micro-batch-size", "4"], "--micro-batch-size 4"),  # 6 completions, 1 rank
    ("2", [], "--rollout-batch-size 3"),
])
def test_main_rejects_bad_flags_before_loading_anything(tmp_path, world_size, extra, message):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if world_size:
        env["WORLD_SIZE"] = world_size
    output_dir = tmp_path / "run"
    command = [sys.executable, os.path.join(REPO, "step2_trust_grpo", "main.py"),
               "--model-path", str(tmp_path / "no-such-model"), "--registry", str(tmp_path / "no-such.json"),
               "--data-path", "tiny_train", "--output-dir", str(output_dir), "--variant", "grpo",
               "--rollout-batch-size", "3", *extra]
    start = time.monotonic()
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=50)
    elapsed = time.monotonic() - start

    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0]) and "Traceback" not in result.stderr
    assert not (output_dir / "metrics.jsonl").exists() and not (output_dir / "checkpoints").exists()
    assert not output_dir.exists() or not any(output_dir.iterdir())
    assert elapsed < 30
