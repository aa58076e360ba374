"""Tiny end-to-end wall time per stage, from the summary.json that the one-click pipeline writes.

    python train.py --output-dir outputs/tiny                # writes outputs/tiny/summary.json
    python benchmarks/e2e_times.py outputs/tiny              # a run folder or its summary.json
    python benchmarks/e2e_times.py --quick                   # CI: a small made-up summary in a temporary folder

summary.json holds "stage_seconds" ({stage: seconds}, in the order the stages ran) and "wall_seconds".
"""
import argparse
import json
import os
import tempfile

from sophiavl.utils.cli import InputError, exit_on_input_error

FABRICATED = {"wall_seconds": 10.0, "stage_seconds": {"assets": 1.0, "warm_start": 2.0, "step1": 3.0, "step2": 3.5,
                                                      "step3_before": 0.25, "step3_after": 0.25}}


def read_summary(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no summary.json (run `python train.py` first)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    stages = summary.get("stage_seconds") if isinstance(summary, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(v, (int, float)) for v in stages.values()):
        raise InputError(f"{path}: needs \"stage_seconds\": {{stage: seconds}}")
    return summary


def stage_table(summary: dict) -> str:
    stages = summary["stage_seconds"]
    wall = summary.get("wall_seconds") or sum(stages.values())
    lines = [f"{'stage':<16} {'seconds':>9} {'share':>7}"]
    lines += [f"{name:<16} {seconds:>9.1f} {seconds / wall:>7.1%}" for name, seconds in stages.items()]
    lines.append(f"{'total':<16} {wall:>9.1f} {1:>7.0%}")
    return "\n".join(lines)


@exit_on_input_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="pipeline output folder or its summary.json")
    p.add_argument("--quick", action="store_true", help="CI: print the table of a made-up summary")
    args = p.parse_args(argv)
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "summary.json"), "w") as f:
                json.dump(FABRICATED, f)
            table = stage_table(read_summary(tmp))
    elif args.run:
        table = stage_table(read_summary(args.run))
    else:
        p.error("give a pipeline output folder (or --quick)")
    print(table)
    return table


if __name__ == "__main__":
    main()
