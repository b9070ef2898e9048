"""An HTML report of a training run and/or an evaluation: what the model answered, what each
answer scored, and which line of Alg. 1 (§4.2) gave or took the points.

    python train.py          # the quick start ends by writing runs/quickstart/report.html
    python eval.py --rescore runs/quickstart/eval.answers.jsonl --run runs/quickstart \\
        --html runs/quickstart/report.html           # an evaluation and the run, no model needed
    python eval.py --run runs/quickstart --html report.html                      # a run alone

One self-contained file that a browser opens offline: curves are inline SVG, maps are downscaled
thumbnails embedded as data: URIs (each map once, as a CSS class), no JavaScript, no external
resource. All model and record text goes through html.escape, so an answer holding "<script>" is
shown as text. What is embedded is capped (questions per type, characters per answer), and the
page says so.

Imports reward and data only (no torch): train.py (rank 0, at the end of a run) and eval.py
(--html) both render through here; nothing here imports train or eval.

samples.jsonl (train.py --log-samples N) holds one line per logged group, made by group():
    {"step", "stage", "id", "type", "question", "gold", "figure", "difficulty_city",
     "samples": [{"text", "truncated", "advantage", "format", "correctness", "detail",
                  "weight", "total", "trace": [[points, reason], ...]}, ...]}   # the K completions
"figure" is relative to the run folder (the quick start's maps live inside it).
"""
import base64
import html
import io
import json
import math
import os

import data
import reward

PER_TYPE = 3                    # questions shown per type and source
MAX_TEXT = 4000                 # characters of one answer shown; the rest is counted, not embedded
THUMB_SIDE = 480                # map thumbnails: at most THUMB_SIDE² pixels, aspect ratio kept
# (metrics.jsonl key, chart title, True for a share in [0, 1]: drawn on a fixed 0..1 axis)
CURVES = (("reward", "reward (total, mean over samples)", False), ("format", "format", True),
          ("accuracy", "accuracy", True), ("zero_std_frac", "zero_std_frac: groups with no signal", True))


# ---------------------------------------------------------------------------------------------
# Inputs: one question with its answers ("a group"), from a run or from an evaluation.

def group(record, texts, *, figure=None, step=None, stage=None, advantages=None, truncated=None,
          reward_kw=None):
    """A question and its answers, each with reward.explain's parts and Alg. 1 trace: a line of
    samples.jsonl (train.py --log-samples) or a question of an evaluation (eval.py --html)."""
    samples = []
    for i, text in enumerate(texts):
        sample = {"text": text, "truncated": bool(truncated[i]) if truncated is not None else False,
                  "advantage": None if advantages is None else float(advantages[i])}
        sample.update(reward.explain(text, record, **(reward_kw or {})))
        samples.append(sample)
    planning_without_route = record["type"] == "planning" and not record.get("routes")
    return {"step": step, "stage": stage, "id": record["id"], "type": record["type"],
            "question": record.get("question"),
            "gold": None if planning_without_route else data.gold_answer(record),
            "figure": figure, "difficulty_city": record.get("difficulty_city"), "samples": samples}


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return rows


def load_run(run_dir):
    """(metrics rows, logged groups with absolute figure paths, config) of a train.py folder."""
    def read(name):
        path = os.path.join(run_dir, name)
        return read_jsonl(path) if os.path.exists(path) else []
    metrics, groups = read("metrics.jsonl"), read("samples.jsonl")
    if not metrics and not groups:
        raise ValueError(f"{run_dir}: no metrics.jsonl or samples.jsonl (not a train.py --out folder?)")
    for g in groups:
        if g.get("figure"):
            g["figure"] = os.path.join(run_dir, g["figure"])
    config = {}
    if os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    return metrics, groups, config


def _pick(groups, per_type, last):
    """Up to per_type groups of each type: the last ones logged (a run: where training ended), or
    the first ones in file order, one per map before a second from the same map (an evaluation)."""
    shown = []
    for t in reward.TYPES:
        of_type = [g for g in groups if g["type"] == t]
        if last:
            shown += of_type[max(len(of_type) - per_type, 0):]
            continue
        per_map, rank = {}, []               # rank: how many of this map's questions came before
        for g in of_type:
            rank.append(per_map.get(g.get("figure"), 0))
            per_map[g.get("figure")] = rank[-1] + 1
        order = sorted(range(len(of_type)), key=lambda i: (rank[i], i))[:per_type]
        shown += [of_type[i] for i in sorted(order)]
    return shown


# ---------------------------------------------------------------------------------------------
# Small pieces.

# C0 control characters (but tab and newline) and DEL, which random models emit, shown as their
# Unicode control pictures (U+241A for U+001A): visible, and no control character in the HTML.
_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n"} | {0x7F: 0x2421}


def esc(x):
    return html.escape(str(x).translate(_CONTROL), quote=True)


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x, fmt="{:.2f}"):
    return fmt.format(x) if _finite(x) else "–"


def _pct(x):
    return _num(100 * x if _finite(x) else None, "{:.1f} %")


def _mean(xs):
    xs = [x for x in xs if _finite(x)]
    return sum(xs) / len(xs) if xs else None


def _table(head, rows, cls=""):
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</tbody></table>"


def _thumbnail(path):
    """(data: URI, width, height) of a downscaled map, or None when it cannot be read."""
    try:
        image = data.load_image(path, max_pixels=THUMB_SIDE * THUMB_SIDE)
    except (OSError, ValueError):
        return None
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), *image.size


# ---------------------------------------------------------------------------------------------
# Training curves (inline SVG) and per-stage means.

def _stages(metrics):
    """[(stage, first step, last step, rows)] for each contiguous run of one stage label."""
    out = []
    for row in metrics:
        if out and out[-1][0] == row.get("stage"):
            out[-1][2], out[-1][3] = row["step"], out[-1][3] + [row]
        else:
            out.append([row.get("stage"), row["step"], row["step"], [row]])
    return out


def _nice(x):
    """The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) >= x > 0: an axis end."""
    scale = 10.0 ** math.floor(math.log10(x))
    return next(m * scale for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * scale >= x * (1 - 1e-9))


def _chart(metrics, key, title, share, width=560, height=180):
    points = [(r["step"], r[key]) for r in metrics if _finite(r.get(key))]
    if not points:
        return ""
    left, right, top, bottom = 46, 10, 30, 22
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if share and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = (-_nice(-lo) if lo < 0 else 0.0), (_nice(hi) if hi > 0 else 0.0)
        hi = hi if hi > lo else lo + 1.0

    def x(step):
        return left + (step - x0 + 0.5) / (x1 - x0 + 1) * (width - left - right)

    def y(value):
        return top + (hi - value) / (hi - lo) * (height - top - bottom)

    svg = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)} per step">',
           f'<text x="{left}" y="13" class="title">{esc(title)}</text>']
    for k, (stage, first, last, _) in enumerate(_stages(metrics)):
        a, b = x(first - 0.5), x(last + 0.5)
        svg.append(f'<rect x="{a:.1f}" y="{top}" width="{b - a:.1f}" height="{height - top - bottom}"'
                   f' class="band{k % 2}"><title>{esc(stage)}: steps {first}–{last}</title></rect>')
        if b - a > 14:
            svg.append(f'<text x="{(a + b) / 2:.1f}" y="{top - 4}" class="stage">'
                       f'{esc(str(stage).split(":")[0])}</text>')
    for value in (lo, (lo + hi) / 2, hi):
        svg.append(f'<text x="{left - 4}" y="{y(value) + 4:.1f}" class="tick" text-anchor="end">'
                   f'{value:.3g}</text>')
    svg.append(f'<line x1="{left}" x2="{width - right}" y1="{y((lo + hi) / 2):.1f}" '
               f'y2="{y((lo + hi) / 2):.1f}" class="grid"/>')
    if lo < 0 < hi:
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" class="zero"/>')
    for step, anchor in ((x0, "start"), (x1, "end")):
        svg.append(f'<text x="{x(step):.1f}" y="{height - 6}" class="tick" text-anchor="{anchor}">'
                   f'step {step}</text>')
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    svg.append(f'<polyline points="{line}" class="curve"/>')
    if len(points) <= 80:
        svg += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.2" class="dot">'
                f'<title>step {s}: {v:.4g}</title></circle>' for s, v in points]
    return "".join(svg) + "</svg>"


def _training(metrics, config, groups):
    out = ["<section><h2>Training</h2>"]
    if config:
        keys = ("model", "data_path", "steps", "world_size", "group_size", "batch_size", "lr",
                "kl", "alpha", "curriculum", "no_detail", "no_difficulty", "adv_scale")
        out.append('<p class="config">' + " · ".join(
            f"{esc(k)} <b>{esc(config[k])}</b>" for k in keys if k in config) + "</p>")
    if not metrics:
        return "".join(out) + "<p>No metrics.jsonl in the run folder.</p></section>"
    out.append('<p class="note">Means over each step\'s samples. Shaded bands are curriculum '
               'stages (§4.3), numbered above each chart as in the table below; hover a point for '
               'its value.</p>')
    out.append('<div class="charts">' + "".join(_chart(metrics, *c) for c in CURVES) + "</div>")
    rows = [(stage, f"{first}–{last}", *(_num(_mean(r.get(k) for r in rs)) for k, _, _ in CURVES))
            for stage, first, last, rs in _stages(metrics)]
    out.append(_table(("stage", "steps", "reward", "format", "accuracy", "zero_std_frac"), rows, "num"))
    if groups:
        out.append(_accuracy(groups, f"{len(groups)} logged groups of sampled answers"))
    return "".join(out) + "</section>"


# ---------------------------------------------------------------------------------------------
# Accuracy per type and map difficulty, and the question cards.

def _correct(sample):
    return sample["correctness"] > 0


def _accuracy(groups, what):
    """Type x map difficulty: mean share of correct samples per question, and question counts."""
    cells = {}
    for g in groups:
        share = sum(map(_correct, g["samples"])) / max(len(g["samples"]), 1)
        for key in ((g["type"], g.get("difficulty_city")), (g["type"], "all"), ("all", "all"),
                    ("all", g.get("difficulty_city"))):
            cells.setdefault(key, []).append(share)
    cols = [d for d in reward.DIFFICULTIES if ("all", d) in cells] + ["all"]
    rows = []
    for t in [t for t in reward.TYPES if (t, "all") in cells] + ["all"]:
        rows.append([t] + [f"{_pct(_mean(cells[t, d]))} ({len(cells[t, d])})" if (t, d) in cells
                           else "–" for d in cols])
    return (f"<h3>Accuracy per type and map difficulty ({esc(what)})</h3>"
            + _table(["type"] + [f"{d} map" if d != "all" else "all" for d in cols], rows, "num")
            + '<p class="note">Percent correct (correctness &gt; 0), questions in brackets; with '
              'several samples a question counts its share of correct ones.</p>')


def _short(text, limit=40):
    return text if len(text) <= limit else text[:limit] + "…"


def _sample(k, s, planning):
    """One answer as a table row: its reward parts, its text, its trace (and, for a route, the
    sections Alg. 1 read)."""
    ok = _correct(s)
    parts = (f"total <b>{_num(s['total'])}</b><br>F {_num(s['format'], '{:g}')} · "
             f"C {_num(s['correctness'], '{:g}')} · D {_num(s['detail'], '{:g}')} · "
             f"W {_num(s['weight'], '{:g}')}")
    if s.get("advantage") is not None:
        parts += f"<br>advantage <b>{_num(s['advantage'], '{:+.2f}')}</b>"
    text = s["text"] if isinstance(s["text"], str) else repr(s["text"])
    cut = len(text) - MAX_TEXT
    shown = text[:MAX_TEXT] if cut > 0 else text
    trace = "".join(f'<li><span class="pts">{_num(p, "{:+g}")}</span> {esc(r)}</li>'
                    for p, r in s.get("trace") or ())
    if not trace and "trace" in s:           # sections parsed, and no line of Alg. 1 fired
        trace = '<li><span class="pts">+0</span> no Alg. 1 line fired</li>'
    route = reward.parse_route(text) if planning else []
    if route:                                # what Alg. 1 read: segment by segment
        trace += '<li class="route">parsed: ' + "; ".join(
            f"{i + 1}. {esc(_short(r['route_name']))}: {esc(_short(r['departure_stop']))} → "
            f"{esc(_short(r['arrival_stop']))}" for i, r in enumerate(route[:8])) + (
            f"; … {len(route) - 8} more" if len(route) > 8 else "") + "</li>"
    return (f'<tr class="{"ok" if ok else "bad"}"><td class="parts">'
            f'<span class="mark">{"✓ correct" if ok else "✗"}</span> #{k + 1}<br>{parts}'
            + ("<br><i>hit --max-new-tokens</i>" if s.get("truncated") else "")
            + f'</td><td><pre class="answer">{esc(shown)}</pre>'
            + (f'<p class="note">… {cut:,} more characters not shown</p>' if cut > 0 else "")
            + f'</td><td><ul class="trace">{trace}</ul></td></tr>')


def _card(g, maps):
    figure = maps.get(g.get("figure"))
    if figure:
        picture = (f'<div class="map {figure[0]}" style="aspect-ratio: {figure[1]} / {figure[2]}" '
                   f'role="img" aria-label="map {esc(os.path.basename(g["figure"]))}"></div>')
    else:
        picture = f'<div class="map nomap">map not available<br>{esc(g.get("figure") or "none")}</div>'
    totals = [s["total"] for s in g["samples"]]
    where = f" · step {esc(g['step'])} ({esc(g.get('stage'))})" if g.get("step") is not None else ""
    spread = ""
    if len(totals) > 1:
        spread = (f'<p class="spread">{sum(map(_correct, g["samples"]))} of {len(totals)} samples '
                  f"correct · rewards {_num(min(totals))} to {_num(max(totals))}"
                  + (" · all equal: no GRPO signal" if len(set(totals)) == 1 else "") + "</p>")
    return (f'<article class="card">{picture}<div class="body">'
            f'<h4>{esc(g["id"])} <span class="tag">{esc(g["type"])}</span> '
            f'<span class="tag">{esc(g.get("difficulty_city"))} map</span>{where}</h4>'
            f'<pre class="question">{esc(g.get("question") or "")}</pre>'
            f'<div class="gold"><b>gold answer</b><pre>{esc(g.get("gold") or "–")}</pre></div>'
            f'{spread}<table class="samples"><thead><tr><th>reward = W·(F + C + α·D)</th>'
            f'<th>answer</th><th>Alg. 1 lines that fired, or answer vs gold</th></tr></thead><tbody>'
            + "".join(_sample(k, s, g["type"] == "planning") for k, s in enumerate(g["samples"]))
            + "</tbody></table></div></article>")


def _questions(title, key, shown, total, how, maps):
    if not shown:
        return ""
    out = [f"<h3>{esc(title)}</h3><p class=\"note\">{esc(how)}: {len(shown)} of {total} shown.</p>"]
    for t in reward.TYPES:
        cards = [_card(g, maps) for g in shown if g["type"] == t]
        if cards:
            out.append(f'<h4 class="type" id="{key}-{t}">{esc(title)}: {esc(t)}</h4>' + "".join(cards))
    return "".join(out)


def _nav(eval_shown, run_shown):
    """Links to the sections and to each type's questions (in-page anchors only)."""
    links = []
    for key, name, shown in (("eval", "evaluation", eval_shown), ("train", "training", run_shown)):
        types = [t for t in reward.TYPES if any(g["type"] == t for g in shown)]
        if types:
            links.append(f"{name} questions: " + " ".join(f'<a href="#{key}-{t}">{t}</a>' for t in types))
    return f"<nav>{' · '.join(links)}</nav>" if links else ""


# ---------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;
padding:16px 20px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;border-bottom:2px solid #ddd;margin-top:28px}
h3{font-size:16px;margin:18px 0 6px}h4{margin:0 0 6px;font-size:14px}h4.type{font-size:15px;margin:18px 0 6px}
.note{color:#555;font-size:12.5px;margin:4px 0}.config{font-size:12.5px;color:#333}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f6;text-align:left}table.num td:not(:first-child){text-align:right}
.charts{display:grid;grid-template-columns:1fr 1fr;gap:6px 18px}
svg{width:100%;height:auto;font-size:11px}svg .title{font-weight:600;font-size:12px}
svg .band0{fill:#eef3fb}svg .band1{fill:#fbf3e8}svg .stage{fill:#777;text-anchor:middle}
svg .tick{fill:#555}svg .curve{fill:none;stroke:#2456a6;stroke-width:1.6}svg .dot{fill:#2456a6}
svg .zero{stroke:#999;stroke-dasharray:3 3}svg .grid{stroke:#fff;stroke-width:1.5}
.card{display:grid;grid-template-columns:240px 1fr;gap:14px;border:1px solid #ddd;border-radius:6px;
padding:10px;margin:8px 0}
.map{width:240px;background-size:contain;background-repeat:no-repeat;border:1px solid #eee;
position:sticky;top:8px;align-self:start}
.nomap{height:120px;color:#888;font-size:12px;display:flex;align-items:center;justify-content:center;
text-align:center;overflow-wrap:anywhere}
.tag{background:#eef;border-radius:3px;padding:0 5px;font-weight:400;font-size:12px}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0;font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre.question{background:#fafafa;padding:6px}
.gold{background:#f1f8f1;padding:4px 6px;margin:4px 0}.gold b{font-size:12px;color:#2e7d32}
pre.answer{max-height:8em;overflow:auto}
.spread{color:#444;font-size:12.5px}
table.samples{width:100%;table-layout:fixed}table.samples td{vertical-align:top;padding:4px 6px}
table.samples th:nth-child(1){width:150px}table.samples th:nth-child(3){width:32%}
table.samples tr.ok td:first-child{border-left:4px solid #2e9a44}table.samples tr.ok{background:#f6fbf6}
.parts{font-size:12px;white-space:nowrap}.mark{font-weight:600}.ok .mark{color:#2e7d32}
.bad .mark{color:#999}
ul.trace{margin:0;padding:0;list-style:none;font-size:12.5px;color:#333}
ul.trace li{padding-left:2.8em;text-indent:-2.8em}.pts{text-indent:0}
ul.trace li.route{color:#666;margin-top:3px}
nav{font-size:13px;margin:6px 0}nav a{margin-right:8px}
.pts{display:inline-block;min-width:2.6em;font-weight:600;font-variant-numeric:tabular-nums}
"""


def render(*, metrics=(), config=None, run_groups=(), eval_groups=(), summary=(), summary_note="",
           title="", per_type=PER_TYPE):
    """The whole page as one string."""
    run_shown = _pick(run_groups, per_type, last=True)
    eval_shown = _pick(eval_groups, per_type, last=False)
    paths = list(dict.fromkeys(g["figure"] for g in run_shown + eval_shown if g.get("figure")))
    maps, css = {}, []
    for k, path in enumerate(paths):
        thumb = _thumbnail(path)
        if thumb:
            maps[path] = (f"m{k}", thumb[1], thumb[2])
            css.append(f'.m{k}{{background-image:url("{thumb[0]}")}}')
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title or 'RewardMap report')}</title>",
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<style>{STYLE}{''.join(css)}</style></head><body>",
           f"<h1>RewardMap report</h1><p class=\"note\">{esc(title)}</p>",
           _nav(eval_shown, run_shown),
           f'<p class="note">Embedded: up to {per_type} questions per type from each source '
           f"(the evaluation's first in file order, one per map before a map's second; the run's "
           f"last logged groups); answers cut at "
           f"{MAX_TEXT:,} characters; maps downscaled to thumbnails of at most {THUMB_SIDE} × {THUMB_SIDE} "
           "pixels' area. Reward parts follow §4.2: total = weight × (format + correctness + α·detail); "
           "the lines under an answer are the Alg. 1 lines that fired (planning) or the parsed "
           "answer against the gold one.</p>"]
    if summary or eval_groups:
        out.append("<section><h2>Evaluation</h2>")
        if summary:
            out.append(_table([k for k, _ in summary], [[v for _, v in summary]], "num"))
            out.append(f'<p class="note">{esc(summary_note)}</p>' if summary_note else "")
        if eval_groups:
            out.append(_accuracy(eval_groups, f"{len(eval_groups)} evaluated questions"))
        out.append("</section>")
    if metrics or config or run_groups:
        out.append(_training(metrics, config, run_groups))
    if run_shown or eval_shown:
        out.append("<section><h2>Questions and answers</h2>")
        out.append(_questions("Evaluation", "eval", eval_shown, len(eval_groups),
                              "The first questions of each type in file order, one per map "
                              "before a map's second", maps))
        out.append(_questions("Training samples", "train", run_shown, len(run_groups),
                              "The last groups of each type in samples.jsonl", maps))
        out.append("</section>")
    elif not (metrics or summary):
        out.append("<p>Nothing to show: no answers, metrics or samples were given.</p>")
    return "".join(out) + "</body></html>\n"


def write(path, *, run=None, eval_groups=(), summary=(), summary_note="", title="",
          per_type=PER_TYPE):
    """Render a run folder (metrics.jsonl, samples.jsonl, config.json) and/or evaluated groups
    to one HTML file; returns its path."""
    metrics, run_groups, config = load_run(run) if run else ((), (), None)
    title = " · ".join(x for x in (title, run and f"run {run}") if x)
    page = render(metrics=metrics, config=config, run_groups=run_groups, eval_groups=eval_groups,
                  summary=summary, summary_note=summary_note, per_type=per_type, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", errors="replace") as f:
        f.write(page)
    return path
