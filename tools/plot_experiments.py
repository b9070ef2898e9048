"""Summary table and one plot for the ablation sweep of tools/experiments.sh (§5.4 at laptop scale,
docs/experiments.md).

    python tools/plot_experiments.py runs/exp --md runs/exp/table.md --png runs/exp/experiments.png

Reads OUT/runs/<config>/seed<S>/{metrics.jsonl, eval.json, wall.json} (train.py, eval.py and
experiments.sh write them) and OUT/runs/untrained/{eval,density}.json. Prints Markdown tables, mean ± sample
standard deviation over seeds (n in the table); writes the PNG when matplotlib is installed (an
optional extra for this script only: `pip install matplotlib`; nothing else imports it).
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reward import TYPES  # noqa: E402  (after the repository root is on the path)

ORDER = ("default", "fc", "fc_detail", "none", "reverse", "coarse", "alpha0.3", "alpha0.7", "advscale")
LABEL = {
    "default": "default: rewardmap, α 0.5, detail + difficulty, centred Â",
    "fc": "reward: format + correctness",
    "fc_detail": "reward: + detail (no difficulty weight)",
    "none": "curriculum: none (one shuffled stage)",
    "reverse": "curriculum: reverse",
    "coarse": "curriculum: coarse (Plus → planning)",
    "alpha0.3": "α = 0.3",
    "alpha0.7": "α = 0.7",
    "advscale": "advantage: std-scaled (release)",
}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_runs(out):
    """{config: [run, ...]} with run = {seed, rows, eval, wall} for every finished run."""
    runs = {}
    for d in sorted(glob.glob(os.path.join(out, "runs", "*", "seed*"))):
        metrics, ev = os.path.join(d, "metrics.jsonl"), os.path.join(d, "eval.json")
        if not (os.path.exists(metrics) and os.path.exists(ev)):
            continue
        wall_path = os.path.join(d, "wall.json")
        wall = json.load(open(wall_path)) if os.path.exists(wall_path) else {}
        name = os.path.basename(os.path.dirname(d))
        runs.setdefault(name, []).append({"seed": int(os.path.basename(d)[4:]), "rows": read_jsonl(metrics),
                                          "eval": json.load(open(ev)), "wall": wall})
    return runs


def mean_of(rows, key):
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(run):
    """One run's numbers. Train numbers are means over steps (every step has 8 questions x K)."""
    rows, ev = run["rows"], run["eval"]
    # stage labels are "N:Type+Type"; per-type zero-std exists only where a stage holds those types alone
    types_of = lambda r: set(r["stage"].split(":", 1)[-1].split("+"))
    planning_steps = [r for r in rows if types_of(r) == {"planning"}]
    torf_steps = [r for r in rows if types_of(r) <= {"TorF1", "TorF2"}]
    s = {
        "train_reward": mean_of(rows, "reward"),
        "train_acc": mean_of(rows, "accuracy"),
        "zsf": mean_of(rows, "zero_std_frac"),
        "zsf_torf": mean_of(torf_steps, "zero_std_frac"),
        "zsf_planning": mean_of(planning_steps, "zero_std_frac"),
        "eval_torf": ev["weighted_accuracy"]["plus_torf"],
        "eval_count": ev["weighted_accuracy"]["plus_count"],
        "eval_plus": ev["weighted_accuracy"]["plus"],
        "eval_planning_format": ev["format"].get("planning", float("nan")),
        "eval_reward_planning": ev["reward"].get("planning", float("nan")),
        "train_s": run["wall"].get("train_s", sum(r.get("time/step", 0.0) for r in rows)),
        "steps": len(rows),
    }
    for t in TYPES:
        s[f"acc/{t}"] = mean_of(rows, f"acc/{t}")
        s[f"eval_acc/{t}"] = ev["accuracy"].get(t, float("nan"))
    return s


def fmt(vals, scale=1.0, digits=2):
    vals = [v * scale for v in vals if not math.isnan(v)]
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def tables(runs, untrained=None):
    names = [n for n in ORDER if n in runs] + sorted(n for n in runs if n not in ORDER)
    summ = {n: [summarise(r) for r in runs[n]] for n in names}
    col = lambda n, key, scale=1.0, digits=2: fmt([s[key] for s in summ[n]], scale, digits)
    out = []
    out.append("| config | seeds | train reward | train acc % | zero-std all | zero-std TorF stage "
               "| zero-std planning stage | eval TorF % | eval Count % | eval Plus % "
               "| eval planning format % | eval planning reward | train s |")
    out.append("|---|---|" + "---:|" * 11)
    for n in names:
        seeds = ",".join(str(r["seed"]) for r in runs[n])
        out.append(f"| {LABEL.get(n, n)} | {seeds} | {col(n, 'train_reward')} | {col(n, 'train_acc', 100, 1)} "
                   f"| {col(n, 'zsf')} | {col(n, 'zsf_torf')} | {col(n, 'zsf_planning')} "
                   f"| {col(n, 'eval_torf', 100, 1)} | {col(n, 'eval_count', 100, 1)} "
                   f"| {col(n, 'eval_plus', 100, 1)} | {col(n, 'eval_planning_format', 100, 1)} "
                   f"| {col(n, 'eval_reward_planning')} | {col(n, 'train_s', 1, 0)} |")
    if untrained:
        wa = untrained["weighted_accuracy"]
        out.append(f"| untrained tiny model (same init) | – | – | – | – | – | – | {100 * wa['plus_torf']:.1f} "
                   f"| {100 * wa['plus_count']:.1f} | {100 * wa['plus']:.1f} "
                   f"| {100 * untrained['format'].get('planning', float('nan')):.1f} "
                   f"| {untrained['reward'].get('planning', float('nan')):.2f} | – |")
    out.append("")
    out.append("Training accuracy per type (% of the K=8 samples correct, mean over the steps that hold "
               "the type), then greedy test accuracy per type:")
    out.append("")
    out.append("| config | " + " | ".join(TYPES) + " | " + " | ".join(f"test {t}" for t in TYPES) + " |")
    out.append("|---|" + "---:|" * (2 * len(TYPES)))
    for n in names:
        cells = [col(n, f"acc/{t}", 100, 1) for t in TYPES] + [col(n, f"eval_acc/{t}", 100, 1) for t in TYPES]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n", summ


def stage_table(runs, name="default"):
    """Per-stage means of one config (the curriculum's own stages, in order)."""
    if name not in runs:
        return ""
    stages = []
    for r in runs[name][0]["rows"]:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    out = [f"Per stage, config `{name}` (mean ± sd over seeds of each run's stage mean):", "",
           "| stage | steps | reward | format | detail | accuracy % | zero-std frac |", "|---|---:|---:|---:|---:|---:|---:|"]
    for st in stages:
        per = [[r for r in run["rows"] if r["stage"] == st] for run in runs[name]]
        cell = lambda key, scale=1.0, d=2: fmt([mean_of(p, key) for p in per], scale, d)
        out.append(f"| {st} | {len(per[0])} | {cell('reward')} | {cell('format')} | {cell('detail')} | {cell('accuracy', 100, 1)} "
                   f"| {cell('zero_std_frac')} |")
    return "\n".join(out) + "\n"


def density_table(report):
    """eval.py --density at the untrained init: zero-std share per type under each reward mode."""
    modes = ("correctness", "format+correctness", "+detail", "+detail+weight")
    out = [f"Reward density at the untrained init (eval.py --density {report['k']}: the same samples scored "
           "by each reward; zero-std = share of groups with no GRPO signal, abs-adv = mean |r - group mean|):", "",
           "| type | groups | " + " | ".join(f"zero-std {m}" for m in modes) + " | "
           + " | ".join(f"abs-adv {m}" for m in modes) + " |", "|---|" + "---:|" * 9]
    for t, per in report["density"].items():
        groups = next(iter(per.values()))["groups"]
        out.append(f"| {t} | {groups} | " + " | ".join(f"{per[m]['zero_std_frac']:.3f}" for m in modes) + " | "
                   + " | ".join(f"{per[m]['mean_abs_adv']:.3f}" for m in modes) + " |")
    return "\n".join(out) + "\n"


def curve(runs, name, key):
    """(steps, mean over seeds, min, max) of a metrics key."""
    per = [[r.get(key, float("nan")) for r in run["rows"]] for run in runs[name]]
    n = min(len(p) for p in per)
    cols = [[p[i] for p in per] for i in range(n)]
    return (list(range(1, n + 1)), [statistics.fmean(c) for c in cols], [min(c) for c in cols],
            [max(c) for c in cols])


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    groups = [("reward", ("default", "fc_detail", "fc")), ("curriculum", ("default", "none", "reverse", "coarse"))]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for j, (title, names) in enumerate(groups):
        for i, key in enumerate(("reward", "zero_std_frac")):
            ax = axes[i][j]
            for n in names:
                if n not in runs:
                    continue
                x, m, lo, hi = curve(runs, n, key)
                line, = ax.plot(x, m, label=f"{n} (n={len(runs[n])})", lw=1.5)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
            ax.set_title(f"{title} ablation: {key}" + (" (train reward of each config's own reward)"
                                                         if key == "reward" and title == "reward" else ""),
                         fontsize=9)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("step (8 questions x 8 samples)")
            ax.legend(fontsize=7)
    # stage boundaries of the default (rewardmap) schedule
    if "default" in runs:
        rows = runs["default"][0]["rows"]
        cuts = [r["step"] - 0.5 for a, r in zip(rows, rows[1:]) if r["stage"] != a["stage"]]
        for ax in axes[:, 0]:
            for c in cuts:
                ax.axvline(c, color="grey", ls=":", lw=0.8)
    fig.suptitle("Tiny random Qwen2.5-VL, synthetic maps: mean over seeds, band = min..max "
                 "(dotted: rewardmap stage boundaries)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the folder tools/experiments.sh wrote")
    p.add_argument("--md", help="write the tables here too")
    p.add_argument("--png", help="write the plot here")
    args = p.parse_args(argv)
    runs = load_runs(args.out)
    if not runs:
        raise SystemExit(f"{args.out}: no finished run (want runs/<config>/seed<S>/metrics.jsonl + eval.json)")
    un_path = os.path.join(args.out, "runs", "untrained", "eval.json")
    untrained = json.load(open(un_path)) if os.path.exists(un_path) else None
    text, _ = tables(runs, untrained)
    for name in ("default", "fc", "fc_detail"):
        text += "\n" + stage_table(runs, name)
    dens_path = os.path.join(args.out, "runs", "untrained", "density.json")
    if os.path.exists(dens_path):
        text += "\n" + density_table(json.load(open(dens_path)))
    print(text)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text)
    if args.png and plot(runs, args.png):
        print(f"wrote {args.png} ({os.path.getsize(args.png) // 1024} KB)")


if __name__ == "__main__":
    main()
