"""docs/ablations.md from the runs of experiments/ablations.py: table, paired comparisons, plots, claim checks."""
import glob
import json
import os
import statistics
from collections import defaultdict

from sophiavl.demo.report import read_json, read_jsonl
from sophiavl.demo.trace_quality import sentences, think_text, think_words, trace_quality
from sophiavl.demo.trm_traces import read_reasoning
from sophiavl.utils.trust import CORRECT_THRESHOLD, trust_weight


def summarize_run(path: str, reasoning: dict) -> dict:
    """Per-step curves and end figures of one finished step-2 run (from its metrics and completion logs)."""
    metrics = read_jsonl(os.path.join(path, "metrics.jsonl"))
    per_step = defaultdict(lambda: defaultdict(list))
    applied, would_be = [], []  # gamma of mixed groups: applied by the run / computed from its rewards
    judged = []  # (R^t, true quality) of every completion: does the judge see what the generator knows?
    for file in sorted(glob.glob(os.path.join(path, "completions", "rank*.jsonl"))):
        for group in read_jsonl(file):
            step = per_step[group["step"]]
            quality = [trace_quality(c, reasoning[group["problem_id"]]) for c in group["completions"]]
            step["quality"] += quality
            step["words"] += [think_words(c) for c in group["completions"]]
            step["repeats"] += [repeats_a_step(c) for c in group["completions"]]
            step["trm"] += group["thinking"]
            judged += zip(group["thinking"], quality)
            outcome = group["outcome"]
            if min(outcome) < CORRECT_THRESHOLD <= max(outcome):
                applied.append(group["gamma"])
                would_be.append(trust_weight(outcome, group["thinking"]))
    steps = sorted(per_step)
    curves = {name: [statistics.fmean(per_step[s][name]) for s in steps]
              for name in ("quality", "words", "trm", "repeats")}
    return {
        "steps": steps, **curves,
        "acc_after": [m["eval/accuracy"] for m in metrics if "eval/accuracy" in m][-1],
        "mixed_groups": len(applied),
        "gamma_mixed_mean": statistics.fmean(applied) if applied else None,
        "frac_mixed_distrusted": statistics.fmean(g < 1 for g in applied) if applied else None,
        "would_be_frac_distrusted": statistics.fmean(g < 1 for g in would_be) if would_be else None,
        "trm_vs_quality": spearman(judged),
    }


def repeats_a_step(completion: str) -> bool:
    """A sentence said twice in the thinking: the flaw a hacked judge (trained on 1 - score) rewards most often."""
    written = sentences(think_text(completion))
    return len(set(written)) < len(written)


def spearman(pairs: list[tuple[float, float]]) -> float | None:
    import pandas

    frame = pandas.DataFrame(pairs, columns=["trm", "quality"])
    if len(frame) < 3 or frame["trm"].nunique() < 2 or frame["quality"].nunique() < 2:
        return None  # e.g. the GRPO baseline, whose R^t is 0 throughout
    return float(frame["trm"].rank().corr(frame["quality"].rank()))  # Pearson of the ranks (ties averaged)


def fifth(curve: list[float], last: bool) -> float:
    k = max(1, len(curve) // 5)
    return statistics.fmean(curve[-k:] if last else curve[:k])


def end_figures(run: dict) -> dict:
    return {"acc_after": run["acc_after"],
            "quality_first": fifth(run["quality"], False), "quality_last": fifth(run["quality"], True),
            "words_first": fifth(run["words"], False), "words_last": fifth(run["words"], True),
            "trm_first": fifth(run["trm"], False), "trm_last": fifth(run["trm"], True),
            "repeats_first": fifth(run["repeats"], False), "repeats_last": fifth(run["repeats"], True),
            "gamma_mixed_mean": run["gamma_mixed_mean"], "frac_mixed_distrusted": run["frac_mixed_distrusted"],
            "would_be_frac_distrusted": run["would_be_frac_distrusted"], "trm_vs_quality": run["trm_vs_quality"],
            "wall_seconds": run["wall_seconds"]}


def mean_std(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired(figures: dict, arm_a: str, arm_b: str, key: str) -> tuple[list[float], str]:
    """Per-seed differences a - b over the seeds both arms finished."""
    seeds = sorted(set(figures.get(arm_a, {})) & set(figures.get(arm_b, {})))
    diffs = [figures[arm_a][s][key] - figures[arm_b][s][key] for s in seeds]
    if not diffs:
        return [], "no paired seeds yet"
    wins = sum(d > 0 for d in diffs)
    return diffs, (f"{mean_std(diffs)} over {len(diffs)} seeds ({wins} of {len(diffs)} positive; "
                   f"per seed: {', '.join(f'{d:+.3f}' for d in diffs)})")


def plot(curves: dict, before: float, figures: dict, folder: str) -> list[str]:
    panels = (("quality", "true trace quality (F1 of steps)"), ("words", "thinking length (words)"),
              ("trm", "mean TRM score R^t (the arm's own TRM)"))
    return plot_runs(folder, curves, panels, "step (5-step moving mean over seeds)", figures, "acc_after",
                     before, f"before step 2: {before:.3f}", "held-out accuracy after step 2", smooth=5)


def plot_runs(folder: str, curves: dict, panels, xlabel: str, figures: dict, accuracy_key: str, baseline: float,
              baseline_label: str, ylabel: str, smooth: int = 1) -> list[str]:
    """curves.png: a panel per (key, title) of `panels`, each arm's per-step mean over its seeds (a `smooth`-step
    moving mean); accuracy.png: each arm's mean `accuracy_key` over its seeds (bars: their std) and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def moving_mean(values):
        return [statistics.fmean(values[max(0, i - smooth + 1):i + 1]) for i in range(len(values))]

    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
    for arm, runs in curves.items():
        steps = runs[0]["steps"]
        style = "--" if arm.endswith("/hacked") else ("-." if arm == "grpo" else "-")
        for ax, (key, _) in zip(axes, panels):
            mean = [statistics.fmean(run[key][i] for run in runs) for i in range(len(steps))]
            ax.plot(steps, moving_mean(mean), style, label=f"{arm} ({len(runs)} seeds)")
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    arms = list(figures)
    values = [[f[accuracy_key] for f in figures[a].values()] for a in arms]
    ax.bar(range(len(arms)), [statistics.fmean(v) for v in values],
           yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], capsize=4)
    ax.axhline(baseline, color="black", linestyle=":", label=baseline_label)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "accuracy.png"), dpi=110)
    plt.close(fig)
    return ["curves.png", "accuracy.png"]


def claims(figures: dict, arms: dict) -> list[str]:
    """The issue's three claims, checked on the numbers with the rules stated in each line."""
    def avg(arm, key):
        values = [f[key] for f in figures.get(arm, {}).values() if f[key] is not None]
        return statistics.fmean(values) if values else None

    def verdict(held):
        return "held" if held else "did not hold"

    lines = []
    if "grpo" in figures and "full" in figures:
        g0, g1, f0, f1 = (avg("grpo", "words_first"), avg("grpo", "words_last"), avg("full", "words_first"),
                          avg("full", "words_last"))
        lines.append(f"- **(a1) {verdict(g1 < 0.9 * g0)}**: with the outcome reward only, the thinking shrinks "
                     f"(rule: by > 10%). GRPO's thinking words, first -> last fifth of training: {g0:.2f} -> {g1:.2f}.")
        lines.append(f"- **(a2) {verdict(f1 >= 0.9 * f0)}**: the thinking reward keeps it (rule: full keeps >= 90% "
                     f"of its start). Full (trained TRM): {f0:.2f} -> {f1:.2f} words; its TRM score "
                     f"{avg('full', 'trm_first'):.3f} -> {avg('full', 'trm_last'):.3f}.")
    if all(arm in figures for arm in ("grpo", "wo-trust/hacked", "full/hacked")):
        distrusted = avg("full/hacked", "frac_mixed_distrusted")
        q = {arm: avg(arm, "quality_last") for arm in ("grpo", "wo-trust/hacked", "full/hacked")}
        lines.append(f"- **(b1) {verdict(distrusted > 0.5)}**: under the hacked TRM, Trust-GRPO's gamma < 1 in most "
                     f"mixed groups. It was < 1 in {distrusted:.0%} of them (mean gamma "
                     f"{avg('full/hacked', 'gamma_mixed_mean'):.3f}).")
        held = (q["wo-trust/hacked"] < q["grpo"]
                and abs(q["full/hacked"] - q["grpo"]) < abs(q["wo-trust/hacked"] - q["grpo"]))
        lines.append(f"- **(b2) {verdict(held)}**: full/hacked's final trace quality stays near GRPO's while "
                     f"wo-trust/hacked's falls below it (rule: the means in that order). GRPO {q['grpo']:.3f}, "
                     f"full/hacked {q['full/hacked']:.3f}, wo-trust/hacked {q['wo-trust/hacked']:.3f}. Paired, "
                     f"wo-trust/hacked - GRPO: {paired(figures, 'wo-trust/hacked', 'grpo', 'quality_last')[1]}; "
                     f"full/hacked - wo-trust/hacked: {paired(figures, 'full/hacked', 'wo-trust/hacked', 'quality_last')[1]}.")
    trained = [arm for arm in ("grpo", "wo-trained-trm", "wo-trust-and-annealing", "wo-trust", "full")
               if arm in figures]
    if len(trained) > 1:
        order = sorted(trained, key=lambda arm: -avg(arm, "acc_after"))
        beat = [arm for arm in trained if arm != "grpo" and avg(arm, "acc_after") > avg("grpo", "acc_after")]
        _, text = paired(figures, "full", "grpo", "acc_after")
        common = sorted(set.intersection(*(set(figures[arm]) for arm in trained)))
        like = {arm: statistics.fmean(figures[arm][s]["acc_after"] for s in common) for arm in trained}
        lines.append("- **(c)** held-out accuracy after step 2, best first: "
                     + ", ".join(f"{arm} {avg(arm, 'acc_after'):.3f}" for arm in order)
                     + f". Full is {'best' if order[0] == 'full' else 'not best'}; thinking-reward variants above the "
                       f"GRPO baseline: {', '.join(beat) or 'none'}. Full - GRPO, paired: {text}. Like for like, on "
                       f"the seeds every arm ran ({', '.join(map(str, common))}): "
                     + ", ".join(f"{arm} {like[arm]:.3f}" for arm in sorted(trained, key=lambda a: -like[a])) + ".")
    return lines


def write(out: str, doc: str, arms: dict, plan: list, run_dir, command: str, notes: str | None) -> dict:
    registry = os.path.join(out, "assets", "data", "dataset_info.json")
    reasoning = read_reasoning(registry, "tiny_train")
    seconds = read_json(os.path.join(out, "stage_seconds.json")) if os.path.exists(
        os.path.join(out, "stage_seconds.json")) else {}
    figures, curves = defaultdict(dict), defaultdict(list)
    for arm, seed in plan:
        path = run_dir(out, arm, seed)
        if not os.path.exists(os.path.join(path, "final", "config.json")):
            continue
        run = summarize_run(path, reasoning)
        run["wall_seconds"] = seconds.get(f"run_{os.path.basename(path)}")
        figures[arm][seed] = end_figures(run)
        curves[arm].append(run)
    before = read_json(os.path.join(out, "step3_before", "summary.json"))["overall"]["score"]
    folder = os.path.splitext(doc)[0]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "figures.json"), "w") as f:
        json.dump({"acc_before": before, "runs": figures, "stage_seconds": seconds}, f, indent=1)
    images = plot(curves, before, figures, folder) if figures else []

    total = sum(seconds.values())
    lines = ["# Table 3 in miniature: ablations and a hacked reward model on the tiny CPU job", "",
             f"Generated by `{command}` (experiments/ablations.py). Runs finished: "
             f"{sum(len(v) for v in figures.values())} of {len(plan)}. Total wall time of all stages on this 2-core "
             f"machine: {total / 60:.0f} min ({total:.0f} s).", "",
             "## Trained judges (held-out traces, scored against their true quality)", "",
             "| TRM condition | labels it was trained on | MAE | Spearman | pairwise acc. | parse failures |",
             "|---|---|---|---|---|---|"]
    for condition, labels in (("trained", "true"), ("hacked", "1 - true"), ("untrained", "shuffled")):
        path = os.path.join(out, f"trm_{condition}", "eval", "metrics.json")
        if os.path.exists(path):
            m = read_json(path)
            lines.append(f"| {condition} | {labels} | {m['mae']:.3f} | {m['spearman']:.3f} | "
                         f"{m['pairwise_accuracy']:.3f} | {m['parse_failure_rate']:.3f} |")
    lines += ["", f"## Results (mean ± std over seeds; held-out accuracy before step 2: {before:.3f})", "",
              "First / last: means over the first and last fifth of the training steps. Gamma: mixed groups only "
              "(both right and wrong answers, R^o >= 0.5 counts as right); 'would be' is the trust weight computed "
              "from the run's rewards, also for the arms that do not apply it. 'TRM ~ quality': Spearman correlation of the "
              "arm's R^t with the true trace quality over all its completions (how much the judge sees). 'Repeated step': share of completions that say a sentence of their "
              "thinking twice.", "",
              "| arm | variant | TRM | seeds | acc. after | trace quality first -> last | thinking words first -> last "
              "| repeated step first -> last "
              "| TRM score first -> last | TRM ~ quality | gamma (mixed) | gamma < 1 (mixed) | would be < 1 | s / run |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, runs in figures.items():
        f = list(runs.values())
        col = lambda key, digits=3: mean_std([x[key] for x in f], digits)  # noqa: E731
        variant, condition = arms[arm]
        lines.append(f"| {arm} | {variant} | {condition or '-'} | {len(f)} | {col('acc_after')} | "
                     f"{col('quality_first')} -> {col('quality_last')} | {col('words_first')} -> {col('words_last')} | "
                     f"{col('repeats_first')} -> {col('repeats_last')} | "
                     + (f"{col('trm_first')} -> {col('trm_last')} | {col('trm_vs_quality')} | {col('gamma_mixed_mean')} | "
                        f"{col('frac_mixed_distrusted')} | {col('would_be_frac_distrusted')} | " if condition else
                        "- | - | - | - | - | ")
                     + f"{col('wall_seconds', 0)} |")
    lines += ["", "## Paired comparisons (same seed = same prompts and sampling seed)", ""]
    for a, b, key in (("full", "grpo", "acc_after"), ("full", "grpo", "quality_last"), ("full", "grpo", "words_last"),
                      ("full/hacked", "wo-trust/hacked", "quality_last"), ("full/hacked", "grpo", "quality_last"),
                      ("wo-trust/hacked", "grpo", "quality_last"), ("full/hacked", "wo-trust/hacked", "acc_after")):
        lines.append(f"- {a} - {b}, {key}: {paired(figures, a, b, key)[1]}")
    lines += ["", "## The claims, checked", ""] + claims(figures, arms)
    lines += [""] + [f"![{name}]({os.path.basename(folder)}/{name})" for name in images]
    if notes and os.path.exists(notes):
        with open(notes) as f:
            lines += ["", f.read().strip()]
    replace_block(doc, "experiments/ablations.py", "\n".join(lines))
    return figures


def replace_block(doc: str, name: str, text: str) -> None:
    """Write `text` into `doc` between the lines <!-- begin NAME --> and <!-- end NAME --> (a new block at the end
    when there is none), leaving the rest of the doc, e.g. the hand-written sections around it, as it is."""
    begin, end = f"<!-- begin {name} (generated) -->", f"<!-- end {name} -->"
    old = open(doc).read() if os.path.exists(doc) else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    with open(doc, "w") as f:
        f.write(new)
