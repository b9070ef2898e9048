"""The data engine: metro graphs, the route oracle, the six question types, synthetic maps, JSONL I/O.

RewardMap §3 (ReasonMap-Plus: TorF1, TorF2, Counting1-3) and ReasonMap §3 (route planning), on
ReasonMap's own Metro Data format ({line: [stop, ...]}, markers such as " (Transfer Station)").

    python data.py synth --out data/synth --cities 6 --seed 0       # seconds; README quick start
    python data.py real --stations ../shared/reasonmap/stations \\
                        --maps ../shared/reasonmap/maps --out data/real   # paper's city split
    python data.py release data/ReasonMap-Plus data/ReasonMap --maps RewardMap/maps \\
                           --stations ReasonMap/stations --out data/release   # the authors' files

synth and real write OUT/train.jsonl and OUT/test.jsonl, release OUT/<name>.jsonl per released
file and split (one record per line, DESIGN.md §2); train.py and eval.py read them with
load_records(). No torch, no model code; release alone needs pyarrow (an optional extra).

Where this file departs from the paper or the authors' release (also listed in the README):
- Question wording. ReasonMap-Plus App. A.2 and ReasonMap App. A.1 templates could not be
  retrieved verbatim on this machine; the texts below keep what the released parsers rely on
  (sections "Route Name: / Departure Stop: / Arrival Stop:" split by "--"; long1 adds
  "Number of Via Stops:", long2 "Via Stops:"; every Plus question asks for \\boxed{}), and the
  wording is ours. Swap PLUS_TEMPLATES for the released strings when they are at hand.
- Counting1 answers are letters "A".."D" (the release stores 0..3 and maps them to letters in
  its SFT script); TorF answers are "yes"/"no" (the release stores 1/0).
- Map difficulty of a real city is not in the Metro Data; city_difficulty() derives it from line
  and transfer-station counts (thresholds documented there).
- `release` rewrites ReasonMap's reference routes in Metro Data names (reward.service_line; the
  release's evaluator maps service names per city at scoring time), takes via stops a service
  omits from the Metro Data ride, keeps at most 3 plans (DESIGN.md §2), and gives planning rows
  that carry no routes (ReasonMap-Train) the route oracle's.
- Questions that the name graph cannot settle are not generated (DESIGN.md §2): stops whose name
  sits on several lines without a transfer marker (New York's several "125 St"), stops listed
  twice on one line, and Counting1 on loop lines (two directions, two answers).
"""
import argparse
import base64
import collections
import dataclasses
import heapq
import json
import math
import os
import random
import re
import sys
import warnings

from PIL import Image, ImageDraw, ImageFont

from reward import DIFFICULTIES, TEMPLATE_NAMES, TYPES, normalize_stop, service_line

# RM §3: the test cities of the paper; every other city trains.
TEST_CITIES = ("auckland", "los_angeles", "miami", "lisboa", "geneva", "beijing", "hangzhou",
               "budapest", "singapore", "rome", "toronto")
MARKERS = (" (Transfer Station)", "（换乘站）", " (Branch-starting Station)", "（支线起始站）")
TRANSFER_MARKERS = (" (Transfer Station)", "（换乘站）")
# Image budgets in pixels; Qwen2.5-VL spends one image token per 28x28 px (14 px patches, 2x2
# merge). The paper fed maps at Qwen2.5-VL's processor default, PAPER_MAX_PIXELS (16384 tokens;
# the 17 maps here give 576-16,356 image tokens there, median 13,225). Our default for real models
# is DEFAULT_MAX_PIXELS (<= 1280 tokens): a deviation, declared in the README with the memory and prompt
# length each budget costs (bench.py --plan); train.py --max-pixels sets either. load_image keeps
# the aspect ratio; the processor rounds to multiples of 28 itself.
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
PAPER_MAX_PIXELS = 16384 * 28 * 28
HARD_PIXEL_CAP = 400_000_000  # refuse anything larger outright (the largest real map is 278 M)
SEGMENT_KEYS = ("route_name", "departure_stop", "arrival_stop", "via_stops")
CITY_NAMES = {"kl": "Kuala Lumpur", "xian": "Xi'an", "huhehaote": "Hohhot"}


# ---------------------------------------------------------------------------------------------
# Metro Data

def clean_name(raw):
    """'Metro Center Station (Transfer Station)' -> 'Metro Center Station'; '西单（换乘站）' -> '西单'."""
    if not isinstance(raw, str):
        raise ValueError(f"stop name must be a string, got {type(raw).__name__}: {raw!r}")
    for marker in MARKERS:
        raw = raw.replace(marker, "")
    return raw.strip()


def _check_metro(metro, where="metro"):
    if not isinstance(metro, dict) or not metro:
        raise ValueError(f"{where}: expected a non-empty object {{line: [stop, ...]}}")
    for line, stops in metro.items():
        if not isinstance(line, str) or not line.strip():
            raise ValueError(f"{where}: line name {line!r} is not a non-empty string")
        if not isinstance(stops, list) or len(stops) < 2:
            raise ValueError(f"{where}: line {line!r} needs a list of at least 2 stops")
        for s in stops:
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"{where}: line {line!r} has a bad stop {s!r}")


def load_metro_raw(path):
    """ReasonMap stations JSON as stored (markers kept: ambiguous_stops() needs them)."""
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    _check_metro(raw, path)
    return raw


def load_metro(path):
    """{line: [stop, ...]} with the transfer / branch markers removed (as the official eval does)."""
    return {line: [clean_name(s) for s in stops] for line, stops in load_metro_raw(path).items()}


def ambiguous_stops(raw_metro):
    """Normalised names on several lines with no transfer marker anywhere: on the name graph they
    join lines, in the city they may be different stations (NY's "125 St" on 1, 2/3, A/B/C/D, 4/5/6),
    so no question asks about them and no reference route transfers at them (DESIGN.md §2)."""
    lines_of, marked, shown = {}, set(), {}
    for line, stops in raw_metro.items():
        for s in stops:
            n = normalize_stop(clean_name(s))
            shown.setdefault(n, clean_name(s))
            lines_of.setdefault(n, set()).add(line)
            if any(m in s for m in TRANSFER_MARKERS):
                marked.add(n)
    # names as written (normalize_stop is not idempotent: "X Station Station" -> "x station" -> "x")
    return {shown[n] for n, ls in lines_of.items() if len(ls) > 1 and n not in marked}


def _line_stops(stops):
    """Normalised stops of a line and whether it is a loop (first stop repeated at the end)."""
    names = [normalize_stop(s) for s in stops]
    loop = len(names) > 2 and names[0] == names[-1]
    return (names[:-1] if loop else names), loop


def lines_through(metro, stop):
    """Lines (in metro order) that serve `stop`, compared after normalize_stop."""
    n = normalize_stop(stop)
    return [line for line, stops in metro.items() if n in {normalize_stop(s) for s in stops}]


def _ride(metro, line, s1, s2):
    """Intermediate stops (as written in `metro`) riding `line` from s1 to s2: the fewest, if a
    loop or a repeated name gives a choice. ValueError if the line is unknown or does not serve
    both stops."""
    if line not in metro:
        raise ValueError(f"unknown line {line!r}")
    names, loop = _line_stops(metro[line])
    a, b = normalize_stop(s1), normalize_stop(s2)
    pa = [i for i, n in enumerate(names) if n == a]
    pb = [i for i, n in enumerate(names) if n == b]
    if not pa or not pb:
        raise ValueError(f"line {line!r} does not serve both {s1!r} and {s2!r}")
    k, best = len(names), None
    for i in pa:
        for j in pb:
            if i == j:
                continue
            if loop:   # either way round
                ahead = (j - i) % k
                path = ([(i + t) % k for t in range(1, ahead)] if ahead <= k - ahead
                        else [(i - t) % k for t in range(1, k - ahead)])
            else:
                path = list(range(i + 1, j)) if i < j else list(range(i - 1, j, -1))
            if best is None or len(path) < len(best):
                best = path
    if best is None:
        raise ValueError(f"{s1!r} and {s2!r} are the same stop")
    return [metro[line][p] for p in best]


def stops_between(metro, line, s1, s2):
    """Intermediate stops between s1 and s2 riding `line` (fewest, if a loop or a repeated name
    gives a choice). ValueError if the line is unknown or does not serve both stops."""
    return len(_ride(metro, line, s1, s2))


def city_difficulty(metro):
    """Map difficulty from line count L and transfer-station count T (names on >= 2 lines).

    hard: L >= 10 or T >= 50;  easy: L <= 3 (and not hard);  middle: the rest.
    On the 30 ReasonMap cities this gives easy = 10 (sydney, miami, changzhou, huhehaote, dubai,
    toronto, guiyang, jinan, rome, auckland), hard = 6 (new_york, beijing, shanghai, shenzhen,
    hangzhou, xian), middle = 14 (oslo and geneva, whose shared tram tracks make T ~ 40, stay
    middle). The RewardMap release stores a label per city that we do not have; this rule is ours.
    """
    lines_of = {}
    for line, stops in metro.items():
        for s in stops:
            lines_of.setdefault(normalize_stop(s), set()).add(line)
    n_lines = len(metro)
    n_transfer = sum(1 for ls in lines_of.values() if len(ls) > 1)
    if n_lines >= 10 or n_transfer >= 50:
        return "hard"
    if n_lines <= 3:
        return "easy"
    return "middle"


# ---------------------------------------------------------------------------------------------
# Route oracle on the name graph (RM §3: fewest transfers, then fewest stops)

def _build_graph(metro, no_transfer_at):
    nodes, line_of, pos_of, name_of = [], [], [], []
    by_name = {}
    adj = []
    lines = list(metro)
    for li, line in enumerate(lines):
        names, loop = _line_stops(metro[line])
        base = len(nodes)
        for p, n in enumerate(names):
            nodes.append((li, p))
            line_of.append(li)
            pos_of.append(p)
            name_of.append(n)
            by_name.setdefault(n, []).append(base + p)
            adj.append([])
        k = len(names)
        for p in range(k):
            for q in ((p - 1, p + 1) if not loop else ((p - 1) % k, (p + 1) % k)):
                if 0 <= q < k and q != p and base + q not in [t for t, _ in adj[base + p]]:
                    adj[base + p].append((base + q, (0, 1)))
    blocked = {normalize_stop(s) for s in no_transfer_at}
    for n, ids in by_name.items():
        if n in blocked:
            continue
        for u in ids:
            for v in ids:
                if line_of[u] != line_of[v]:
                    adj[u].append((v, (1, 0)))
    return lines, line_of, pos_of, name_of, by_name, adj


def best_routes(metro, s1, s2, limit=3, no_transfer_at=()):
    """Optimal routes s1 -> s2: fewest transfers, then fewest stops ridden; all ties up to `limit`.

    Each route is a list of segments {route_name, departure_stop, arrival_stop, via_stops}, names as
    written in `metro`. [] if s2 cannot be reached (or either stop is unknown). A stop name shared
    by two lines joins them, as the official evaluation assumes; `no_transfer_at` lists names where
    changing lines is not allowed (see ambiguous_stops). Loop lines (first stop == last) run both ways.
    """
    a, b = normalize_stop(s1), normalize_stop(s2)
    if a == b:
        raise ValueError(f"departure and arrival are the same stop: {s1!r}")
    lines, line_of, pos_of, name_of, by_name, adj = _build_graph(metro, no_transfer_at)
    if a not in by_name or b not in by_name:
        return []
    dist = {}
    preds = {}
    heap = []
    for u in by_name[a]:
        dist[u] = (0, 0)
        preds[u] = []
        heap.append(((0, 0), u))
    heapq.heapify(heap)
    while heap:
        d, u = heapq.heappop(heap)
        if d != dist[u]:
            continue
        for v, w in adj[u]:
            nd = (d[0] + w[0], d[1] + w[1])
            if v not in dist or nd < dist[v]:
                dist[v] = nd
                preds[v] = [u]
                heapq.heappush(heap, (nd, v))
            elif nd == dist[v] and u not in preds[v]:
                preds[v].append(u)
    ends = [u for u in by_name[b] if u in dist]
    if not ends:
        return []
    best = min(dist[u] for u in ends)
    ends = [u for u in ends if dist[u] == best]

    routes, seen = [], set()

    def to_segments(path):
        segs, start = [], 0
        for k in range(1, len(path) + 1):
            if k == len(path) or line_of[path[k]] != line_of[path[k - 1]]:
                part = path[start:k]
                line = lines[line_of[part[0]]]
                stops = metro[line]
                names = [stops[pos_of[u]] for u in part]
                segs.append({"route_name": line, "departure_stop": names[0],
                             "arrival_stop": names[-1], "via_stops": names[1:-1]})
                start = k
        return segs

    def walk(u, tail):  # depth-first over the predecessor DAG, target back to source
        if len(routes) >= limit:
            return
        if dist[u] == (0, 0):
            segs = to_segments([u] + tail)
            key = json.dumps(segs, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                routes.append(segs)
            return
        for p in preds[u]:
            walk(p, [u] + tail)
            if len(routes) >= limit:
                return

    for u in ends:
        walk(u, [])
    return routes


def transfer_count(route):
    return len(route) - 1


def _route_cost(route):
    return (transfer_count(route), sum(len(s["via_stops"]) + 1 for s in route))


# ---------------------------------------------------------------------------------------------
# Questions (RewardMap App. A.2; ReasonMap App. A.1). Wording is ours; see the module docstring.

_BOX = "Put your final answer in \\boxed{{}}."
PLUS_TEMPLATES = {
    "TorF1": "Look at the transit map of {city}. Are {s1} and {s2} on the same line? "
             "Answer yes or no. " + _BOX,
    "TorF2": "Look at the transit map of {city}. Is {s1} a stop of {line}? Answer yes or no. " + _BOX,
    "Counting1": "Look at the transit map of {city}. How many intermediate stops are there between "
                 "{s1} and {s2} on {line} (not counting {s1} and {s2})? "
                 "A. {o0}  B. {o1}  C. {o2}  D. {o3}. Answer with the option's letter. " + _BOX,
    "Counting2": "Look at the transit map of {city}. How many lines pass through {s1}? "
                 "Answer with a number. " + _BOX,
    "Counting3": "Look at the transit map of {city}. How many lines are there on this map? "
                 "Answer with a number. " + _BOX,
}
_PLAN_HEAD = ("Look at the transit map of {city}. Plan a metro route from {s1} to {s2} with the "
              "fewest transfers. Give one section per line you ride, in this format, and separate "
              "sections with a line containing only --:\n")
PLANNING_TEMPLATES = {
    "short": _PLAN_HEAD + "Route Name: <line>\nDeparture Stop: <stop>\nArrival Stop: <stop>\n--\n"
             "Route Name: <line>\nDeparture Stop: <stop>\nArrival Stop: <stop>",
    "long1": _PLAN_HEAD + "Route Name: <line>\nDeparture Stop: <stop>\nArrival Stop: <stop>\n"
             "Number of Via Stops: <number>\n--\nRoute Name: <line>\nDeparture Stop: <stop>\n"
             "Arrival Stop: <stop>\nNumber of Via Stops: <number>",
    "long2": _PLAN_HEAD + "Route Name: <line>\nDeparture Stop: <stop>\nArrival Stop: <stop>\n"
             "Via Stops: <stop>, <stop>, ...\n--\nRoute Name: <line>\nDeparture Stop: <stop>\n"
             "Arrival Stop: <stop>\nVia Stops: <stop>, <stop>, ...",
}


def format_route(route, template=None):
    """A route (list of segments) in the answer format of PLANNING_TEMPLATES[template]: sections of
    Route Name / Departure Stop / Arrival Stop (+ Number of Via Stops for long1, Via Stops for
    long2), separated by "--" (RM App. A.1)."""
    parts = []
    for seg in route:
        lines = [f"Route Name: {seg['route_name']}", f"Departure Stop: {seg['departure_stop']}",
                 f"Arrival Stop: {seg['arrival_stop']}"]
        if template == "long1":
            lines.append(f"Number of Via Stops: {len(seg['via_stops'])}")
        elif template == "long2":
            lines.append("Via Stops: " + (", ".join(seg["via_stops"]) or "None"))
        parts.append("\n".join(lines))
    return "\n--\n".join(parts)


def gold_answer(record):
    """The reference answer in the format the question asks for (the SFT target of
    `train.py --algo sft`): the boxed answer, or the first reference route."""
    if record["type"] != "planning":
        return f"\\boxed{{{record['answer']}}}"
    return format_route(record["routes"][0], record.get("template"))


def city_title(city):
    return CITY_NAMES.get(city, city.replace("_", " ").title())


def _record(kind, idx, question, answer, *, city, country, difficulty, figure, metro, counts,
            s1=None, s2=None, line=None, options=None, qtc=None, routes=None, template=None):
    return {"id": f"{city}-{kind}-{idx}", "type": kind, "question": question, "answer": answer,
            "options": options, "figure": figure, "country": country, "city": city,
            "difficulty_city": difficulty, "station_1": s1, "station_2": s2, "line": line,
            "metro": metro, "question_transfer_count": qtc, "routes": routes or [],
            "template": template, "city_line_count": counts[0], "city_transfer_count": counts[1]}


def _balanced(rng, n, make_yes, make_no, tries):
    """Interleaved yes / no candidates, n in all, the two counts equal (n odd: one side gets one
    more, chosen at random). If one side runs out, the other is cut to match it."""
    half = (n + 1) // 2
    sides, seen = [], set()
    for make in (make_yes, make_no):
        out = []
        for _ in range(tries * max(half, 1)):
            if len(out) >= half:
                break
            q = make()
            if q is not None and q[0] not in seen:
                seen.add(q[0])
                out.append(q)
        sides.append(out)
    yes, no = sides
    k = min(len(yes), len(no), n // 2)
    picked = [x for pair in zip(yes[:k], no[:k]) for x in pair]
    if n % 2 and len(picked) == n - 1:
        spare = [s[k] for s in (yes, no) if len(s) > k]
        if spare:
            picked.append(rng.choice(spare))
    return picked


def make_questions(metro, *, city, country, difficulty, figure, rng, per_type=10, avoid=()):
    """Records (DESIGN.md §2) of all six types for one city: per_type of each (Counting3: one per
    map). `avoid`: stop names never asked about nor transferred at (see ambiguous_stops)."""
    _check_metro(metro)
    per_type = int(per_type)
    disp, lines_of, single = {}, {}, {}
    for line, stops in metro.items():
        names, loop = _line_stops(stops)
        counts = {}
        for s, n in zip(stops, names):
            disp.setdefault(n, s)
            counts[n] = counts.get(n, 0) + 1
            if line not in lines_of.setdefault(n, []):
                lines_of[n].append(line)
        single[line] = (not loop, [n for n in names if counts[n] == 1])
    bad = {normalize_stop(s) for s in avoid}
    # a name listed twice on one line is a lasso or a data slip: leave it out everywhere
    bad |= {n for line, (_, ok) in single.items() for n in _line_stops(metro[line])[0] if n not in ok}
    safe = sorted(n for n in lines_of if n not in bad)
    blocked = sorted(disp[n] for n in bad if n in disp)  # names as written: normalise once only
    if len(safe) < 2:
        raise ValueError(f"{city}: fewer than two usable stops")
    line_list = list(metro)
    counts = (len(metro), sum(1 for ls in lines_of.values() if len(ls) > 1))
    title = city_title(city)
    common = dict(city=city, country=country, difficulty=difficulty, figure=figure,
                  metro=metro, counts=counts)
    out = []

    # TorF1: are s1 and s2 on the same line? (App. A.2)
    def torf1(want_yes):
        def make():
            if want_yes:
                line = rng.choice(line_list)
                cand = [n for n in single[line][1] if n not in bad]
                if len(cand) < 2:
                    return None
                a, b = rng.sample(cand, 2)
            else:
                a, b = rng.sample(safe, 2)
                if set(lines_of[a]) & set(lines_of[b]):
                    return None
            return (tuple(sorted((a, b))), a, b)
        return make
    for i, (_, a, b) in enumerate(_balanced(rng, per_type, torf1(True), torf1(False), 50)):
        same = bool(set(lines_of[a]) & set(lines_of[b]))
        q = PLUS_TEMPLATES["TorF1"].format(city=title, s1=disp[a], s2=disp[b])
        out.append(_record("TorF1", i, q, "yes" if same else "no", s1=disp[a], s2=disp[b], **common))

    # TorF2: is s1 on line x?
    def torf2(want_yes):
        def make():
            line = rng.choice(line_list)
            if want_yes:
                cand = [n for n in single[line][1] if n not in bad]
            else:
                cand = [n for n in safe if line not in lines_of[n]]
            if not cand:
                return None
            a = rng.choice(cand)
            return ((a, line), a, line)
        return make
    for i, (_, a, line) in enumerate(_balanced(rng, per_type, torf2(True), torf2(False), 50)):
        q = PLUS_TEMPLATES["TorF2"].format(city=title, s1=disp[a], line=line)
        ans = "yes" if line in lines_of[a] else "no"
        out.append(_record("TorF2", i, q, ans, s1=disp[a], line=line, **common))

    # Counting1: intermediate stops between two stops of one (non-loop) line, options A-D
    seen, made = set(), 0
    for _ in range(50 * max(per_type, 1)):
        if made >= per_type:
            break
        line = rng.choice(line_list)
        linear, ok = single[line]
        names = _line_stops(metro[line])[0]
        idx = [i for i, n in enumerate(names) if n in ok and n not in bad]
        if not linear or len(idx) < 2:
            continue
        i, j = sorted(rng.sample(idx, 2))
        if j - i < 2 or (line, i, j) in seen:
            continue
        seen.add((line, i, j))
        n = j - i - 1
        pool = [m for m in range(max(0, n - 4), n + 5) if m != n]
        options = rng.sample(pool, 3) + [n]
        rng.shuffle(options)
        letter = "ABCD"[options.index(n)]
        a, b = (names[i], names[j]) if rng.random() < 0.5 else (names[j], names[i])
        q = PLUS_TEMPLATES["Counting1"].format(city=title, s1=disp[a], s2=disp[b], line=line,
                                          o0=options[0], o1=options[1], o2=options[2], o3=options[3])
        out.append(_record("Counting1", made, q, letter, s1=disp[a], s2=disp[b], line=line,
                           options=options, **common))
        made += 1

    # Counting2: lines through s1 (half of them at transfer stations, where counting is the skill)
    hubs = [n for n in safe if len(lines_of[n]) > 1]
    chosen = []
    for k in range(per_type):
        pool = hubs if (k % 2 == 0 and hubs) else safe
        rest = [n for n in pool if n not in chosen] or [n for n in safe if n not in chosen]
        if not rest:
            break
        chosen.append(rng.choice(rest))
    for i, a in enumerate(chosen):
        q = PLUS_TEMPLATES["Counting2"].format(city=title, s1=disp[a])
        out.append(_record("Counting2", i, q, len(lines_of[a]), s1=disp[a], **common))

    # Counting3: lines on the map, one question per map
    out.append(_record("Counting3", 0, PLUS_TEMPLATES["Counting3"].format(city=title), len(metro), **common))

    # planning (RM §3): pairs mixing 0 / 1 / >= 2 transfers, up to 3 optimal reference routes
    buckets, seen = {0: [], 1: [], 2: []}, set()
    want = {k: per_type // 3 + (1 if k < per_type % 3 else 0) for k in buckets}
    for _ in range(30 * max(per_type, 1)):
        if all(len(buckets[k]) >= want[k] for k in buckets):
            break
        a, b = rng.sample(safe, 2)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        full = best_routes(metro, disp[a], disp[b], limit=1)
        if not full:
            continue
        strict = best_routes(metro, disp[a], disp[b], limit=3, no_transfer_at=blocked)
        if not strict or _route_cost(strict[0]) != _route_cost(full[0]):
            continue  # the optimum needs a transfer the data cannot vouch for
        k = min(transfer_count(strict[0]), 2)
        if len(buckets[k]) < want[k]:
            buckets[k].append((a, b, strict))
    # a city without (say) 2-transfer pairs fills up with what it has
    picked = [x for k in (0, 1, 2) for x in buckets[k]]
    offset = rng.randrange(3)
    for i, (a, b, routes) in enumerate(picked):
        template = TEMPLATE_NAMES[(i + offset) % 3]
        q = PLANNING_TEMPLATES[template].format(city=title, s1=disp[a], s2=disp[b])
        out.append(_record("planning", i, q, None, s1=disp[a], s2=disp[b],
                           qtc=transfer_count(routes[0]), routes=routes, template=template, **common))
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic cities: a seeded grid network, rendered with Pillow

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0aa5a5", "#f032e6",
           "#808000", "#9a6324", "#000075", "#e6a800", "#800000")
# (grid side, lines, stops per line, map side in px); hard reaches the L >= 10 of city_difficulty
SYNTH = {"easy": (7, (2, 3), (5, 7), 448), "middle": (9, (4, 6), (5, 8), 560),
         "hard": (12, (10, 10), (5, 8), 784)}
_DIRS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))


def _stop_names(rng, n):
    cons, vow = "bdfgklmnprstvz", "aeiou"
    names, seen = [], set()
    while len(names) < n:
        w = "".join(rng.choice(cons) + rng.choice(vow) for _ in range(2)).capitalize()
        if normalize_stop(w) not in seen:
            seen.add(normalize_stop(w))
            names.append(w)
    return names


def _walk(rng, grid, length, used_edges, must_touch):
    for _ in range(200):
        x, y = rng.randrange(grid), rng.randrange(grid)
        d = rng.randrange(8)
        path, edges = [(x, y)], set()
        while len(path) < length:
            options = [d] * 3 + [(d + 1) % 8, (d - 1) % 8]
            rng.shuffle(options)
            for nd in options:
                nx, ny = x + _DIRS[nd][0], y + _DIRS[nd][1]
                e = frozenset(((x, y), (nx, ny)))
                if 0 <= nx < grid and 0 <= ny < grid and (nx, ny) not in path and e not in used_edges:
                    break
            else:
                break
            path.append((nx, ny))
            edges.add(e)
            x, y, d = nx, ny, nd
        if len(path) == length and (not must_touch or must_touch & set(path)):
            return path, edges
    return None, None


def synth_city(rng, difficulty):
    """A random transit network: (metro {line: [stop, ...]}, layout for render_map).

    Lines are branch-free octilinear walks on a grid; a grid node used by two lines is a shared
    (transfer) station; no two lines share a track segment; every line after the first touches an
    earlier one, so the network is connected. Stop names are two short syllables ("Kavo")."""
    if difficulty not in SYNTH:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    grid, (lo, hi), (smin, smax), size = SYNTH[difficulty]
    for _ in range(100):
        n_lines = rng.randint(lo, hi)
        paths, used, nodes = [], set(), set()
        for _ in range(n_lines):
            path, edges = _walk(rng, grid, rng.randint(smin, smax), used, nodes if paths else None)
            if path is None:
                break
            paths.append(path)
            used |= edges
            nodes |= set(path)
        if len(paths) < n_lines:
            continue
        order = sorted(nodes, key=lambda p: (p[1], p[0]))
        names = dict(zip(order, _stop_names(rng, len(order))))
        metro = {f"Line {i + 1}": [names[p] for p in path] for i, path in enumerate(paths)}
        if city_difficulty(metro) != difficulty:
            continue
        layout = {"grid": grid, "size": size,
                  "pos": {names[p]: [p[0], p[1]] for p in order},
                  "colors": {line: PALETTE[i % len(PALETTE)] for i, line in enumerate(metro)}}
        return metro, layout
    raise RuntimeError(f"could not build a {difficulty} city; the generator settings are inconsistent")


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def render_map(metro, layout, size=None):
    """Draw the network as a transit map: coloured lines, stop dots, ringed transfer stations,
    stop labels, a legend of line names. Cheap: one Pillow canvas, no anti-aliasing passes."""
    size = int(size or layout.get("size", 560))
    grid, pos = layout["grid"], layout["pos"]
    legend_rows = math.ceil(len(metro) / 4)
    legend_h = 22 * legend_rows + 12
    margin = max(28, size // 12)
    cell = (size - 2 * margin) / max(grid - 1, 1)
    cell = min(cell, (size - legend_h - 2 * margin) / max(grid - 1, 1))
    fs = max(9, int(cell * 0.26))
    font, lfont = _font(fs), _font(13)

    def xy(name):
        gx, gy = pos[name]
        return margin + gx * cell, margin + gy * cell

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    width = max(3, int(cell * 0.12))
    for line, stops in metro.items():
        draw.line([xy(s) for s in stops], fill=layout["colors"][line], width=width, joint="curve")
    n_lines = {}
    for stops in metro.values():
        for s in set(stops):
            n_lines[s] = n_lines.get(s, 0) + 1
    r = max(3, int(cell * 0.09))
    boxes = []  # what a label must not cover: stop dots, other labels, and the lines themselves
    for stops in metro.values():
        for u, v in zip(stops, stops[1:]):
            (x0, y0), (x1, y1) = xy(u), xy(v)
            steps = max(1, int(math.hypot(x1 - x0, y1 - y0) / 4))
            for t in range(steps + 1):
                x, y = x0 + (x1 - x0) * t / steps, y0 + (y1 - y0) * t / steps
                boxes.append((x - width, y - width, x + width, y + width))
    for s in sorted(pos, key=lambda s: (pos[s][1], pos[s][0])):
        x, y = xy(s)
        if n_lines.get(s, 0) > 1:
            R = r + 3
            draw.ellipse((x - R, y - R, x + R, y + R), fill="white", outline="black", width=2)
        else:
            line = next(line for line, st in metro.items() if s in st)
            draw.ellipse((x - r, y - r, x + r, y + r), fill="white", outline=layout["colors"][line],
                         width=2)
        boxes.append((x - r - 2, y - r - 2, x + r + 2, y + r + 2))
    for s in sorted(pos, key=lambda s: (pos[s][1], pos[s][0])):
        x, y = xy(s)
        w = draw.textlength(s, font=font)
        h = fs
        d = r + 4
        cands = [(x + d, y - h / 2), (x - d - w, y - h / 2), (x - w / 2, y - d - h),
                 (x - w / 2, y + d), (x + d, y - d - h), (x - d - w, y + d),
                 (x + d, y + d), (x - d - w, y - d - h)]

        def overlap(c):
            bx = (c[0], c[1], c[0] + w, c[1] + h)
            out = 0.0 if 0 <= bx[0] and bx[2] <= size and 0 <= bx[1] and bx[3] <= size - legend_h else 1e6
            for o in boxes:
                ix = max(0.0, min(bx[2], o[2]) - max(bx[0], o[0]))
                iy = max(0.0, min(bx[3], o[3]) - max(bx[1], o[1]))
                out += ix * iy
            return out
        best = min(cands, key=overlap)
        draw.text(best, s, fill="black", font=font)
        boxes.append((best[0], best[1], best[0] + w, best[1] + h))
    y0 = size - legend_h + 6
    draw.line((8, y0 - 4, size - 8, y0 - 4), fill="#999999", width=1)
    col_w = (size - 16) / 4
    for i, line in enumerate(metro):
        cx, cy = 8 + (i % 4) * col_w, y0 + 22 * (i // 4)
        draw.rectangle((cx, cy + 4, cx + 22, cy + 12), fill=layout["colors"][line])
        draw.text((cx + 28, cy), line, fill="black", font=lfont)
    return img


def _write_stations(path, metro):
    """ReasonMap's own JSON format, transfer markers included, so load_metro reads it back."""
    shared = {}
    for stops in metro.values():
        for s in stops:
            shared[s] = shared.get(s, 0) + 1
    raw = {line: [s + (" (Transfer Station)" if shared[s] > 1 else "") for s in stops]
           for line, stops in metro.items()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f, ensure_ascii=False, indent=1)
        f.write("\n")


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _progress(items, desc, total):
    if total < 8:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total)


def synth(out_dir, cities=6, seed=0, per_type=8, n_test=None):
    """Write out_dir/{train,test}.jsonl, out_dir/maps/<city>.png, out_dir/stations/<city>.json.

    Difficulties cycle easy/middle/hard; the last n_test cities (default a third, at least one)
    form the test split, so test maps are never seen in training. Same arguments -> same bytes."""
    cities = int(cities)
    if cities < 2:
        raise ValueError("synth needs at least 2 cities (one for train, one for test)")
    n_test = max(1, cities // 3) if n_test is None else int(n_test)
    if not 0 < n_test < cities:
        raise ValueError(f"n_test must be between 1 and {cities - 1}")
    for sub in ("maps", "stations"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    train, test = [], []
    for i in _progress(range(cities), "synth cities", cities):
        city = f"synth{i:03d}"
        difficulty = DIFFICULTIES[i % 3]
        rng = random.Random(f"rewardmap-synth-{seed}-{i}")
        metro, layout = synth_city(rng, difficulty)
        render_map(metro, layout).save(os.path.join(out_dir, "maps", city + ".png"), optimize=False)
        st_path = os.path.join(out_dir, "stations", city + ".json")
        _write_stations(st_path, metro)
        metro = load_metro(st_path)  # the same path real cities take
        recs = make_questions(metro, city=city, country="synthland", difficulty=city_difficulty(metro),
                              figure=f"maps/{city}.png", rng=rng, per_type=per_type)
        (test if i >= cities - n_test else train).extend(recs)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "test.jsonl")
    _write_jsonl(paths[0], train)
    _write_jsonl(paths[1], test)
    return paths


def real(stations_dir, maps_dir, out_dir, per_type=20, seed=0, test_cities=TEST_CITIES):
    """ReasonMap Metro Data + maps -> out_dir/{train,test}.jsonl with the paper's city split.

    Cities without a map are skipped with a warning. `figure` points at the map where it lies,
    relative to out_dir (the PNGs are not copied)."""
    os.makedirs(out_dir, exist_ok=True)
    found = []
    for country in sorted(os.listdir(stations_dir)):
        cdir = os.path.join(stations_dir, country)
        if os.path.isdir(cdir):
            found += [(country, f[:-5]) for f in sorted(os.listdir(cdir)) if f.endswith(".json")]
    if not found:
        raise ValueError(f"no <country>/<city>.json under {stations_dir}")
    train, test = [], []
    for country, city in _progress(found, "real cities", len(found)):
        map_path = os.path.join(maps_dir, country, city + ".png")
        if not os.path.exists(map_path):
            warnings.warn(f"{country}/{city}: no map at {map_path}; city skipped")
            continue
        raw = load_metro_raw(os.path.join(stations_dir, country, city + ".json"))
        metro = {line: [clean_name(s) for s in stops] for line, stops in raw.items()}
        rng = random.Random(f"rewardmap-real-{seed}-{country}-{city}")
        figure = os.path.relpath(map_path, out_dir).replace(os.sep, "/")
        recs = make_questions(metro, city=city, country=country, difficulty=city_difficulty(metro),
                              figure=figure, rng=rng, per_type=per_type, avoid=ambiguous_stops(raw))
        (test if city in test_cities else train).extend(recs)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "test.jsonl")
    _write_jsonl(paths[0], train)
    _write_jsonl(paths[1], test)
    return paths


# ---------------------------------------------------------------------------------------------
# Reading records and images

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _check_record(r, base, figure_ok):
    """The first thing wrong with record r, or None."""
    if not isinstance(r, dict):
        return f"expected a JSON object, got {type(r).__name__}"
    for key in ("id", "type", "question", "answer", "figure", "country", "city", "difficulty_city",
                "station_1", "station_2", "line", "metro", "question_transfer_count", "routes",
                "template"):
        if key not in r:
            return f"missing field {key!r}"
    t = r["type"]
    if t not in TYPES:
        return f"unknown type {t!r} (expected one of {', '.join(TYPES)})"
    for key in ("id", "question", "figure", "country", "city"):
        if not isinstance(r[key], str) or not r[key].strip():
            return f"field {key!r} must be a non-empty string"
    if r["difficulty_city"] not in DIFFICULTIES:
        return f"difficulty_city {r['difficulty_city']!r} is not one of {DIFFICULTIES}"
    for key in ("station_1", "station_2", "line", "template"):
        if r[key] is not None and not isinstance(r[key], str):
            return f"field {key!r} must be a string or null"
    try:
        _check_metro(r["metro"])
    except ValueError as e:
        return str(e)
    a = r["answer"]
    need = {"TorF1": ("station_1", "station_2"), "TorF2": ("station_1", "line"),
            "Counting1": ("station_1", "station_2"), "Counting2": ("station_1",),
            "Counting3": (), "planning": ("station_1", "station_2")}[t]
    for key in need:
        if not r[key]:
            return f"{t} needs {key!r}"
    if t in ("TorF1", "TorF2") and a not in ("yes", "no"):
        return f"{t} answer must be 'yes' or 'no', got {a!r}"
    if t == "Counting1":
        opts = r.get("options")
        if a not in ("A", "B", "C", "D"):
            return f"Counting1 answer must be a letter A-D, got {a!r}"
        if not isinstance(opts, list) or len(opts) != 4 or not all(_is_int(o) for o in opts) \
                or len(set(opts)) != 4:
            return f"Counting1 options must be 4 distinct integers, got {opts!r}"
    if t in ("Counting2", "Counting3") and (not _is_int(a) or a < 0):
        return f"{t} answer must be a non-negative integer, got {a!r}"
    if t == "planning":
        if a is not None:
            return f"planning answer must be null, got {a!r}"
        if r["template"] not in TEMPLATE_NAMES:
            return f"planning template must be one of {TEMPLATE_NAMES}, got {r['template']!r}"
        if not _is_int(r["question_transfer_count"]) or r["question_transfer_count"] < 0:
            return "planning needs question_transfer_count, a non-negative integer"
        routes = r["routes"]
        if not isinstance(routes, list) or not 1 <= len(routes) <= 3:
            return "planning routes must be a list of 1 to 3 routes"
        for route in routes:
            if not isinstance(route, list) or not route:
                return "each route must be a non-empty list of segments"
            for seg in route:
                if not isinstance(seg, dict) or any(k not in seg for k in SEGMENT_KEYS):
                    return f"each segment needs the keys {SEGMENT_KEYS}"
                if not all(isinstance(seg[k], str) for k in SEGMENT_KEYS[:3]) or \
                        not isinstance(seg["via_stops"], list) or \
                        not all(isinstance(v, str) for v in seg["via_stops"]):
                    return f"bad segment {seg!r}"
    elif r["routes"] not in (None, []):
        return f"{t} must have empty routes"
    path = os.path.join(base, r["figure"])
    if path not in figure_ok:
        figure_ok[path] = _figure_problem(path)
    if figure_ok[path]:
        return f"figure {r['figure']!r}: {figure_ok[path]}"
    return None


def _figure_problem(path):
    if not os.path.isfile(path):
        return "file not found"
    try:
        image_size(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"not a readable image ({e})"
    return None


def load_records(path):
    """Read a JSONL file of records, validating each against DESIGN.md §2.

    Raises ValueError("FILE:LINE: what is wrong") on the first bad record: bad JSON, unknown type,
    missing field, wrong answer shape, bad options/routes, duplicate id, missing or unreadable figure.
    `figure` is resolved relative to the JSONL file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    records, ids, figure_ok, metros = [], set(), {}, {}
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                r = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            problem = _check_record(r, base, figure_ok)
            if problem is None and r["id"] in ids:
                problem = f"duplicate id {r['id']!r}"
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            ids.add(r["id"])
            # Every question of a city repeats its Metro Data: share one dict per city, which saves
            # memory and lets reward.py's per-metro name cache hit (21k -> 34k answers/s).
            key = json.dumps(r["metro"], sort_keys=True, ensure_ascii=False)
            r["metro"] = metros.setdefault(key, r["metro"])
            records.append(r)
    return records


def figure_path(record, jsonl_path):
    """Absolute path of a record's map (figure is stored relative to the JSONL file)."""
    return os.path.join(os.path.dirname(os.path.abspath(jsonl_path)), record["figure"])


class _bomb_guard:
    """Lift Pillow's decompression-bomb limit to this one file's size, for one Image.open call.

    The limit is a module global read only when a file is opened, so it is restored right after;
    files larger than HARD_PIXEL_CAP are still refused."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.saved = Image.MAX_IMAGE_PIXELS
        w, h = _png_size(self.path) or (0, 0)
        if w * h > HARD_PIXEL_CAP:
            raise ValueError(f"{self.path}: {w}x{h} pixels is over the {HARD_PIXEL_CAP} cap")
        if self.saved is not None and w * h > self.saved:
            Image.MAX_IMAGE_PIXELS = w * h
        return self

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self.saved
        return False


def _png_size(path):
    """(width, height) from a PNG header without Pillow, or None for other formats."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def image_size(path):
    """(width, height) of an image file from its header: cheap even for the 278 M pixel map."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _bomb_guard(path), Image.open(path) as im:
            return im.size


def _scale(w, h, max_pixels):
    if int(max_pixels) < 28 * 28:
        raise ValueError(f"max_pixels={max_pixels} is below one 28x28 patch")
    return min(1.0, math.sqrt(int(max_pixels) / (w * h)))


def scaled_size(w, h, max_pixels):
    """(width, height) that load_image gives a w x h image: at most max_pixels, aspect kept."""
    scale = _scale(w, h, max_pixels)
    return max(1, int(w * scale)), max(1, int(h * scale))


def load_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Open any map (RGB, RGBA, palette, grey; up to HARD_PIXEL_CAP pixels) as an RGB image of at
    most max_pixels pixels, aspect ratio kept. Transparency is flattened onto white.

    Memory: the decoded file is held once (PNG cannot be decoded in part); it is reduced in bands
    of rows, so no second full-size copy (RGB conversion of a palette image, say) is ever made.
    Qwen2.5-VL wants sides in multiples of 28: its processor rounds the result itself."""
    _scale(1, 1, max_pixels)  # a bad budget fails before the file is read
    # the guard is lifted for this file only while it is decoded (crop() checks the limit too)
    with warnings.catch_warnings(), _bomb_guard(path):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
        w, h = im.size
        (tw, th), scale = scaled_size(w, h, max_pixels), _scale(w, h, max_pixels)
        k = max(1, int(1 / scale) if scale < 1 else 1)  # integer pre-reduction, box filter
        while k > 1 and (w // k < tw or h // k < th):
            k -= 1
        im.load()
        out = Image.new("RGB", (w // k, h // k), "white")
        band = k * max(1, 4_000_000 // (w * k))  # rows per band: a few MB of RGB at a time
        band = max(k, band - band % k)
        for top in range(0, (h // k) * k, band):
            bottom = min(top + band, (h // k) * k)
            part = _to_rgb(im.crop((0, top, (w // k) * k, bottom)))
            if k > 1:
                part = part.reduce(k)
            out.paste(part, (0, top // k))
            del part
        im.close()
        del im  # free the full-size decode before the final resize
    if out.size != (tw, th):
        out = out.resize((tw, th), Image.Resampling.LANCZOS)
    return out


def _to_rgb(part):
    if part.mode == "RGB":
        return part
    if part.mode in ("RGBA", "LA", "PA") or (part.mode == "P" and "transparency" in part.info):
        rgba = part.convert("RGBA")
        bg = Image.new("RGB", rgba.size, "white")
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if part.mode in ("I", "I;16", "I;16B", "F"):
        return part.convert("L").convert("RGB")
    return part.convert("RGB")


# ---------------------------------------------------------------------------------------------
# The authors' released datasets -> our records (python data.py release)
#
# - ReasonMap-Plus (FSCCS/ReasonMap-Plus, data/{train,test}.parquet) and ReasonMap-Train
#   (FSCCS/ReasonMap-Train; the authors' utils/download_dataset.py keeps it as datasets'
#   save_to_disk folder: dataset_dict.json, <split>/state.json listing data-*.arrow shards in Arrow
#   IPC stream format): one row per question; `answer` an int (TorF 1/0, Counting1 0-3, counts;
#   planning rows carry a placeholder); `figure` a path such as ./maps/<country>/<city>.png.
# - ReasonMap (FSCCS/ReasonMap, data/reasonmap-1008-{train,validation}.parquet): one row per route
#   question, asked twice (question_short, question_long), reference `routes` from map services,
#   and the whole map as base64 PNG in `figure`, repeated in every row (GBs: read a few rows at a
#   time; each city's map is decoded once and written to OUT/maps/<country>/<city>.png).
# Both readings are accepted wherever the authors' code does not settle the stored form (answers
# as ints or as "yes"/"B"; `json` as a dict, JSON text or a path; `routes` as an object of plans, a
# list or JSON text; `figure` as a path, base64 text or image bytes). Which facts are confirmed and
# which inferred is listed in the README ("Reproduce Table 1").

RELEASE_MAX_LOST = 0.01          # a file's import fails if more of its records cannot be mapped
RELEASE_BATCH_BYTES = 64 << 20   # Arrow data per batch read; a ReasonMap row carries a whole map
_RELEASE_COLUMNS = {  # format: (needed, optional)
    "ReasonMap-Plus/Train": (
        ("question", "answer", "type", "figure", "country", "city", "difficulty_city"),
        ("station_1", "station_2", "json", "question_transfer_count", "city_line_count",
         "city_transfer_count", "routes")),
    "ReasonMap": (
        ("question_short", "question_long", "station_1", "station_2", "figure", "country", "city",
         "difficulty_city", "routes"),
        ("json", "question_transfer_count", "city_line_count", "city_transfer_count",
         "difficulty_question")),
}
_NUMBER = ("int", "float", "string")
_COLUMN_KINDS = {"answer": ("int", "float", "string", "bool"), "question_transfer_count": _NUMBER,
                 "city_line_count": _NUMBER, "city_transfer_count": _NUMBER,
                 "figure": ("string", "binary", "struct"), "json": ("string", "struct", "map"),
                 "routes": ("string", "list", "struct", "map")}
_RELEASE_TYPES = {t.lower(): t for t in TYPES}
_SHARD = re.compile(r"(.+?)-\d{5}-of-\d{5}")
_OPTION = re.compile(r"(?<![A-Za-z0-9])([A-D])\s*[).:：]\s*(-?\d+)")
# "Line 2", "line12", "Route 3", "A Line", "5 Train", "4号线": codes in capitals, so "a line" is not one
_LINE_MENTION = re.compile(r"(?<!\w)(?:[Ll]inea?|[Rr]oute)\s*[A-Z0-9]{1,3}(?!\w)"
                           r"|(?<!\w)[A-Z0-9]{1,3}[ -](?:[Ll]ine|[Tt]rain)(?!\w)|[0-9A-Z]{1,3}号线")
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))


def _arrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("reading the released datasets (Parquet / Arrow files) needs pyarrow, "
                          "an optional extra: pip install pyarrow") from None
    return pyarrow


class _Lost(Exception):
    """A row that cannot become a record: reason (counted) and detail (shown for the first)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class _Source:
    where: str       # shown in messages
    dataset: str     # record ids: dataset/split/row
    split: str
    name: str        # OUT/<name>.jsonl
    files: list
    arrow: bool      # save_to_disk shards (Arrow IPC) rather than Parquet


def _dataset_name(folder):
    """ReasonMap-Plus/data/test.parquet -> 'ReasonMap-Plus' (a 'data' folder is skipped)."""
    folder = os.path.abspath(folder)
    while os.path.basename(folder) == "data" and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return os.path.basename(folder) or "dataset"


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _saved_sources(folder):
    """A datasets save_to_disk folder: a DatasetDict (dataset_dict.json + one folder per split)
    or a single Dataset (state.json at the top). Shards are listed in each split's state.json."""
    name = os.path.basename(os.path.abspath(folder))
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = _read_json(os.path.join(folder, "dataset_dict.json")).get("splits")
        if not isinstance(splits, list) or not splits:
            raise ValueError(f"{os.path.join(folder, 'dataset_dict.json')}: no 'splits' list")
        parts = [(str(s), os.path.join(folder, str(s))) for s in splits]
    else:
        parts = [(None, folder)]
    out = []
    for split, sdir in parts:
        state_path = os.path.join(sdir, "state.json")
        state = _read_json(state_path)
        files = [os.path.join(sdir, f.get("filename", "")) for f in state.get("_data_files") or []
                 if isinstance(f, dict)]
        if not files:
            raise ValueError(f"{state_path}: no '_data_files' listed")
        split = split or state.get("_split") or "train"
        out.append(_Source(sdir, name, split, f"{name}-{split}", files, arrow=True))
    return out


def _release_sources(path):
    """The files behind PATH: a .parquet file, a save_to_disk folder, or a folder holding either
    (hub shards such as train-00000-of-00002.parquet form one split, named 'train')."""
    saved, groups = [], {}
    if os.path.isfile(path) and path.endswith(".parquet"):
        groups[(os.path.dirname(path), os.path.basename(path)[:-8])] = [path]
    elif os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if any(os.path.isfile(os.path.join(root, f)) for f in ("dataset_dict.json", "state.json")):
                saved += _saved_sources(root)
                dirs[:] = []
                continue
            for f in sorted(files):
                if f.endswith(".parquet"):
                    shard = _SHARD.fullmatch(f[:-8])
                    key = (root, shard.group(1) if shard else f[:-8])
                    groups.setdefault(key, []).append(os.path.join(root, f))
    else:
        raise ValueError(f"{path}: not a .parquet file, a save_to_disk folder, or a folder of them")
    if not saved and not groups:
        raise ValueError(f"{path}: holds no .parquet file and no save_to_disk folder")
    return saved + [_Source(files[0] if len(files) == 1 else os.path.join(root, stem + "-*.parquet"),
                            _dataset_name(root), stem, stem, files, arrow=False)
                    for (root, stem), files in sorted(groups.items())]


def _open_source(src):
    """(schema, batches, number of batches or 0 if unknown) of a source's files, read lazily."""
    pa = _arrow()
    if src.arrow:   # datasets writes (and reads) its shards as memory-mapped IPC streams
        readers = []
        for f in src.files:
            try:
                readers.append(pa.ipc.open_stream(pa.memory_map(f)))
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{f}: not an Arrow IPC stream ({e})") from None

        def batches():
            for reader in readers:
                yield from reader
        schemas = [r.schema for r in readers]
        count = 0
    else:
        # Memory: Parquet decodes a whole data page at a time, so a file written with all of
        # its base64 maps in one page is held once, whatever the batch size.
        try:
            files = [pa.parquet.ParquetFile(f, buffer_size=1 << 20) for f in src.files]
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{src.where}: not a readable Parquet file ({e})") from None
        sizes = []
        for pf in files:    # rows per batch from the mean row size: a few for ReasonMap's maps
            meta = pf.metadata
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            rows = max(1, min(1024, RELEASE_BATCH_BYTES * max(1, meta.num_rows) // max(1, size)))
            sizes.append(rows)

        def batches():
            for pf, rows in zip(files, sizes):
                yield from pf.iter_batches(batch_size=rows)
        schemas = [pf.schema_arrow for pf in files]
        count = sum(-(-pf.metadata.num_rows // rows) for pf, rows in zip(files, sizes))
    for f, schema in zip(src.files, schemas):
        if not schema.equals(schemas[0], check_metadata=False):
            raise ValueError(f"{f}: its columns differ from those of {src.files[0]}")
    return schemas[0], batches(), count


def _arrow_kind(pa, t):
    if pa.types.is_dictionary(t):
        t = t.value_type
    for kind, test in (("string", lambda: pa.types.is_string(t) or pa.types.is_large_string(t)),
                       ("binary", lambda: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
                       ("int", lambda: pa.types.is_integer(t)), ("float", lambda: pa.types.is_floating(t)),
                       ("bool", lambda: pa.types.is_boolean(t)), ("struct", lambda: pa.types.is_struct(t)),
                       ("map", lambda: pa.types.is_map(t)), ("null", lambda: pa.types.is_null(t)),
                       ("list", lambda: pa.types.is_list(t) or pa.types.is_large_list(t))):
        if test():
            return kind
    return str(t)


def _release_format(schema, where):
    """('ReasonMap-Plus/Train' | 'ReasonMap', unused columns); ValueError naming the file and the
    column for a missing column or one whose Arrow type cannot hold what it should."""
    pa = _arrow()
    names = list(schema.names)
    if "question_short" in names or "question_long" in names:
        fmt = "ReasonMap"
    elif "question" in names:
        fmt = "ReasonMap-Plus/Train"
    else:
        raise ValueError(f"{where}: neither a column 'question' (ReasonMap-Plus, ReasonMap-Train) "
                         f"nor 'question_short'/'question_long' (ReasonMap); columns: {names}")
    needed, optional = _RELEASE_COLUMNS[fmt]
    unused = [c for c in names if c not in needed + optional]
    for column in needed:
        if column not in names:
            raise ValueError(f"{where}: no column {column!r} ({fmt} needs {', '.join(needed)})"
                             + (f"; columns not understood: {unused}" if unused else ""))
    for column in names:
        if column in unused:
            continue
        allowed = _COLUMN_KINDS.get(column, ("string",)) + (("null",) if column in optional else ())
        kind = _arrow_kind(pa, schema.field(column).type)
        if kind not in allowed:
            raise ValueError(f"{where}: column {column!r} has Arrow type "
                             f"{schema.field(column).type}, expected {' or '.join(allowed)}")
    return fmt, unused


def _release_int(value):
    """An int from 3, 3.0 or '3' (pandas stores an int column with gaps as floats); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return value if isinstance(value, int) else None


def _release_answer(kind, value):
    """The int answer in our encoding (DESIGN.md §2): TorF 1/0 -> 'yes'/'no', Counting1 0-3 ->
    'A'-'D', counts as ints, planning None. 'yes'/'no' and letters already decoded pass as they are."""
    if kind == "planning":
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    number = _release_int(value)
    if kind in ("TorF1", "TorF2"):
        if value is True or number == 1 or text in ("yes", "true"):
            return "yes"
        if value is False or number == 0 or text in ("no", "false"):
            return "no"
        raise _Lost(f"{kind} answer is not 1/0", repr(value))
    if kind == "Counting1":
        if text in ("a", "b", "c", "d"):
            return text.upper()
        if number in (0, 1, 2, 3):
            return "ABCD"[number]
        raise _Lost("Counting1 answer is not 0-3", repr(value))
    if number is None or number < 0:
        raise _Lost(f"{kind} answer is not a count", repr(value))
    return number


def _release_options(question):
    """Counting1's four numbers from the question text ('A) 8 \\nB) 1 \\nC) 25 \\nD) 12');
    the last mention of each letter wins (the options close the question)."""
    found = {letter: int(n) for letter, n in _OPTION.findall(question)}
    if sorted(found) != ["A", "B", "C", "D"]:
        raise _Lost("Counting1 options A-D not found in the question", question[-80:])
    return [found[c] for c in "ABCD"]


def _release_line(question, metro, city, s1):
    """TorF2's line: the one Metro Data line the question names ('Line 12' is not 'Line 1')."""
    lines, found = list(metro), set()
    text = re.sub(re.escape(s1), " ", question, flags=re.I) if s1 else question
    for line in sorted(lines, key=len, reverse=True):     # whole names first, longest first
        if len(line) >= 3:
            whole = re.compile(r"(?<!\w)" + re.escape(line) + r"(?!\w)", re.I)
            if whole.search(text):
                found.add(line)
                text = whole.sub(" ", text)
    found.update(filter(None, (service_line(m.group(), lines, city)
                               for m in _LINE_MENTION.finditer(text))))
    if len(found) != 1:
        raise _Lost("TorF2: no single Metro Data line named in the question",
                    f"{sorted(found)} in {question[:120]!r}")
    return found.pop()


def _release_template(question):
    """Which planning template a question uses (RM App. A.1; the release marks none):
    'Number of Via Stops' -> long1, 'Via Stops' -> long2, else short."""
    text = question.lower()
    return "long1" if "number of via stops" in text else "long2" if "via stops" in text else "short"


def _release_plans(value):
    """Reference plans as lists of segment dicts, whatever Arrow made of them: an object of plans
    (main.py iterates routes.items(); a struct column fills absent plans with null), a map (pairs),
    a list of plans, one plan, or JSON text of any of these."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Lost("routes is not JSON", value[:80]) from None
    if isinstance(value, dict):
        plans = list(value.values())
    elif isinstance(value, list) and value and all(isinstance(x, tuple) for x in value):
        plans = [v for _, v in value]
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        plans = [value]
    elif isinstance(value, list):
        plans = value
    else:
        raise _Lost("routes is not a list or an object of plans", repr(value)[:80])
    plans = [p for p in plans if p]
    if not plans or not all(isinstance(p, list) and all(isinstance(s, dict) for s in p) for p in plans):
        raise _Lost("no reference route (each a list of segments)", repr(value)[:80])
    return plans


def _release_segment(seg, metro, city, note):
    """A map service's segment in Metro Data names: the line via reward.service_line, stops as the
    line writes them, via stops from the service or else the line's own ride. What cannot be
    matched is kept as written (it scores like a wrong name, as in ReasonMap's evaluator)."""
    name, dep, arr = (seg.get(k) for k in ("route_name", "departure_stop", "arrival_stop"))
    if not all(isinstance(x, str) and x.strip() for x in (name, dep, arr)):
        raise _Lost("a reference segment lacks route_name, departure_stop or arrival_stop", repr(seg)[:80])
    via = [clean_name(v) for v in seg.get("via_stops") or () if isinstance(v, str) and v.strip()]
    dep, arr, line = clean_name(dep), clean_name(arr), service_line(name, list(metro), city)
    if line is None:
        note("reference route name matches no Metro Data line (kept as written)", name)
        return {"route_name": name.strip(), "departure_stop": dep, "arrival_stop": arr, "via_stops": via}
    on_line = {normalize_stop(s): s for s in metro[line]}
    if normalize_stop(dep) not in on_line or normalize_stop(arr) not in on_line:
        note("reference stop not on its Metro Data line (kept as written)", f"{dep} / {arr} on {line}")
    dep, arr = on_line.get(normalize_stop(dep), dep), on_line.get(normalize_stop(arr), arr)
    if via:
        via = [on_line.get(normalize_stop(v), v) for v in via]
    elif dep in metro[line] and arr in metro[line] and normalize_stop(dep) != normalize_stop(arr):
        via = _ride(metro, line, dep, arr)
        given = _release_int(seg.get("num_via_stops"))
        if given is not None and given != len(via):
            note("num_via_stops differs from the Metro Data ride (ride kept)", f"{given} vs {len(via)}")
    return {"route_name": line, "departure_stop": dep, "arrival_stop": arr, "via_stops": via}


def _release_routes(value, metro, city, note):
    plans = _release_plans(value)
    if len(plans) > 3:     # DESIGN.md §2 keeps at most 3 reference routes
        note("more than 3 reference routes: the first 3 kept", str(len(plans)))
    return [[_release_segment(seg, metro, city, note) for seg in plan] for plan in plans[:3]]


def _release_difficulty(value):
    level = {"medium": "middle"}.get(str(value).strip().lower(), str(value).strip().lower())
    if level not in DIFFICULTIES:
        raise _Lost("difficulty_city is not easy/middle/hard", repr(value))
    return level


def _release_station(value):
    return clean_name(value) if isinstance(value, str) and value.strip() else None


class _Release:
    """One `data.py release` run: a city's Metro Data and map, found or decoded once."""

    def __init__(self, maps_dir, stations_dir, out_dir):
        self.maps, self.stations, self.out = maps_dir, stations_dir, out_dir
        self.cities, self.decoded, self.found = {}, {}, {}

    def city(self, row, base):
        """(country, city, metro, names not to transfer at) from --stations, else the row's json."""
        country, city = (str(row.get(k) or "").strip() for k in ("country", "city"))
        if not all(re.fullmatch(r"\w[\w.-]*", name) for name in (country, city)):
            raise _Lost("country/city is not a folder-style name", f"{country!r}/{city!r}")
        key = (country, city)
        if key not in self.cities:
            try:
                path = os.path.join(self.stations, country, city + ".json")
                raw = load_metro_raw(path) if os.path.isfile(path) else \
                    self._metro_from(row.get("json"), base, path)
                metro = {line: [clean_name(s) for s in stops] for line, stops in raw.items()}
                self.cities[key] = (metro, ambiguous_stops(raw))
            except (ValueError, OSError) as e:
                self.cities[key] = str(e)
        if isinstance(self.cities[key], str):
            raise _Lost("no Metro Data for the city", self.cities[key])
        return (country, city) + self.cities[key]

    def _metro_from(self, value, base, looked):
        where = f"not at {looked}; the row's 'json'"
        if isinstance(value, list):                    # an Arrow map: (line, stops) pairs
            value = dict(value)
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e})") from None
        elif isinstance(value, str) and value.strip():   # a path, e.g. ./stations/china/beijing.json
            text = value.strip()
            tail = text.replace("\\", "/").split("stations/")[-1]
            for path in (text, os.path.join(base, text), os.path.join(self.stations, tail)):
                if os.path.isfile(path):
                    return load_metro_raw(path)
            raise ValueError(f"{where} path {text!r} is not a file")
        if not isinstance(value, dict):
            raise ValueError(f"{where} is {type(value).__name__}, not Metro Data")
        # an Arrow struct holds every city's line names, null where the city has no such line
        raw = {line: stops for line, stops in value.items() if stops is not None}
        _check_metro(raw, where)
        return raw

    def figure(self, country, city, value_of, base, note):
        """Absolute path of the row's map. value_of() is only called when the city's map was not
        decoded yet: ReasonMap repeats a base64 map of ~100 MB in every row."""
        key = (country, city)
        if key in self.decoded:
            return self.decoded[key]
        value = value_of()
        if isinstance(value, dict):                      # datasets' Image feature
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return self._save(key, bytes(value))
        text = value.strip() if isinstance(value, str) else ""
        if not text:
            raise _Lost("no figure")
        if len(text) < 4096 and re.search(r"\.(png|jpe?g)$", text, re.I):
            return self._find(text, key, base, note)
        try:
            data = base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text)
        except ValueError:                               # binascii.Error
            raise _Lost("figure is neither a map path nor base64 image data", text[:60]) from None
        return self._save(key, data)

    def _find(self, text, key, base, note):
        """./maps/<country>/<city>.png under --maps (or beside the input file); failing that,
        --maps/<country>/<city>.<ext> with a note, for paths written on the authors' machines."""
        if (text, key) not in self.found:
            rel = text[2:] if text.startswith("./") else text
            places = [rel] if os.path.isabs(rel) else []
            if rel.replace("\\", "/").startswith("maps/"):
                places.append(os.path.join(self.maps, rel[5:]))
            places += [os.path.join(self.maps, rel), os.path.join(base, rel)]
            path = next((p for p in places if os.path.isfile(p)), None)
            by_city = os.path.join(self.maps, *key[:1], key[1] + os.path.splitext(rel)[1])
            if path is None and os.path.isfile(by_city):
                path = by_city
            self.found[(text, key)] = (path and os.path.abspath(path), path == by_city)
        path, by_city = self.found[(text, key)]
        if path is None:
            raise _Lost("map file not found (--maps)", text)
        if by_city:
            note("map found by country/city, not at its figure path", text)
        return path

    def _save(self, key, data):
        ext = next((e for magic, e in _IMAGE_MAGIC if data.startswith(magic)), None)
        if ext is None:
            raise _Lost("figure data is not a PNG or JPEG image", repr(data[:16]))
        path = os.path.abspath(os.path.join(self.out, "maps", key[0], key[1] + ext))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
        self.decoded[key] = path
        return path


def _release_record(kind, rid, question, answer, row, run, place, **kw):
    """A record (DESIGN.md §2) for one question of a row; place = (country, city, metro, map)."""
    country, city, metro, map_path = place
    counts = (_release_int(row.get("city_line_count")), _release_int(row.get("city_transfer_count")))
    rec = _record(kind, 0, question, answer, city=city, country=country,
                  difficulty=_release_difficulty(row["difficulty_city"]),
                  figure=os.path.relpath(map_path, run.out).replace(os.sep, "/"), metro=metro,
                  counts=counts, **kw)
    rec["id"] = rid
    if row.get("difficulty_question") is not None:
        rec["difficulty_question"] = row["difficulty_question"]
    return rec


def _plus_records(row, figure, rid, run, note, base):
    """A ReasonMap-Plus / ReasonMap-Train row -> [record]."""
    kind = _RELEASE_TYPES.get(str(row["type"]).strip().lower())
    if kind is None:
        raise _Lost("unknown type", repr(row["type"]))
    question = row["question"] if isinstance(row["question"], str) else ""
    if not question.strip():
        raise _Lost("empty question")
    country, city, metro, avoid = run.city(row, base)
    place = (country, city, metro, run.figure(country, city, figure, base, note))
    s1, s2 = _release_station(row.get("station_1")), _release_station(row.get("station_2"))
    answer = _release_answer(kind, row["answer"])
    qtc = _release_int(row.get("question_transfer_count"))
    qtc = qtc if qtc is not None and qtc >= 0 else None
    kw = dict(s1=s1, s2=s2, qtc=qtc)
    if kind == "Counting1":
        kw["options"] = _release_options(question)
    elif kind == "TorF2":     # the line is in station_2 (if that names no stop) or in the text
        stops = {normalize_stop(s) for line_stops in metro.values() for s in line_stops}
        line = service_line(s2, list(metro), city) if s2 and normalize_stop(s2) not in stops else None
        kw["s2"] = None if line else s2
        kw["line"] = line or _release_line(question, metro, city, s1)
    elif kind == "planning":
        if not (s1 and s2):
            raise _Lost("planning row without station_1 and station_2")
        if row.get("routes") is not None:
            kw["routes"] = _release_routes(row["routes"], metro, city, note)
        else:
            kw["routes"] = best_routes(metro, s1, s2, limit=3, no_transfer_at=avoid) or \
                best_routes(metro, s1, s2, limit=3)
            note("reference routes from the route oracle (the row has none)")
            if not kw["routes"]:
                raise _Lost("no route between station_1 and station_2 in the Metro Data")
        if qtc is None:
            kw["qtc"] = min(len(route) for route in kw["routes"]) - 1
        kw["template"] = _release_template(question)
    return [_release_record(kind, rid, question, answer, row, run, place, **kw)]


def _reasonmap_records(row, figure, rid, run, note, base):
    """A ReasonMap row -> [short record, long record] (RM App. A.1: each question asked twice)."""
    texts = [row[k] if isinstance(row[k], str) else "" for k in ("question_short", "question_long")]
    if not all(t.strip() for t in texts):
        raise _Lost("empty question_short or question_long")
    s1, s2 = _release_station(row["station_1"]), _release_station(row["station_2"])
    if not (s1 and s2):
        raise _Lost("empty station_1 or station_2")
    country, city, metro, _ = run.city(row, base)
    place = (country, city, metro, run.figure(country, city, figure, base, note))
    routes = _release_routes(row["routes"], metro, city, note)
    qtc = _release_int(row.get("question_transfer_count"))
    if qtc is None or qtc < 0:
        qtc = min(len(route) for route in routes) - 1
        note("question_transfer_count missing: fewest transfers of the reference routes")
    # main.py: a long question asks "Number of Via Stops" (long1) or else "Via Stops" (long2)
    long = "long1" if "number of via stops" in texts[1].lower() else "long2"
    return [_release_record("planning", f"{rid}/{part}", text, None, row, run, place, s1=s1, s2=s2,
                            qtc=qtc, routes=routes, template=template)
            for part, text, template in (("short", texts[0], "short"), ("long", texts[1], long))]


def _tally(table, reason, example, n=1):
    entry = table.setdefault(reason, [0, example])
    entry[0] += n


def _release_file(src, run, max_lost):
    """Import one source; returns its summary dict. Nothing is written when too much is lost."""
    schema, batches, count = _open_source(src)
    fmt, unused = _release_format(schema, src.where)
    convert, per_row = (_reasonmap_records, 2) if fmt == "ReasonMap" else (_plus_records, 1)
    base = os.path.dirname(os.path.abspath(src.files[0]))
    out_base = os.path.abspath(run.out)
    records, lost, notes, figure_ok, n_rows = [], {}, {}, {}, 0
    for batch in _progress(batches, f"import {src.name}", count):
        figures = batch.column("figure")   # read per row, only when a city's map is still needed
        columns = {c: batch.column(c).to_pylist() for c in batch.schema.names if c != "figure"}
        for i in range(batch.num_rows):
            rid = f"{src.dataset}/{src.split}/{n_rows}"
            n_rows += 1
            row = {c: values[i] for c, values in columns.items()}

            def note(reason, detail="", rid=rid):
                _tally(notes, reason, f"{rid}: {detail}" if detail else rid)
            try:
                made = convert(row, lambda i=i: figures[i].as_py(), rid, run, note, base)
            except _Lost as e:
                _tally(lost, e.reason, f"{rid}: {e.detail}" if e.detail else rid, per_row)
                continue
            for rec in made:
                problem = _check_record(rec, out_base, figure_ok)
                if problem:    # our mapping made something load_records would refuse
                    _tally(lost, f"record check: {problem}", rec["id"])
                else:
                    records.append(rec)
    if n_rows == 0:
        raise ValueError(f"{src.where}: no rows")
    expected = n_rows * per_row
    summary = {"source": src.where, "format": fmt, "rows": n_rows, "records": records,
               "lost": lost, "notes": notes, "unused_columns": unused,
               "path": os.path.join(run.out, src.name + ".jsonl")}
    n_lost = expected - len(records)
    if n_lost > max_lost * expected:
        raise ValueError(f"{src.where}: {n_lost} of {expected} records could not be mapped, more "
                         f"than the {max_lost:.1%} allowed (--max-lost); nothing written for it\n"
                         + _release_lines(summary, "lost"))
    _write_jsonl(summary["path"] + ".part", records)
    os.replace(summary["path"] + ".part", summary["path"])
    return summary


def _release_lines(summary, key):
    label = {"lost": "lost", "notes": "note"}[key]
    return "\n".join(f"  {label}: {n} x {reason} (first: {example})"
                     for reason, (n, example) in sorted(summary[key].items(), key=lambda kv: -kv[1][0]))


def release_report(summary):
    """What `data.py release` prints for one file: rows, records per type (and template), every
    loss and note by reason with its count and first example, and the columns not used."""
    recs = summary["records"]
    by_type = collections.Counter(r["type"] for r in recs)
    templates = collections.Counter(r["template"] for r in recs if r["type"] == "planning")
    lines = [f"{summary['source']} ({summary['format']}) -> {summary['path']}: "
             f"{summary['rows']} rows, {len(recs)} records",
             "  " + "  ".join(f"{t}={by_type[t]}" for t in TYPES if by_type[t])
             + (" (" + " ".join(f"{t}={templates[t]}" for t in TEMPLATE_NAMES if templates[t])
                + ")" if templates else "")]
    lines += [x for x in (_release_lines(summary, "lost"), _release_lines(summary, "notes")) if x]
    if summary["unused_columns"]:
        lines.append(f"  columns not used: {', '.join(summary['unused_columns'])}")
    return "\n".join(lines)


def release(paths, maps_dir, stations_dir, out_dir, max_lost=RELEASE_MAX_LOST, report=None):
    """The authors' released files -> OUT/<name>.jsonl, one per file and split (name: the file's
    stem, or <folder>-<split> for a save_to_disk folder), each loadable by load_records.

    Record ids are <dataset>/<split>/<row>[/short|/long]; metro comes from --stations (else the
    row's `json`); figures point at maps under --maps, or at maps decoded into OUT/maps/.
    Returns one summary per file (release_report prints it; `report` is called with each as it
    is done). ValueError naming the file (and the column) when a file cannot be read, or when more
    than max_lost of its records cannot be mapped; files imported before it stay written."""
    _arrow()
    sources = [src for path in paths for src in _release_sources(path)]
    names = {}
    for src in sources:
        if src.name in names:
            raise ValueError(f"{names[src.name]} and {src.where} would both be written to "
                             f"{src.name}.jsonl: import them into different --out folders")
        names[src.name] = src.where
    os.makedirs(out_dir, exist_ok=True)
    run = _Release(maps_dir, stations_dir, out_dir)
    summaries = []
    for src in sources:
        summaries.append(_release_file(src, run, max_lost))
        if report:
            report(summaries[-1])
    return summaries


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description="RewardMap data engine (RM §3, RewardMap §3)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="synthetic cities: DIR/train.jsonl, DIR/test.jsonl, DIR/maps/")
    s.add_argument("--out", required=True)
    s.add_argument("--cities", type=int, default=6)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-type", type=int, default=8)
    r = sub.add_parser("real", help="ReasonMap Metro Data + maps, paper's city split")
    r.add_argument("--stations", required=True)
    r.add_argument("--maps", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--per-type", type=int, default=20)
    r.add_argument("--seed", type=int, default=0)
    x = sub.add_parser("release", help="the authors' released datasets (ReasonMap-Plus, "
                       "ReasonMap-Train, ReasonMap) -> OUT/<name>.jsonl; needs pyarrow")
    x.add_argument("paths", nargs="+", metavar="PATH",
                   help="a .parquet file, a save_to_disk folder, or a folder of either")
    x.add_argument("--maps", required=True, help="the RewardMap repository's maps/ folder")
    x.add_argument("--stations", required=True, help="the ReasonMap repository's stations/ folder")
    x.add_argument("--out", required=True)
    x.add_argument("--max-lost", type=float, default=RELEASE_MAX_LOST,
                   help="fail a file if more than this share of its records cannot be mapped")
    a = p.parse_args(argv)
    if a.cmd == "release":
        try:
            release(a.paths, a.maps, a.stations, a.out, max_lost=a.max_lost,
                    report=lambda summary: print(release_report(summary), flush=True))
        except (ValueError, ImportError) as e:
            sys.exit(f"data.py release: {e}")
        return
    if a.cmd == "synth":
        paths = synth(a.out, cities=a.cities, seed=a.seed, per_type=a.per_type)
    else:
        paths = real(a.stations, a.maps, a.out, per_type=a.per_type, seed=a.seed)
    for path in paths:
        recs = load_records(path)
        by_type = {t: sum(1 for x in recs if x["type"] == t) for t in TYPES}
        print(f"{path}: {len(recs)} records  " + "  ".join(f"{t}={n}" for t, n in by_type.items()))


if __name__ == "__main__":
    main()
