"""The second design's report (experiments/shortcut_ablations.py): judges, arms, paired comparisons, and each
pre-registered claim checked by its rule (docs/ablations.md, "Second design: pre-registration")."""
import glob
import json
import os
import statistics
from collections import defaultdict

from sophiavl.demo.report import read_json, read_jsonl
from sophiavl.demo.trace_quality import oracle_criteria, oracle_score
from sophiavl.demo.trm_traces import read_raw_rows
from sophiavl.utils.trust import CORRECT_THRESHOLD, trust_weight

from .ablations import ARMS
from .ablations_report import fifth, mean_std, paired, plot_runs, replace_block, spearman
from .annotated_trm import agreement

SHORTCUT_CLAIMS = {"background", "student"}  # the oracle's claims that state a shortcut (demo/shortcut_tasks.py)
# one-sided 5% critical values of Student's t by degrees of freedom (the paired test of each claim)
T_95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753}


def family(row: dict) -> str:
    return row["data_source"].split("/")[-1]


def uses_shortcut(completion: str, row: dict) -> bool:
    return bool(SHORTCUT_CLAIMS & set(oracle_criteria(completion, row)["claims"]))


def held_out_figures(step3_dir: str, raw: dict) -> dict:
    """Greedy held-out predictions (step 3): accuracy where the shortcut breaks and on the controls, shortcut use,
    the oracle's mean score, accuracy per family."""
    by_family = defaultdict(list)
    shortcut_rows = []
    for p in read_jsonl(os.path.join(step3_dir, "predictions.jsonl")):
        row = raw[p["id"]]
        by_family[family(row)].append((p["score"], oracle_score(p["prediction"], row)))
        if "shortcut" in row:
            shortcut_rows.append(uses_shortcut(p["prediction"], row))
    shortcut = [s for name, pairs in by_family.items() if name in ("tint", "hint_sum") for s, _ in pairs]
    control = [s for name, pairs in by_family.items() if name not in ("tint", "hint_sum") for s, _ in pairs]
    return {"acc_shortcut": statistics.fmean(shortcut), "acc_control": statistics.fmean(control),
            "heldout_shortcut_use": statistics.fmean(shortcut_rows),
            "heldout_quality": statistics.fmean(q for pairs in by_family.values() for _, q in pairs),
            **{f"acc_{name}": statistics.fmean(s for s, _ in pairs) for name, pairs in by_family.items()}}


def training_figures(run: str, raw: dict) -> dict:
    """From the completion logs: per-step curves (oracle score, shortcut use on shortcut prompts, R^t), gamma over
    mixed groups (applied, and as the run's rewards would give it), and the judge's Spearman with the oracle."""
    per_step = defaultdict(lambda: defaultdict(list))
    applied, would_be, judged = [], [], []
    for file in sorted(glob.glob(os.path.join(run, "completions", "rank*.jsonl"))):
        for group in read_jsonl(file):
            row, step = raw[group["problem_id"]], per_step[group["step"]]
            quality = [oracle_score(c, row) for c in group["completions"]]
            step["quality"] += quality
            step["trm"] += group["thinking"]
            if "shortcut" in row:
                step["shortcut"] += [uses_shortcut(c, row) for c in group["completions"]]
            judged += zip(group["thinking"], quality)
            if min(group["outcome"]) < CORRECT_THRESHOLD <= max(group["outcome"]):
                applied.append(group["gamma"])
                would_be.append(trust_weight(group["outcome"], group["thinking"]))
    steps = sorted(per_step)
    curves = {key: [statistics.fmean(per_step[s][key]) if per_step[s][key] else 0.0 for s in steps]
              for key in ("quality", "trm", "shortcut")}
    return {"steps": steps, **curves, "mixed_groups": len(applied),
            "gamma_mixed_mean": statistics.fmean(applied) if applied else None,
            "frac_mixed_distrusted": statistics.fmean(g < 1 for g in applied) if applied else None,
            "would_be_frac_distrusted": statistics.fmean(g < 1 for g in would_be) if would_be else None,
            "trm_vs_oracle": spearman(judged)}


def run_figures(run: str, raw: dict, seconds: dict) -> tuple[dict, dict]:
    curves = training_figures(run, raw)
    name = os.path.basename(run)
    figures = {**held_out_figures(os.path.join(run, "step3"), raw),
               **{f"{key}_{end}": fifth(curves[key], end == "last") for key in ("quality", "trm", "shortcut")
                  for end in ("first", "last")},
               **{key: curves[key] for key in ("gamma_mixed_mean", "frac_mixed_distrusted", "would_be_frac_distrusted",
                                               "trm_vs_oracle", "mixed_groups")},
               "wall_seconds": (seconds.get(f"run_{name}") or 0) + (seconds.get(f"eval_{name}") or 0)}
    return figures, curves


def paired_test(figures: dict, a: str, b: str, key: str) -> tuple[bool | None, str]:
    """The pre-registered rule: a - b > 0 by a one-sided paired t-test at 5% over the seeds both arms finished."""
    diffs, text = paired(figures, a, b, key)
    if len(diffs) < 2:
        return None, text
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    t = mean / (sd / len(diffs) ** 0.5) if sd > 0 else (float("inf") if mean > 0 else 0.0)
    critical = T_95.get(len(diffs) - 1, 1.645)
    return t > critical, f"{text}; t = {t:.2f} (needs > {critical:.3f})"


def verdict(held: bool | None) -> str:
    return "not tested (too few paired seeds)" if held is None else ("held" if held else "did not hold")


def claims(figures: dict, judges: dict) -> list[str]:
    def avg(arm, key):
        values = [f[key] for f in figures.get(arm, {}).values() if f.get(key) is not None]
        return statistics.fmean(values) if values else None

    lines = []
    for label, a, b, key, text in (
            ("C1", "full", "grpo", "acc_shortcut", "full Trust-GRPO answers better than GRPO where the shortcut breaks"),
            ("C2", "grpo", "full", "heldout_shortcut_use", "it uses the shortcut less on held-out rows"),
            ("C3", "full", "grpo", "quality_last", "its reasoning is truer in training (oracle score, last fifth)"),
            ("H2", "full/hacked", "wo-trust/hacked", "acc_shortcut", "under the hacked judge, trust keeps held-out "
                                                                     "accuracy above no-trust's"),
            ("H3", "full/hacked", "wo-trust/hacked", "quality_last", "under the hacked judge, trust keeps the reasoning "
                                                                     "truer than no-trust's"),
            ("H4", "grpo", "wo-trust/hacked", "quality_last", "without trust, the hacked judge makes the reasoning "
                                                              "worse than GRPO's")):
        if a in figures and b in figures:
            held, detail = paired_test(figures, a, b, key)
            lines.append(f"- **{label} {verdict(held)}**: {text} (rule: {a} - {b} in {key} > 0, one-sided paired "
                         f"t-test at 5%). {detail}.")
    if "full/hacked" in figures:
        distrusted = avg("full/hacked", "frac_mixed_distrusted")
        if distrusted is not None:
            lines.append(f"- **H1 {verdict(distrusted > 0.5)}**: under the hacked judge, gamma < 1 in most mixed groups "
                         f"(rule: > 50%, mean over seeds): {distrusted:.0%} (mean gamma "
                         f"{avg('full/hacked', 'gamma_mixed_mean'):.3f}).")
    variants = [arm for arm in ("full", "wo-trust", "wo-trust-and-annealing", "wo-trained-trm", "grpo") if arm in figures]
    if len(variants) > 2:
        common = sorted(set.intersection(*(set(figures[arm]) for arm in variants)))
        like = {arm: statistics.fmean(figures[arm][s]["acc_shortcut"] for s in common) for arm in variants}
        order = sorted(variants, key=lambda arm: -like[arm])
        lines.append(f"- **T3 {verdict(order[0] == 'full')}** (descriptive, {len(common)} seeds): Table 3's order, full "
                     f"first (rule: full has the highest mean held-out accuracy where the shortcut breaks on the seeds "
                     f"every variant ran): " + ", ".join(f"{arm} {like[arm]:.3f}" for arm in order) + ".")
    for condition, rule, held in (
            ("trained", "Spearman >= 0.5 and MAE below the constant's", lambda j: j["spearman"] >= 0.5
             and j["mae"] < j["constant_mae"]),
            ("hacked", "Spearman <= -0.5", lambda j: j["spearman"] <= -0.5),
            ("untrained", "|Spearman| < 0.2", lambda j: abs(j["spearman"]) < 0.2)):
        if condition in judges:
            j = judges[condition]
            lines.append(f"- **J-{condition} {verdict(held(j))}**: the {condition} judge on held-out policy samples "
                         f"(rule: {rule}): MAE {j['mae']:.3f} (constant {j['constant_mae']:.3f}), Spearman "
                         f"{j['spearman']:.3f}, pairwise {j['pairwise_accuracy']:.3f}.")
    return lines


def plot(curves: dict, figures: dict, before: dict, folder: str) -> list[str]:
    panels = (("quality", "oracle score of the completions"), ("shortcut", "shortcut use (shortcut-family prompts)"),
              ("trm", "TRM score R^t (the arm's own judge)"))
    return plot_runs(folder, curves, panels, "step (mean over seeds)", figures, "acc_shortcut",
                     before["acc_shortcut"], f"warm start: {before['acc_shortcut']:.3f}",
                     "held-out accuracy where the shortcut breaks")


def write(out: str, doc: str, plan: list, command: str) -> dict:
    """The report into `doc`'s block of this script (its plots and figures.json in <doc>/shortcuts/)."""
    from .ablations import run_dir

    raw = read_raw_rows(os.path.join(out, "assets", "data", "dataset_info.json"), "tiny_train,tiny_test")
    seconds = read_json(os.path.join(out, "stage_seconds.json")) if os.path.exists(
        os.path.join(out, "stage_seconds.json")) else {}
    before = held_out_figures(os.path.join(out, "step3_before"), raw)
    judges = {c: agreement(os.path.join(out, f"trm_{c}"), os.path.join(out, "rollouts", "heldout_labels.jsonl"))
              for c in ("trained", "hacked", "untrained")
              if os.path.exists(os.path.join(out, f"trm_{c}", "eval", "metrics.json"))}
    figures, curves = defaultdict(dict), defaultdict(list)
    for arm, seed in plan:
        path = run_dir(out, arm, seed)
        if os.path.exists(os.path.join(path, "step3", "summary.json")):
            figures[arm][seed], run_curves = run_figures(path, raw, seconds)
            curves[arm].append(run_curves)
    folder = os.path.join(os.path.splitext(doc)[0], "shortcuts")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "figures.json"), "w") as f:
        json.dump({"before": before, "judges": judges, "runs": figures, "stage_seconds": seconds}, f, indent=1)
    images = plot(curves, figures, before, folder) if figures else []
    total = sum(seconds.values())
    lines = ["## Second design: results", "",
             f"Generated by `{command}` (experiments/shortcut_ablations.py). Runs finished: "
             f"{sum(len(v) for v in figures.values())} of {len(plan)}. Wall time of all stages on this 2-core machine: "
             f"{total / 60:.0f} min ({total:.0f} s).", "",
             "### Judges (held-out policy samples of the source run, against the oracle's labels)", "",
             "| TRM | trained on | rows | MAE | constant's MAE | Spearman | pairwise acc. | parse failures |",
             "|---|---|---|---|---|---|---|---|"]
    for condition, labels in (("trained", "oracle labels"), ("hacked", "1 - oracle"), ("untrained", "shuffled")):
        if condition in judges:
            j = judges[condition]
            lines.append(f"| {condition} | {labels} ({j['train_rows']} rows) | {j['rows']} | {j['mae']:.3f} | "
                         f"{j['constant_mae']:.3f} | {j['spearman']:.3f} | {j['pairwise_accuracy']:.3f} | "
                         f"{j['parse_failure_rate']:.3f} |")
    lines += ["", f"### Arms (mean ± std over seeds). Warm start, held-out: accuracy where the shortcut breaks "
                  f"{before['acc_shortcut']:.3f}, controls {before['acc_control']:.3f}, shortcut use "
                  f"{before['heldout_shortcut_use']:.3f}", "",
              "Held-out: greedy, step 3 on the final policy. Shortcut use: completions that state a shortcut "
              "(the background's colour, the student's number) on the shortcut families' prompts. Oracle score: "
              "demo/trace_quality.py. First / last: the first and last fifth of the training steps. Gamma: mixed "
              "groups only; 'would be' from the run's own rewards.", "",
              "| arm | seeds | acc. shortcut split | acc. tint | acc. hint_sum | acc. controls | held-out shortcut use "
              "| oracle score first -> last | shortcut use first -> last | TRM score first -> last | TRM ~ oracle "
              "| gamma (mixed) | gamma < 1 (mixed) | would be < 1 | s / run |", "|" + "---|" * 15]
    for arm, runs in figures.items():
        f = list(runs.values())

        def col(key, digits=3):
            return mean_std([x.get(key) for x in f], digits)

        judge = ARMS[arm][1]
        lines.append(f"| {arm} | {len(f)} | {col('acc_shortcut')} | {col('acc_tint')} | {col('acc_hint_sum')} | "
                     f"{col('acc_control')} | {col('heldout_shortcut_use')} | {col('quality_first')} -> "
                     f"{col('quality_last')} | {col('shortcut_first')} -> {col('shortcut_last')} | "
                     + (f"{col('trm_first')} -> {col('trm_last')} | {col('trm_vs_oracle')} | {col('gamma_mixed_mean')} "
                        f"| {col('frac_mixed_distrusted')} | {col('would_be_frac_distrusted')} | " if judge else
                        "- | - | - | - | - | ") + f"{col('wall_seconds', 0)} |")
    lines += ["", "### The pre-registered claims, checked", ""] + claims(figures, judges)
    prefix = os.path.relpath(folder, os.path.dirname(os.path.abspath(doc)))
    lines += [""] + [f"![{name}]({prefix}/{name})" for name in images]
    replace_block(doc, "experiments/shortcut_ablations.py", "\n".join(lines))
    return figures
