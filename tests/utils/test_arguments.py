"""The flags two or more stages share (utils/arguments.py) mean the same in each stage and are checked by the same
rule, before any model is loaded: `--save-every 0` is "no periodic checkpoints", NaN is no positive number."""
import pytest

import step1_reward_model.main as step1
import step2_trust_grpo.arguments as step2
import step3_eval.main as step3
from sophiavl.utils.cli import InputError

STAGES = {  # the stage's required flags, and its checks
    "step1": (step1.parse_args, step1.check_args, ["--model-path", "m", "--train-data", "t", "--output-dir", "o"]),
    "step2": (step2.parse_args, lambda args: step2.check_args(args, 1),
              ["--model-path", "m", "--registry", "r", "--data-path", "d", "--output-dir", "o", "--variant", "grpo"]),
    "step3": (step3.parse_args, step3.check_args,
              ["--model-path", "m", "--registry", "r", "--data-path", "d", "--output-dir", "o"]),
}


def checked(stage, *flags):
    parse, check, required = STAGES[stage]
    args = parse([*required, *flags])
    check(args)
    return args


@pytest.mark.parametrize("stage", ["step1", "step2"])
def test_save_every_0_means_no_periodic_checkpoints_in_every_training_stage(stage):
    assert checked(stage, "--save-every", "0").save_every == 0
    with pytest.raises(InputError, match=r"--save-every must be >= 0 \(0: no checkpoints\), got -1"):
        checked(stage, "--save-every", "-1")


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("flags, message", [
    (["--dist-timeout-minutes", "nan"], "--dist-timeout-minutes must be > 0, got nan"),
    (["--dist-timeout-minutes", "0"], "--dist-timeout-minutes must be > 0, got 0"),
    (["--min-pixels", "0"], "--min-pixels must be > 0, got 0"),
    (["--max-pixels", "-5"], "--max-pixels must be > 0, got -5"),
])
def test_a_shared_flag_is_checked_by_one_rule_in_every_stage(stage, flags, message):
    with pytest.raises(InputError, match=message):
        checked(stage, *flags)


def test_the_shared_model_flags_keep_each_stage_s_defaults():
    assert (checked("step1").min_pixels, checked("step1").max_pixels) == (3136, 1003520)
    assert (checked("step2").min_pixels, checked("step2").max_pixels) == (3136, 1003520)
    evaluation = checked("step3")
    assert (evaluation.min_pixels, evaluation.max_pixels) == (None, None)  # the checkpoint's processor config
    assert not hasattr(evaluation, "gradient_checkpointing") and evaluation.dtype == "auto"


def test_step1_rejects_nan_where_a_positive_number_is_needed():
    with pytest.raises(InputError, match="--learning-rate must be > 0, got nan"):
        checked("step1", "--learning-rate", "nan")


def test_step3_parses_without_checking_and_checks_apart():
    args = step3.parse_args(["--model-path", "m", "--output-dir", "o"])  # nothing to evaluate: parse_args says nothing
    assert args.data_names == [] and args.benchmark_tsv == []
    with pytest.raises(InputError, match="nothing to evaluate"):
        step3.check_args(args)


@pytest.mark.parametrize("stage", ["step1", "step2"])
@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "nan"], "--learning-rate must be > 0, got nan"),
    (["--learning-rate", "0"], "--learning-rate must be > 0, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0, got 0"),
    (["--eval-max-samples", "0"], "--eval-max-samples must be > 0, got 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0, got -1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be >= 0, got nan"),
])
def test_the_optimiser_and_evaluation_flags_have_one_rule_in_both_training_stages(stage, flags, message):
    with pytest.raises(InputError, match=message):
        checked(stage, *flags)


def test_the_optimiser_flags_keep_each_stage_s_defaults():
    trm, policy = checked("step1"), checked("step2")
    assert (trm.learning_rate, policy.learning_rate) == (1e-5, 5e-7)  # step 2's resolved from its own rule
    for args in (trm, policy):
        assert (args.weight_decay, args.max_grad_norm, args.micro_batch_size, args.seed) == (0.0, 1.0, 4, 42)
        assert (args.eval_every, args.eval_max_samples) == (0, 256)
