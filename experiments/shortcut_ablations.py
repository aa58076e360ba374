"""Issue 20's second design: Table 3 in miniature on tasks where a shortcut pays in training and breaks on held-out
rows, with judges built by the paper's own recipe. Pre-registered in docs/ablations.md ("Second design").

    python experiments/shortcut_ablations.py                  # everything (~2.5 h on 2 cores), then the report
    python experiments/shortcut_ablations.py --report-only    # rewrite the report from the runs done so far

Stages, each skipped when its outputs exist (run the same command again to continue; a run cut short resumes from
its last checkpoint):
    assets, warm_start   the shortcut world (demo/shortcut_tasks.py) and its warm start (--shortcut-fraction)
    step3_before         held-out evaluation of the warm start
    source_run, labels_*, step1_<condition>   experiments/annotated_trm.py: a GRPO run's rollouts labelled by the
                         oracle through annotate.py; the trained (true labels), hacked (1 - s) and untrained (shuffled)
                         judges fine-tuned on them
    run_<arm>-seed<k>    step 2 (--log-completions), one per arm and seed; seed k is the same prompts and sampling seed
                         in every arm. One TRM server per condition serves all its runs.
    eval_<arm>-seed<k>   step 3 on the run's final policy: held-out predictions (accuracy where the shortcut breaks)
"""
import argparse
import os
import sys

from sophiavl.utils.data import max_images_per_prompt
from sophiavl.utils.pipeline import Pipeline, command_shown, run_stages, tiny_setup

if not __package__:  # run as a script (`python experiments/shortcut_ablations.py`)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from . import annotated_trm, shortcut_report
from .ablations import ARMS, CONDITION_ORDER, planned_runs, run_by_condition, run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARMS = ["grpo", "full", "wo-trust/hacked", "full/hacked", "wo-trust", "wo-trust-and-annealing",
                "wo-trained-trm"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/shortcut_ablations")
    p.add_argument("--doc", default="docs/ablations.md",
                   help="the report goes into this doc's generated block; plots and figures.json in <doc>/shortcuts/")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    p.add_argument("--key-seeds", type=int, default=8, help="seeds for grpo, full, wo-trust/hacked and full/hacked")
    p.add_argument("--other-seeds", type=int, default=2, help="seeds for the other arms")
    p.add_argument("--step2-steps", type=int, default=40)
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs, run nothing")
    g = p.add_argument_group("the shortcut world (defaults: the pre-registered ones; the CI test shrinks them)")
    g.add_argument("--tiny-train-rows", type=int, default=2000)
    g.add_argument("--tiny-test-rows", type=int, default=400)
    g.add_argument("--warm-start-steps", type=int, default=200)
    g.add_argument("--shortcut-fraction", type=float, default=0.6, help="warm start: targets that state the shortcut")
    g.add_argument("--step2-extra", default="", help="extra flags for every step-2 run")
    annotated_trm.add_arguments(p)
    args = p.parse_args(argv)
    if args.key_seeds < 1 or args.other_seeds < 1 or args.step2_steps < 1:
        p.error("--key-seeds, --other-seeds and --step2-steps must be >= 1")
    if not 0 <= args.shortcut_fraction <= 1:
        p.error("--shortcut-fraction must be in [0, 1]")
    annotated_trm.check_arguments(p, args)
    args.seed, args.force, args.deployment_type, args.world = 0, False, "tiny", "shortcut"  # what utils.pipeline reads
    return args


def step2_and_eval(pipeline: Pipeline, registry: str, arm: str, seed: int, trm_url: str | None, max_images: int,
                   args) -> None:
    """One arm's step-2 run (no evaluation inside: step 3 on its final policy gives the per-row predictions)."""
    steps, out = args.step2_steps, run_dir(pipeline.out, arm, seed)
    name = os.path.basename(out)
    pipeline.run(f"run_{name}", [
        "bash", "step2_trust_grpo/training_scripts/run_tiny_cpu.sh", out, pipeline.path("policy_init"), registry,
        trm_url or "none", "--variant", ARMS[arm][0], "--seed", str(seed), "--max-steps", str(steps),
        "--save-every", str(max(steps // 2, 1)), "--eval-every", "0", "--sample-every", str(steps),
        "--log-completions", "--resume", *(["--trm-max-images", str(max_images)] if trm_url else []),
        *args.step2_extra.split()], done_when=os.path.join(out, "final", "config.json"))
    pipeline.run(f"eval_{name}", ["bash", "step3_eval/training_scripts/run_tiny_cpu.sh", os.path.join(out, "step3"),
                                  os.path.join(out, "final"), registry],
                 done_when=os.path.join(out, "step3", "summary.json"))


def run_all(pipeline: Pipeline, args) -> None:
    assets, registry = tiny_setup(pipeline)
    policy = pipeline.path("policy_init")
    pipeline.run("step3_before", ["bash", "step3_eval/training_scripts/run_tiny_cpu.sh", pipeline.path("step3_before"),
                                  policy, registry], done_when=pipeline.path("step3_before", "summary.json"))
    plan = planned_runs(args)
    conditions = [c for c in CONDITION_ORDER[1:] if any(ARMS[arm][1] == c for arm, _ in plan)]
    source = annotated_trm.source_run(pipeline, policy, registry, args.source_steps, args.source_seed,
                                      args.step2_extra.split())
    labels = annotated_trm.oracle_labels(pipeline, source, registry, args)
    trm_dirs = {c: annotated_trm.train_trm(pipeline, c, labels, assets, policy, args.step1_extra.split())
                for c in conditions}
    max_images = max_images_per_prompt("tiny_train", registry)

    def finished(arm, seed):
        return os.path.exists(os.path.join(run_dir(pipeline.out, arm, seed), "step3", "summary.json"))

    pending = [(arm, seed) for arm, seed in plan if not finished(arm, seed)]
    print(f"{len(plan) - len(pending)} of {len(plan)} runs done already; {len(pending)} to go", flush=True)

    def step2_left(runs):  # with only step 3 left (step 2's stage is skipped) no TRM server is needed
        return not all(os.path.exists(os.path.join(run_dir(pipeline.out, a, s), "final", "config.json"))
                       for a, s in runs)

    run_by_condition(pipeline, pending, trm_dirs, max_images,
                     lambda arm, seed, url: step2_and_eval(pipeline, registry, arm, seed, url, max_images, args),
                     needs_server=step2_left)


def main(argv=None) -> int:
    args = parse_args(argv)
    pipeline = Pipeline(args, REPO)
    code = 0 if args.report_only else run_stages(lambda: run_all(pipeline, args))
    if code:
        return code
    if not os.path.exists(pipeline.path("step3_before", "summary.json")):
        print(f"error: nothing to report yet in {pipeline.out} (no step3_before/)", file=sys.stderr)
        return 2
    shortcut_report.write(pipeline.out, args.doc, planned_runs(args),
                          command_shown("experiments/shortcut_ablations.py", argv))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
