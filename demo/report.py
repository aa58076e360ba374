"""summary.json and report.md (with PNG plots) for a tiny pipeline run made by train.py."""
import json
import os
import statistics


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def trm_figures(out: str) -> dict:
    """The judge's MAE / Spearman on held-out traces, against always predicting the training mean."""
    metrics = read_json(os.path.join(out, "step1", "eval", "metrics.json"))
    predictions = read_jsonl(os.path.join(out, "step1", "eval", "predictions.jsonl"))
    train_mean = statistics.fmean(row["score"] for row in read_jsonl(os.path.join(out, "step1", "trm_train.jsonl")))
    return {
        "trm_mae": metrics["mae"],
        "trm_mae_constant_baseline": statistics.fmean(abs(row["label"] - train_mean) for row in predictions),
        "trm_spearman": metrics["spearman"],
        "trm_pairwise_accuracy": metrics["pairwise_accuracy"],
        "trm_parse_failure_rate": metrics["parse_failure_rate"],
    }


def step2_figures(rows: list[dict]) -> dict:
    fifth = max(1, len(rows) // 5)
    first, last = rows[:fifth], rows[-fifth:]

    def mean(part, key):
        return statistics.fmean(r[key] for r in part)

    return {
        "outcome_reward_first": mean(first, "reward/outcome"),
        "outcome_reward_last": mean(last, "reward/outcome"),
        "thinking_reward_first": mean(first, "reward/thinking"),
        "thinking_reward_last": mean(last, "reward/thinking"),
        "response_length_first": mean(first, "completions/mean_length"),
        "response_length_last": mean(last, "completions/mean_length"),
        "gamma_mean": mean(rows, "trust/gamma_mean"),
        "frac_distrusted_mean": mean(rows, "trust/frac_distrusted"),
        "step2_steps": len(rows),
    }


def plot_training(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [
        ("rewards", [("reward/outcome", "outcome R^o"), ("reward/thinking", "thinking R^t"), ("reward", "final R")]),
        ("trust", [("trust/gamma_mean", "gamma (mean)"), ("trust/frac_distrusted", "groups with gamma < 1")]),
        ("KL to reference", [("kl", "k3 KL")]),
        ("entropy", [("entropy", "token entropy")]),
        ("response length (tokens)", [("completions/mean_length", "mean length")]),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (title, series) in zip(axes, panels):
        for key, label in series:
            axis.plot(steps, [r.get(key, float("nan")) for r in rows], label=label)
        axis.set(title=title, xlabel="step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_accuracy(before: dict, after: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(before["by_problem_type"])
    x = range(len(types) + 1)
    figure, axis = plt.subplots(figsize=(7, 3.2))
    for offset, (name, summary) in zip((-0.2, 0.2), (("before RL", before), ("after RL", after))):
        values = [summary["by_problem_type"][t]["score"] for t in types] + [summary["overall"]["score"]]
        axis.bar([i + offset for i in x], values, width=0.4, label=name)
    axis.set_xticks(list(x), types + ["overall"], fontsize=8)
    axis.set(ylabel="held-out score", title="step 3: held-out score per problem type", ylim=(0, 1))
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(out: str, seconds: dict) -> dict:
    """Write <out>/summary.json and <out>/report.md; returns the summary."""
    summary_path = os.path.join(out, "summary.json")
    previous = read_json(summary_path) if os.path.exists(summary_path) else {}
    stage_seconds = {**previous.get("stage_seconds", {}), **seconds}  # stages skipped this time keep their time
    summary = {"wall_seconds": round(sum(stage_seconds.values()), 1), "stage_seconds": stage_seconds}
    figures = []
    if os.path.exists(os.path.join(out, "step1", "eval", "metrics.json")):
        summary.update(trm_figures(out))
        if os.path.exists(os.path.join(out, "step1", "eval", "calibration.png")):
            figures.append(("TRM calibration on held-out traces", "step1/eval/calibration.png"))
    metrics_path = os.path.join(out, "step2", "metrics.jsonl")
    if os.path.exists(metrics_path):
        rows = read_jsonl(metrics_path)
        summary.update(step2_figures(rows))
        plot_training(rows, os.path.join(out, "training.png"))
        figures.append(("Step 2 training curves", "training.png"))
    before, after = (os.path.join(out, s, "summary.json") for s in ("step3_before", "step3_after"))
    if os.path.exists(before) and os.path.exists(after):
        before, after = read_json(before), read_json(after)
        summary["acc_before"], summary["acc_after"] = before["overall"]["score"], after["overall"]["score"]
        summary["acc_by_type_before"] = {t: v["score"] for t, v in before["by_problem_type"].items()}
        summary["acc_by_type_after"] = {t: v["score"] for t, v in after["by_problem_type"].items()}
        plot_accuracy(before, after, os.path.join(out, "accuracy.png"))
        figures.append(("Held-out score before and after Trust-GRPO", "accuracy.png"))
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)

    lines = ["# Tiny SophiaVL-R1 run", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in summary.items() if not isinstance(v, dict)]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in stage_seconds.items()), ""]
    for title, image in figures:
        lines += [f"## {title}", "", f"![{title}]({image})", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return summary
