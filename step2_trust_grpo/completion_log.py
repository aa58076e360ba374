"""--log-completions: every completion of every step with its rewards, for analysis (experiments/ablations.py)."""
import json
import os

from sophiavl.utils.metrics_log import drop_steps_after


class CompletionLog:
    """Every completion of every step, one line per group, on every rank (its own file)."""

    def __init__(self, output_dir: str, rank: int, resume_step: int = 0):
        os.makedirs(os.path.join(output_dir, "completions"), exist_ok=True)
        self.path = os.path.join(output_dir, "completions", f"rank{rank}.jsonl")
        drop_steps_after(self.path, resume_step)

    def log(self, step: int, rows: list[dict], texts: list[str], outcome: list[float], thinking: list[float],
            rewards: list[float], gammas: list[float]) -> None:
        n = len(texts) // len(rows)
        with open(self.path, "a", encoding="utf-8") as f:
            for k, row in enumerate(rows):
                group = range(k * n, (k + 1) * n)
                f.write(json.dumps({"step": step, "problem_id": row["id"], "gamma": gammas[k],
                                    "completions": [texts[i] for i in group], "outcome": [outcome[i] for i in group],
                                    "thinking": [thinking[i] for i in group], "reward": [rewards[i] for i in group]},
                                   ensure_ascii=False) + "\n")
