"""Evaluation on ReasonMap / ReasonMap-Plus (§5.1, App. C) and a reward-density report.

    python eval.py --model DIR_OR_PATH --data FILE.jsonl --out report.json [--limit N]
    torchrun --standalone --nproc_per_node=N eval.py --model DIR --data FILE.jsonl --out report.json
    python eval.py --rescore report.answers.jsonl --out report.json    # no model: re-score saved answers
    python eval.py --compare A.json B.json                             # two reports side by side
    python eval.py --compare 7b+rewardmap report.json   # beside the paper's row: 3b, 3b+rewardmap, 7b, ..., all
    python eval.py --rescore report.answers.jsonl --out report.json --compare all   # the same, just scored
    python eval.py --rescore report.answers.jsonl --run runs/x --html report.html   # HTML report
    python eval.py --model DIR --data FILE.jsonl --out density.json --density 8 --limit 64

Greedy decoding, 2048 new tokens (§5.1). Every answer is written beside the report
(`<out minus .json>.answers.jsonl`, each line with the record it answers), so a run can be
re-scored after a fix to reward.py without the model. All parsing and scoring is reward.py's.

report.json (fractions in [0, 1]; the Markdown summary prints percentages):
- accuracy[type]: plain accuracy per question type (correct = correctness > 0).
- weighted_accuracy: ReasonMap-Plus (weight 1.0/1.5/2.0 by map difficulty, App. C.1) over all Plus
  types, Count and TorF; ReasonMap planning (weight 1 + 0.5q + 0.5m, RM §B.3), short and long
  templates (long = long1 + long2).
- map_score: ReasonMap-weighted mean map score (RM Alg. 2), short (max 20) and long (max 40).
- by_difficulty, by_transfers: the same split by map difficulty and by transfers (0/1/>=2).
TABLE1 names the paper's seven Table 1 columns in these terms; PAPER_TABLE1 holds the paper's
values for Qwen2.5-VL-3B/7B-Instruct with and without RewardMap (Tables 1 and 8). Where this
differs from the released evaluator: docs/deviations.md.

`--density K` samples K answers per question at temperature 1.0 and reports, per type and reward
mode, zero_std_frac (groups with no GRPO signal: §4.2's sparse reward) and mean |Â| (§4.1).
`--html OUT.html` renders the answers and/or a train.py run (`--run DIR`) as one page (report.py).
"""
import argparse
import json
import os
import sys

import report as report_mod
import data as data_mod
import reward

PLUS_COUNT = ("Counting1", "Counting2", "Counting3")
PLUS_TORF = ("TorF1", "TorF2")
PLUS_TYPES, TYPES = reward.PLUS_TYPES, reward.TYPES
DIFFICULTIES = reward.DIFFICULTIES
TRANSFER_BUCKETS = ("0", "1", ">=2")
# (name, compute_reward keywords, part) for --density. "correctness" alone is the sparse outcome
# reward; the format point is the paper's R_format (the release has none); then + detail (Alg. 1)
# and + the difficulty weight (§4.2).
REWARD_MODES = (
    ("correctness", dict(detail=False, difficulty_aware=False), "correctness"),
    ("format+correctness", dict(detail=False, difficulty_aware=False), "total"),
    ("+detail", dict(detail=True, difficulty_aware=False), "total"),
    ("+detail+weight", dict(detail=True, difficulty_aware=True), "total"),
)


# ---------------------------------------------------------------------------------------------
# Scoring one answer (reward.py does the work) and aggregating.

def template_kind(record):
    """'short' | 'long' for planning (long1 and long2 are both RM's long template), else None."""
    if record.get("type") != "planning":
        return None
    return "short" if (record.get("template") or "short") == "short" else "long"


def transfer_bucket(record):
    q = record.get("question_transfer_count")
    if q is None:
        return None
    return str(q) if q < 2 else ">=2"


def score_answer(record, response, truncated=False):
    """One answers.jsonl line: the record, the response, reward.py's parse and scores."""
    parts = reward.compute_reward(response, record)
    row = {
        "id": record["id"],
        "type": record["type"],
        "response": response,
        "truncated": bool(truncated),
        "parsed": reward.parse_answer(response, record),
        "reward": parts,
        "correct": parts["correctness"] > 0,
        "map_score": None,
        "map_score_max": None,
        "record": record,
    }
    if record["type"] == "planning":
        row["map_score"] = reward.map_score(response, record)
        row["map_score_max"] = reward.map_score_max(record)
    return row


def score_samples(record, responses):
    """A --density line: K sampled responses and their rewards under each reward mode."""
    return {
        "id": record["id"],
        "type": record["type"],
        "responses": list(responses),
        "rewards": {name: [reward.compute_reward(r, record, **kw)[part] for r in responses]
                    for name, kw, part in REWARD_MODES},
        "record": record,
    }


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _weighted(rows, weight_fn, value_fn):
    """Σ w·v / Σ w (App. C.1); None when there are no rows."""
    pairs = [(weight_fn(r["record"]), float(value_fn(r))) for r in rows]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else None


def _plus_acc(rows):
    return _weighted(rows, reward.plus_weight, lambda r: r["correct"])


def _rm_acc(rows):
    return _weighted(rows, reward.reasonmap_weight, lambda r: r["correct"])


def _rm_map(rows):
    return _weighted(rows, reward.reasonmap_weight, lambda r: r["map_score"])


def _planning_split(rows):
    short = [r for r in rows if template_kind(r["record"]) == "short"]
    long_ = [r for r in rows if template_kind(r["record"]) == "long"]
    return {
        "n_short": len(short), "n_long": len(long_),
        "accuracy_short": _mean(r["correct"] for r in short),
        "accuracy_long": _mean(r["correct"] for r in long_),
        "weighted_accuracy_short": _rm_acc(short), "weighted_accuracy_long": _rm_acc(long_),
        "map_score_short": _rm_map(short), "map_score_long": _rm_map(long_),
    }


def metrics(rows):
    """The report's metrics from scored answer rows (score_answer's output)."""
    by_type = {t: [r for r in rows if r["type"] == t] for t in TYPES}
    plus = [r for r in rows if r["type"] in PLUS_TYPES]
    plan = by_type["planning"]
    split = _planning_split(plan)
    report = {
        "n": len(rows),
        "count": {t: len(v) for t, v in by_type.items() if v},
        "accuracy": {t: _mean(r["correct"] for r in v) for t, v in by_type.items() if v},
        "format": {t: _mean(r["reward"]["format"] for r in v) for t, v in by_type.items() if v},
        "reward": {t: _mean(r["reward"]["total"] for r in v) for t, v in by_type.items() if v},
        "truncated_frac": _mean(r["truncated"] for r in rows),
        "weighted_accuracy": {
            "plus": _plus_acc(plus),
            "plus_count": _plus_acc([r for r in plus if r["type"] in PLUS_COUNT]),
            "plus_torf": _plus_acc([r for r in plus if r["type"] in PLUS_TORF]),
            "short": split["weighted_accuracy_short"],
            "long": split["weighted_accuracy_long"],
        },
        "map_score": {
            "short": split["map_score_short"], "long": split["map_score_long"],
            "short_max": max((r["map_score_max"] for r in plan
                              if template_kind(r["record"]) == "short"), default=None),
            "long_max": max((r["map_score_max"] for r in plan
                             if template_kind(r["record"]) == "long"), default=None),
        },
        "by_difficulty": {},
        "by_transfers": {},
    }
    for d in DIFFICULTIES:
        sub_plus = [r for r in plus if r["record"].get("difficulty_city") == d]
        sub_plan = [r for r in plan if r["record"].get("difficulty_city") == d]
        if sub_plus or sub_plan:
            report["by_difficulty"][d] = {
                "n_plus": len(sub_plus), "plus_accuracy": _mean(r["correct"] for r in sub_plus),
                "n_planning": len(sub_plan), **_planning_split(sub_plan)}
    for b in TRANSFER_BUCKETS:
        sub = [r for r in plan if transfer_bucket(r["record"]) == b]
        if sub:
            report["by_transfers"][b] = {"n": len(sub), **_planning_split(sub)}
    return report


def group_stats(rewards, group_size):
    """(zero_std, mean |advantage|) of one group; Â = r − mean(group), the paper's form (§4.1)."""
    # Plain Python on purpose: --rescore must run without torch. Matches
    # grpo.group_advantages(rewards, group_size, scale=False) for one group.
    assert len(rewards) == group_size, (len(rewards), group_size)
    mean = sum(rewards) / group_size
    zero_std = max(rewards) - min(rewards) <= 1e-9
    return zero_std, sum(abs(r - mean) for r in rewards) / group_size


def density_metrics(rows):
    """Per type (and 'all') and reward mode: groups, zero_std_frac, mean |advantage|, mean reward."""
    out = {}
    for t in TYPES + ("all",):
        sub = [r for r in rows if t == "all" or r["type"] == t]
        if not sub:
            continue
        out[t] = {}
        for name, _, _ in REWARD_MODES:
            stats = [group_stats(r["rewards"][name], len(r["rewards"][name])) for r in sub]
            out[t][name] = {
                "groups": len(sub),
                "zero_std_frac": _mean(z for z, _ in stats),
                "mean_abs_adv": _mean(a for _, a in stats),
                "mean_reward": _mean(x for r in sub for x in r["rewards"][name]),
            }
    return {"k": len(rows[0]["responses"]) if rows else 0, "density": out}


# ---------------------------------------------------------------------------------------------
# Markdown summaries.

def _pct(x):
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x):
    return "–" if x is None else f"{x:.2f}"


def _delta(a, b, scale=1.0):
    if a is None or b is None:
        return "–"
    return f"{scale * (b - a):+.2f}"


# The paper's Table 1 columns: ReasonMap weighted accuracy and weighted map score, short and long,
# then ReasonMap-Plus weighted accuracy, Count and TorF; "Plus All" pools every Plus question
# (Σ w·acc / Σ w over all five types). In the split table, "Plus Acc." by map difficulty is plain
# accuracy: within one difficulty the Plus weight is constant.
TABLE1 = (
    ("RM Acc. S", lambda r: r["weighted_accuracy"]["short"], 100),
    ("RM Acc. L", lambda r: r["weighted_accuracy"]["long"], 100),
    ("RM Map S", lambda r: r["map_score"]["short"], 1),
    ("RM Map L", lambda r: r["map_score"]["long"], 1),
    ("Plus Count", lambda r: r["weighted_accuracy"]["plus_count"], 100),
    ("Plus TorF", lambda r: r["weighted_accuracy"]["plus_torf"], 100),
    ("Plus All", lambda r: r["weighted_accuracy"]["plus"], 100),
)


# The paper's rows: percentages and map-score points as printed in Table 1 (7B; the 3B base model
# too) and Table 8 (3B + RewardMap), arXiv 2510.02240 v2, keyed by the names TABLE1 gives those
# columns (paper_markdown looks each value up by name; the paper prints Plus All before Count).
PAPER_COLUMNS = ("RM Acc. S", "RM Acc. L", "RM Map S", "RM Map L", "Plus Count", "Plus TorF", "Plus All")
PAPER_TABLE1 = {key: (model, table, dict(zip(PAPER_COLUMNS, values))) for key, model, table, values in (
    ("3b", "Qwen2.5-VL-3B-Instruct", "Tables 1, 8", (8.68, 7.99, 2.75, 3.70, 22.68, 53.16, 37.61)),
    ("3b+rewardmap", "Qwen2.5-VL-3B-Instruct + RewardMap", "Table 8",
     (19.36, 15.89, 4.79, 7.53, 63.58, 68.34, 65.91)),
    ("7b", "Qwen2.5-VL-7B-Instruct", "Table 1", (13.28, 7.12, 4.01, 5.74, 37.39, 51.32, 44.21)),
    ("7b+rewardmap", "Qwen2.5-VL-7B-Instruct + RewardMap", "Table 1",
     (31.51, 31.77, 6.21, 11.22, 72.18, 76.42, 74.25)),
)}


def _fmt(x, scale):
    return _pct(x) if scale == 100 else _num(x)


def paper_rows(names):
    """The PAPER_TABLE1 keys that --compare's arguments name ('all': every row), in table order."""
    keys = [n.lower() for n in names]
    return list(PAPER_TABLE1) if "all" in keys else [k for k in PAPER_TABLE1 if k in keys]


def paper_markdown(rows, report=None, name="ours"):
    """The paper's rows (PAPER_TABLE1 keys) in Table 1's columns, then a report's row, and for a
    single paper row the difference (ours − paper, in the printed units)."""
    cols = [c for c, _, _ in TABLE1]
    lines = ["| Model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key in rows:
        model, table, values = PAPER_TABLE1[key]
        lines.append(f"| {model} (paper, {table}) | " + " | ".join(f"{values[c]:.2f}" for c in cols) + " |")
    if report is not None:
        ours = {c: (None if f(report) is None else s * f(report)) for c, f, s in TABLE1}
        lines.append(f"| {name} | " + " | ".join(_num(ours[c]) for c in cols) + " |")
        if len(rows) == 1:
            paper = PAPER_TABLE1[rows[0]][2]
            lines.append("| Δ (ours − paper) | " + " | ".join(
                "–" if ours[c] is None else f"{ours[c] - paper[c]:+.2f}" for c in cols) + " |")
    return "\n".join(lines)


def markdown(report, name=None):
    name = name or report.get("model") or report.get("rescored_from") or "model"
    lines = ["| Model | " + " | ".join(c for c, _, _ in TABLE1) + " |",
             "|---|" + "---:|" * len(TABLE1),
             f"| {name} | " + " | ".join(_fmt(f(report), s) for _, f, s in TABLE1) + " |", ""]
    lines += ["| Type | n | Acc. | Format | Reward |", "|---|---:|---:|---:|---:|"]
    for t in TYPES:
        if t in report["accuracy"]:
            lines.append(f"| {t} | {report['count'][t]} | {_pct(report['accuracy'][t])} | "
                         f"{_pct(report['format'][t])} | {_num(report['reward'][t])} |")
    if report.get("truncated_frac"):
        lines.append(f"\n{_pct(report['truncated_frac'])}% of answers hit --max-new-tokens.")
    if report["by_difficulty"] or report["by_transfers"]:
        lines += ["", "| Split | Plus Acc. | RM Acc. S | RM Acc. L | RM Map S | RM Map L |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key, table in (("map", report["by_difficulty"]), ("transfers", report["by_transfers"])):
            for b, m in table.items():
                lines.append(f"| {key} {b} | {_pct(m.get('plus_accuracy'))} | "
                             f"{_pct(m['weighted_accuracy_short'])} | "
                             f"{_pct(m['weighted_accuracy_long'])} | "
                             f"{_num(m['map_score_short'])} | {_num(m['map_score_long'])} |")
    return "\n".join(lines)


def density_markdown(report):
    short = {"correctness": "C", "format+correctness": "F+C", "+detail": "+D", "+detail+weight": "+D+W"}
    names = [n for n, _, _ in REWARD_MODES]
    lines = [f"K = {report['k']} samples per question at temperature 1.0. zero-std: share of groups "
             "whose K rewards are all equal (no GRPO signal); abs-adv: mean |r - mean(group)|. "
             "C = correctness alone, F+C = + format, +D = + detail (Alg. 1), +W = x difficulty weight.",
             "",
             "| Type | Groups | " + " | ".join(f"zero-std {short[n]}" for n in names) + " | "
             + " | ".join(f"abs-adv {short[n]}" for n in names) + " |",
             "|---|---:|" + "---:|" * (2 * len(names))]
    for t, modes in report["density"].items():
        cells = ([f"{modes[n]['zero_std_frac']:.3f}" for n in names]
                 + [f"{modes[n]['mean_abs_adv']:.3f}" for n in names])
        lines.append(f"| {t} | {modes[names[0]]['groups']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_markdown(a, b, name_a="A", name_b="B"):
    """Two reports side by side: Table 1 columns, then per-type accuracy, with B − A deltas."""
    lines = ["| Metric | " + f"{name_a} | {name_b} | Δ |", "|---|---:|---:|---:|"]
    rows = [(c, f, s) for c, f, s in TABLE1]
    for t in TYPES:
        if t in a.get("accuracy", {}) or t in b.get("accuracy", {}):
            rows.append((f"Acc. {t}", lambda r, t=t: r.get("accuracy", {}).get(t), 100))
    for c, f, s in rows:
        va, vb = f(a), f(b)
        lines.append(f"| {c} | {_fmt(va, s)} | {_fmt(vb, s)} | {_delta(va, vb, s)} |")
    return "\n".join(lines)


def compare_density_markdown(a, b, name_a="A", name_b="B"):
    """Two --density reports: zero_std_frac per type and reward mode, with B − A deltas."""
    lines = [f"| Type | Mode | zero-std {name_a} | zero-std {name_b} | Δ |", "|---|---|---:|---:|---:|"]
    for t in TYPES + ("all",):
        for n, _, _ in REWARD_MODES:
            va = a["density"].get(t, {}).get(n, {}).get("zero_std_frac")
            vb = b["density"].get(t, {}).get(n, {}).get("zero_std_frac")
            if va is not None or vb is not None:
                lines.append(f"| {t} | {n} | {_num(va)} | {_num(vb)} | {_delta(va, vb)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# I/O.

def answers_path(out):
    base = out[:-5] if out.endswith(".json") else out
    return base + ".answers.jsonl"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_answers(path, data=None):
    """Saved answers; a line without its record takes it from --data by id (crafted answers)."""
    by_id = {}
    if data:
        by_id = {r["id"]: r for r in data_mod.load_records(data)}
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or ("response" not in row and "responses" not in row):
                raise ValueError(f"{path}:{n}: an answer line needs 'response' or 'responses'")
            record = row.get("record") or by_id.get(row.get("id"))
            if record is None:
                raise ValueError(f"{path}:{n}: no record for id {row.get('id')!r} "
                                 "(the line has none; pass --data FILE.jsonl)")
            rows.append((record, row))
    return rows


def rescore(path, data=None):
    """Re-run reward.py on saved responses; returns (report, rows)."""
    pairs = read_answers(path, data)
    dense = ["responses" in row for _, row in pairs]
    if any(dense) and not all(dense):
        raise ValueError(f"{path}: mixes --density lines ('responses') with answer lines ('response')")
    if pairs and all(dense):
        rows = [score_samples(rec, row["responses"]) for rec, row in pairs]
        return density_metrics(rows), rows
    rows = [score_answer(rec, row["response"], row.get("truncated", False)) for rec, row in pairs]
    return metrics(rows), rows


def save(out, report, rows):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_jsonl(answers_path(out), rows)
    report["answers"] = os.path.basename(answers_path(out))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)


def figure_source(args):
    """The data file that answer records' figures are relative to: --data, else the one named by
    the report saved beside the answers (eval.py writes X.json beside X.answers.jsonl)."""
    if args.data or not args.rescore or not args.rescore.endswith(".answers.jsonl"):
        return args.data
    beside = args.rescore[:-len(".answers.jsonl")] + ".json"
    if not os.path.exists(beside):
        return None
    with open(beside, encoding="utf-8") as f:
        return json.load(f).get("data")


def write_html(args, report, rows):
    """--html: the answers (if any), each re-explained by reward.explain, and the --run folder."""
    source = figure_source(args)
    groups = [report_mod.group(row["record"],
                               row["responses"] if "responses" in row else [row["response"]],
                               truncated=None if "responses" in row else [row["truncated"]],
                               figure=data_figure(row["record"], source))
              for row in rows or ()]
    if report is None:
        summary, note = (), ""
    elif "density" in report:
        summary = [(f"zero-std {t}", _num(modes["+detail+weight"]["zero_std_frac"]))
                   for t, modes in report["density"].items()]
        note = (f"Share of groups whose K = {report['k']} rewards (the full reward, + detail + "
                "weight) are all equal: no GRPO signal. The other reward modes are in the JSON.")
    else:
        summary = [("questions", str(report["n"]))] + [(c, _fmt(f(report), s)) for c, f, s in TABLE1]
        note = ("RM: ReasonMap route planning, weighted accuracy % (RM §B.3) and map score "
                "(RM Alg. 2), short / long template; Plus: ReasonMap-Plus weighted accuracy % "
                "(App. C.1). The paper's Table 1 columns.")
    name = args.rescore or args.model
    return report_mod.write(args.html, run=args.run, eval_groups=groups, summary=summary,
                            summary_note=note, title=name and f"evaluation {name}",
                            per_type=args.html_questions)


def data_figure(record, source):
    if not record.get("figure"):
        return None
    return data_mod.figure_path(record, source) if source else record["figure"]


def load_report(path):
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if not isinstance(report, dict) or not ("weighted_accuracy" in report or "density" in report):
        raise ValueError(f"{path}: not an eval.py report (no 'weighted_accuracy' or 'density')")
    return report


# ---------------------------------------------------------------------------------------------
# The model path: shard, batch by map, generate, gather to rank 0.

def shard(records, rank, world):
    """Contiguous slices of the figure-sorted list: a rank meets each of its maps in one run."""
    order = sorted(range(len(records)), key=lambda i: (records[i]["figure"], i))
    lo, hi = rank * len(order) // world, (rank + 1) * len(order) // world
    return [(i, records[i]) for i in order[lo:hi]]


def run_model(args):
    """Generate on this rank's shard; rank 0 returns (report, rows), other ranks (None, None)."""
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    import model as model_mod

    rank, world, device = model_mod.init_distributed()
    torch.manual_seed(args.seed + rank)
    records = data_mod.load_records(args.data)
    if args.limit:
        records = records[:args.limit]
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    # --max-pixels reaches the processor only when given: the tiny model keeps its own small limit.
    model, processor = model_mod.load(args.model, device=device, dtype=dtype,
                                      max_pixels=args.max_pixels)
    model.eval()
    k = args.density or 1
    mine = shard(records, rank, world)
    rows, image, image_path = [], None, None
    # rank 0 only, and only on a terminal (disable=None): a redirected log gets no bar lines
    bar = tqdm(total=len(mine), disable=True if rank else None, desc=f"eval x{world} ranks", unit="q")
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        images = []
        for _, rec in batch:
            path = data_mod.figure_path(rec, args.data)
            if path != image_path:  # sorted by map: each map is read once per rank
                image, image_path = data_mod.load_image(path, args.max_pixels or data_mod.PAPER_MAX_PIXELS), path
            images.append(image)
        with torch.no_grad():
            out = model_mod.generate(model, processor, [r["question"] for _, r in batch], images,
                                     num_samples=k, max_new_tokens=args.max_new_tokens,
                                     greedy=not args.density, temperature=1.0)
        for j, (i, rec) in enumerate(batch):
            texts = out.texts[j * k:(j + 1) * k]  # question-major
            if args.density:
                rows.append((i, score_samples(rec, texts)))
            else:
                rows.append((i, score_answer(rec, texts[0], bool(out.truncated[j]))))
        bar.update(len(batch))
    bar.close()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
        model_mod.close_distributed()
    if rank != 0:
        return None, None
    rows = [row for _, row in sorted(rows, key=lambda p: p[0])]
    report = density_metrics(rows) if args.density else metrics(rows)
    return report, rows


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # What to evaluate
    p.add_argument("--model", help="local Qwen2.5-VL folder, a train.py checkpoint, or 'tiny'")
    p.add_argument("--data", help="records JSONL (data.py)")
    p.add_argument("--out", help="report.json; answers go to report.answers.jsonl beside it")
    p.add_argument("--limit", type=int, default=0, help="first N records only (default 0: all)")
    # Decoding (§5.1: greedy, 2048 new tokens)
    p.add_argument("--max-new-tokens", type=int, default=2048, help="default %(default)s, §5.1")
    p.add_argument("--batch-size", type=int, default=8,
                   help="questions per generate call (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image pixel budget (default the processor's own: Qwen2.5-VL's "
                        f"{data_mod.PAPER_MAX_PIXELS:,}, the paper's; the tiny model's own with --model tiny)")
    p.add_argument("--density", type=int, default=0, metavar="K",
                   help="sample K answers per question (temperature 1.0): reward-density report")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --density (default %(default)s)")
    # No model: saved answers and reports
    p.add_argument("--rescore", metavar="ANSWERS", help="re-score saved answers; no model")
    p.add_argument("--compare", nargs="+", metavar="A",
                   help="A.json B.json: two reports side by side; ROW [REPORT.json]: a report (or the "
                        "one --rescore / --model just made) beside the paper's Table 1 row ROW: "
                        + ", ".join(PAPER_TABLE1) + " or all")
    # The HTML report (report.py)
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML report")
    p.add_argument("--run", metavar="DIR", help="a train.py --out folder to include in --html")
    p.add_argument("--html-questions", type=int, default=report_mod.PER_TYPE, metavar="N",
                   help="questions shown per type and source in --html (default %(default)s)")
    args = p.parse_args(argv)

    paper = paper_rows(args.compare or ())
    others = [x for x in args.compare or () if x.lower() not in PAPER_TABLE1 and x.lower() != "all"]
    if args.compare and not paper:
        if len(args.compare) != 2:
            p.error("--compare needs two reports, or a paper row (" + ", ".join(PAPER_TABLE1)
                    + ", all) and at most one report")
        a, b = (load_report(x) for x in args.compare)
        names = [os.path.basename(x) for x in args.compare]
        if ("density" in a) != ("density" in b):
            p.error("--compare needs two evaluation reports or two --density reports")
        print((compare_density_markdown if "density" in a else compare_markdown)(a, b, *names))
        return 0
    if paper and (len(others) > 1 or (others and (args.rescore or args.model))):
        p.error("--compare ROW takes one report: REPORT.json, or the one --rescore / --model makes")
    if paper and not (others or args.rescore or args.model):
        print(paper_markdown(paper))
        return 0
    if others:
        report = load_report(others[0])
        if "density" in report:
            p.error(f"--compare {args.compare[0]}: {others[0]} is a --density report, not Table 1's")
        print(paper_markdown(paper, report, os.path.basename(others[0])))
        return 0
    if args.density < 0 or args.density == 1:
        p.error("--density K needs K >= 2 (a group of one has no spread)")
    if args.limit < 0:
        p.error("--limit must be >= 0")
    if args.run and not args.html:
        p.error("--run is for --html")
    if args.html_questions < 0:
        p.error("--html-questions must be >= 0")
    report = rows = None
    if args.rescore:
        if not (args.out or args.html):
            p.error("--rescore needs --out or --html")
        report, rows = rescore(args.rescore, args.data)
        report["rescored_from"] = args.rescore
    elif args.model or args.out or not (args.html and args.run):
        if not (args.model and args.data and args.out):
            p.error("--model, --data and --out are required (or --rescore / --compare / --html --run)")
        report, rows = run_model(args)
        if report is None:  # not rank 0
            return 0
        report.update(model=args.model, data=args.data, max_new_tokens=args.max_new_tokens,
                      limit=args.limit)
    if args.out:
        save(args.out, report, rows)
        print(density_markdown(report) if "density" in report else markdown(report))
        print(f"\nwrote {args.out} and {answers_path(args.out)}")
    if args.html:
        print(f"wrote {write_html(args, report, rows)}")
    if paper and report is not None:
        print("\n" + ("--compare: a --density report has no Table 1 columns" if "density" in report
                      else paper_markdown(paper, report, os.path.basename(args.out or args.rescore))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
