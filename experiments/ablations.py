"""The paper's Table 3 in miniature, on the tiny CPU job: five variants, a trained and a hacked TRM, seeds.

    python experiments/ablations.py                      # everything (~2 h on 2 cores), then docs/ablations.md
    python experiments/ablations.py --report-only        # rewrite the doc from the runs done so far

Arms (Table 3's variants; the thinking-reward ones under each TRM condition):
    grpo                              outcome reward only (no TRM)
    wo-trained-trm                    full Trust-GRPO with the untrained-TRM stand-in (step 1 on shuffled labels:
                                      it emits the score format, its scores carry no information)
    wo-trust-and-annealing, wo-trust, full                     with the trained TRM (step 1 on true labels)
    wo-trust-and-annealing/hacked, wo-trust/hacked, full/hacked   with a hacked TRM (step 1 on labels 1 - s,
                                      so flawed reasoning scores high)

All arms start from one warm-started policy; seed k is the same step-2 seed (prompt order and sampling)
in every arm, so arms are compared pair by pair. One TRM server per condition serves all its runs.
Every stage is skipped when its outputs exist: run the command again after a crash or Ctrl-C and it
continues with the first unfinished run (a run cut short resumes from its last checkpoint).
"""
import argparse
import os
import sys
from itertools import groupby

from sophiavl.utils.data import max_images_per_prompt
from sophiavl.utils.pipeline import Pipeline, command_shown, run_stages, tiny_setup, with_trm_server

if not __package__:  # run as a script (`python experiments/ablations.py`)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from . import ablations_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRM_LABELS = {"trained": "true", "hacked": "inverted", "untrained": "shuffled"}
ARMS = {  # name -> (step-2 --variant, TRM condition)
    "grpo": ("grpo", None),
    "wo-trained-trm": ("full", "untrained"),
    "wo-trust-and-annealing": ("wo-trust-and-annealing", "trained"),
    "wo-trust": ("wo-trust", "trained"),
    "full": ("full", "trained"),
    "wo-trust-and-annealing/hacked": ("wo-trust-and-annealing", "hacked"),
    "wo-trust/hacked": ("wo-trust", "hacked"),
    "full/hacked": ("full", "hacked"),
}
KEY_ARMS = ("grpo", "full", "wo-trust/hacked", "full/hacked")  # the two key comparisons get more seeds
CONDITION_ORDER = (None, "trained", "hacked", "untrained")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/ablations")
    p.add_argument("--doc", default="docs/ablations.md", help="the generated report; its plots go next to it")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--key-seeds", type=int, default=5, help=f"seeds for {', '.join(KEY_ARMS)}")
    p.add_argument("--other-seeds", type=int, default=2, help="seeds for the other arms")
    p.add_argument("--step2-steps", type=int, default=40)
    p.add_argument("--report-only", action="store_true", help="write the doc from the finished runs, run nothing")
    p.add_argument("--notes", default="experiments/ablations_reading.md",
                   help="hand-written reading of the results, copied into the doc when it exists")
    g = p.add_argument_group("tiny world sizes (defaults: the tiny demo's; the CI test shrinks them)")
    g.add_argument("--tiny-train-rows", type=int, default=2000)
    g.add_argument("--tiny-test-rows", type=int, default=200)
    g.add_argument("--warm-start-steps", type=int, default=200)
    g.add_argument("--step1-extra", default="", help="extra flags for step 1's main.py, e.g. '--max-steps 20'")
    g.add_argument("--step2-extra", default="", help="extra flags for every step-2 run")
    args = p.parse_args(argv)
    if args.key_seeds < 1 or args.other_seeds < 1 or args.step2_steps < 1:
        p.error("--key-seeds, --other-seeds and --step2-steps must be >= 1")
    args.seed, args.force, args.deployment_type = 0, False, "tiny"  # what utils.pipeline reads
    return args


def planned_runs(args) -> list[tuple[str, int]]:
    """(arm, seed) in the order they run: every arm's first --other-seeds seeds, then the key arms' extra
    seeds, each part grouped by TRM condition so that one server start serves many runs."""
    def seeds(arm):
        return range(args.key_seeds if arm in KEY_ARMS else args.other_seeds)

    first = [(arm, s) for arm in args.arms for s in seeds(arm) if s < args.other_seeds]
    rest = [(arm, s) for arm in args.arms for s in seeds(arm) if s >= args.other_seeds]
    def by_condition(run):
        return CONDITION_ORDER.index(ARMS[run[0]][1])

    return sorted(first, key=by_condition) + sorted(rest, key=by_condition)


def run_dir(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{arm.replace('/', '__')}-seed{seed}")


def train_trm(pipeline: Pipeline, condition: str, assets: str, args) -> str:
    """Step 1 on the condition's labels (evaluated against the true ones); returns the judge's directory."""
    out = pipeline.path(f"trm_{condition}")
    pipeline.run(f"step1_{condition}", ["bash", "step1_reward_model/training_scripts/train_tiny_cpu.sh", out, assets,
                                        pipeline.path("policy_init"), *args.step1_extra.split()],
                 done_when=os.path.join(out, "eval", "metrics.json"), env={"TRM_LABELS": TRM_LABELS[condition]})
    return os.path.join(out, "final")


def step2_run(pipeline: Pipeline, registry: str, arm: str, seed: int, trm_url: str | None, max_images: int,
              args) -> None:
    variant = ARMS[arm][0]
    steps = args.step2_steps
    out = run_dir(pipeline.out, arm, seed)
    pipeline.run(f"run_{os.path.basename(out)}", [
        "bash", "step2_trust_grpo/training_scripts/run_tiny_cpu.sh", out, pipeline.path("policy_init"), registry,
        trm_url or "none", "--variant", variant, "--seed", str(seed), "--max-steps", str(steps),
        "--save-every", str(max(steps // 2, 1)), "--eval-every", str(steps), "--sample-every", str(steps),
        "--log-completions", "--resume", *(["--trm-max-images", str(max_images)] if trm_url else []),
        *args.step2_extra.split()],
        done_when=os.path.join(out, "final", "config.json"))


def run_all(pipeline: Pipeline, args) -> None:
    assets, registry = tiny_setup(pipeline)
    pipeline.run("step3_before", ["bash", "step3_eval/training_scripts/run_tiny_cpu.sh", pipeline.path("step3_before"),
                                  pipeline.path("policy_init"), registry],
                 done_when=pipeline.path("step3_before", "summary.json"))
    plan = planned_runs(args)
    conditions = [c for c in CONDITION_ORDER[1:] if any(ARMS[arm][1] == c for arm, _ in plan)]
    max_images = max_images_per_prompt("tiny_train", registry)  # the TRM server's cap: the data run_tiny_cpu.sh uses
    trm_dirs = {condition: train_trm(pipeline, condition, assets, args) for condition in conditions}

    pending = [(arm, seed) for arm, seed in plan
               if not os.path.exists(os.path.join(run_dir(pipeline.out, arm, seed), "final", "config.json"))]
    print(f"{len(plan) - len(pending)} of {len(plan)} runs done already; {len(pending)} to go", flush=True)
    run_by_condition(pipeline, pending, trm_dirs, max_images,
                     lambda arm, seed, trm_url: step2_run(pipeline, registry, arm, seed, trm_url, max_images, args))


def run_by_condition(pipeline: Pipeline, pending: list, trm_dirs: dict, max_images: int, run_one,
                     needs_server=lambda runs: True) -> None:
    """run_one(arm, seed, trm_url) for each (arm, seed) of `pending` (in planned_runs' order: grouped by TRM
    condition), with one TRM server for each condition's runs; none for the GRPO arm's, nor where
    needs_server(those runs) is False."""
    for condition, group in groupby(pending, key=lambda run: ARMS[run[0]][1]):
        runs = list(group)

        def run_each(trm_url):
            for arm, seed in runs:
                run_one(arm, seed, trm_url)

        if condition is None or not needs_server(runs):
            run_each(None)
        else:
            with_trm_server(pipeline, trm_dirs[condition], max_images, run_each)


def main(argv=None) -> int:
    args = parse_args(argv)
    pipeline = Pipeline(args, REPO)
    code = 0 if args.report_only else run_stages(lambda: run_all(pipeline, args))
    if code:
        return code
    ablations_report.write(pipeline.out, args.doc, ARMS, planned_runs(args), run_dir,
                           command_shown("experiments/ablations.py", argv), args.notes)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
