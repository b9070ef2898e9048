"""The data engine: metro graphs, the route oracle, the six question types, synthetic maps, JSONL I/O.

RewardMap §3 and App. A (ReasonMap-Plus: TorF1, TorF2, Counting1-3, one function each with its
App. A.2 template) and ReasonMap RM §3 (route planning), on ReasonMap's own Metro Data format
({line: [stop, ...]}, markers such as " (Transfer Station)"). Optimal route: fewest transfers,
then fewest stops, on the name graph (a stop name shared by two lines joins them, as the official
evaluation assumes); questions the name graph cannot settle are not asked (ambiguous_stops).

    python data.py synth --out data/synth --cities 6 --seed 0       # seconds; README quick start
    python data.py real --stations ../shared/reasonmap/stations \\
                        --maps ../shared/reasonmap/maps --out data/real   # paper's city split

Both write OUT/train.jsonl and OUT/test.jsonl, one record per line (fields named as in the
ReasonMap-Plus release); train.py and eval.py read them with load_records(). The authors' released
files become the same records with tools/release.py. No torch, no model code.
Where this departs from the paper or the release: docs/deviations.md, "Data".
"""
import argparse
import dataclasses
import heapq
import json
import math
import os
import random
import warnings

from PIL import Image, ImageDraw, ImageFont

from reward import DIFFICULTIES, TEMPLATE_NAMES, TYPES, normalize_stop

# RM §3: the test cities of the paper; every other city trains.
TEST_CITIES = ("auckland", "los_angeles", "miami", "lisboa", "geneva", "beijing", "hangzhou",
               "budapest", "singapore", "rome", "toronto")
MARKERS = (" (Transfer Station)", "（换乘站）", " (Branch-starting Station)", "（支线起始站）")
TRANSFER_MARKERS = (" (Transfer Station)", "（换乘站）")
# Image budgets in pixels; Qwen2.5-VL spends one image token per 28x28 px (14 px patches, 2x2
# merge). The paper fed maps at Qwen2.5-VL's processor default, PAPER_MAX_PIXELS (16384 tokens;
# the 17 maps here give 576-16,356 image tokens there, median 13,225). Our default for real models
# is DEFAULT_MAX_PIXELS (<= 1280 tokens); train.py --max-pixels sets either (the memory and prompt
# length each costs: docs/memory.md). load_image keeps the aspect ratio; the processor rounds to
# multiples of 28 itself.
# Deviation: a smaller image budget than the paper's by default (docs/deviations.md).
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


def check_metro(metro, where="metro"):
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
    check_metro(raw, path)
    return raw


def load_metro(path):
    """{line: [stop, ...]} with the transfer / branch markers removed (as the official eval does)."""
    return {line: [clean_name(s) for s in stops] for line, stops in load_metro_raw(path).items()}


def ambiguous_stops(raw_metro):
    """Normalised names on several lines with no transfer marker anywhere: on the name graph they
    join lines, in the city they may be different stations (NY's "125 St" on 1, 2/3, A/B/C/D, 4/5/6),
    so no question asks about them and no reference route transfers at them."""
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


def ride(metro, line, s1, s2):
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
    return len(ride(metro, line, s1, s2))


def city_difficulty(metro):
    """Map difficulty from line count L and transfer-station count T (names on >= 2 lines).

    hard: L >= 10 or T >= 50;  easy: L <= 3 (and not hard);  middle: the rest.
    On the 30 ReasonMap cities this gives easy = 10 (sydney, miami, changzhou, huhehaote, dubai,
    toronto, guiyang, jinan, rome, auckland), hard = 6 (new_york, beijing, shanghai, shenzhen,
    hangzhou, xian), middle = 14 (oslo and geneva, whose shared tram tracks make T ~ 40, stay
    middle). Deviation: the release stores a label per city; this rule is ours (docs/deviations.md).
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
# Questions (RewardMap App. A.2; ReasonMap App. A.1).
# ReasonMap-Plus: App. A.2's five templates verbatim (stop 1 / stop 2 / x -> {s1} / {s2} / {line},
# Counting1's options {o0}..{o3}). Counting1 is character for character the authors' released
# example (RewardMap README, output of its utils/prepare_data_for_sft.py): straight quotes,
# "\boxed{}", options " \nA) 8 \nB) 1 \nC) 25 \nD) 12 \n". The other four are App. A.2's text
# (the PDF drops the backslash and curls the quotes) with that same '"\boxed{}"'. No city in
# the question, as in the release. Planning: the wording is ours (ReasonMap's code has no prompt
# templates; it reads question_short / question_long from its dataset), the answer formats the
# release's (docs/deviations.md).
PLUS_TEMPLATES = {
    "Counting1": 'Please solve the multiple choice problem and put your answer (one of ABCD) in one '
                 '"\\boxed{{}}". According to the subway map, how many intermediate stops are there '
                 'between {s1} and {s2} (except for this two stops)? '
                 '\nA) {o0} \nB) {o1} \nC) {o2} \nD) {o3} \n',
    "Counting2": 'Please solve the problem and put your answer in one "\\boxed{{}}". According to '
                 'the subway map, how many lines pass through {s1}?',
    "Counting3": 'Please solve the problem and put your answer in one "\\boxed{{}}". According to '
                 'the subway map, how many subway (metro) lines are there in total?',
    "TorF1": 'Please solve the problem and put your answer (only answer yes or no) in one '
             '"\\boxed{{}}". According to the subway map, is it true that {s1} is the same line as '
             '{s2}?',
    "TorF2": 'Please solve the problem and put your answer (only answer yes or no) in one '
             '"\\boxed{{}}". According to the subway map, is it true that {s1} is on the line '
             '{line}?',
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


def make_record(kind, idx, question, answer, *, city, country, difficulty, figure, metro, counts,
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


@dataclasses.dataclass
class _City:
    """What every question type needs to know of one city, worked out once by make_questions."""
    metro: dict       # {line: [stop, ...]}
    disp: dict        # normalised stop -> its name as written
    lines_of: dict    # normalised stop -> the lines through it, in metro order
    single: dict      # line -> (not a loop, normalised stops listed once on it)
    bad: set          # normalised stops never asked about
    safe: list        # the other stops, sorted
    blocked: list     # names (as written) where no reference route may transfer
    title: str        # the city as the planning questions name it
    common: dict      # the make_record fields shared by all its questions


def make_questions(metro, *, city, country, difficulty, figure, rng, per_type=10, avoid=()):
    """Records of all six types for one city: per_type of each (Counting3: one per map), made in
    the order below from one rng. `avoid`: stop names never asked about nor transferred at (see
    ambiguous_stops)."""
    check_metro(metro)
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
    counts = (len(metro), sum(1 for ls in lines_of.values() if len(ls) > 1))
    common = dict(city=city, country=country, difficulty=difficulty, figure=figure,
                  metro=metro, counts=counts)
    c = _City(metro, disp, lines_of, single, bad, safe, blocked, city_title(city), common)
    return (_torf1(c, rng, per_type) + _torf2(c, rng, per_type) + _counting1(c, rng, per_type)
            + _counting2(c, rng, per_type) + _counting3(c) + _planning(c, rng, per_type))


def _torf1(c, rng, n):
    """TorF1, App. A.2 "True or False 1" (are stop 1 and stop 2 on one line). Yes and no balanced."""
    def candidate(want_yes):
        def make():
            if want_yes:
                line = rng.choice(list(c.metro))
                cand = [n for n in c.single[line][1] if n not in c.bad]
                if len(cand) < 2:
                    return None
                a, b = rng.sample(cand, 2)
            else:
                a, b = rng.sample(c.safe, 2)
                if set(c.lines_of[a]) & set(c.lines_of[b]):
                    return None
            return (tuple(sorted((a, b))), a, b)
        return make
    out = []
    for i, (_, a, b) in enumerate(_balanced(rng, n, candidate(True), candidate(False), 50)):
        same = bool(set(c.lines_of[a]) & set(c.lines_of[b]))
        q = PLUS_TEMPLATES["TorF1"].format(s1=c.disp[a], s2=c.disp[b])
        out.append(make_record("TorF1", i, q, "yes" if same else "no", s1=c.disp[a], s2=c.disp[b],
                               **c.common))
    return out


def _torf2(c, rng, n):
    """TorF2, App. A.2 "True or False 2" (is stop 1 on line x). Yes and no balanced."""
    def candidate(want_yes):
        def make():
            line = rng.choice(list(c.metro))
            if want_yes:
                cand = [n for n in c.single[line][1] if n not in c.bad]
            else:
                cand = [n for n in c.safe if line not in c.lines_of[n]]
            if not cand:
                return None
            a = rng.choice(cand)
            return ((a, line), a, line)
        return make
    out = []
    for i, (_, a, line) in enumerate(_balanced(rng, n, candidate(True), candidate(False), 50)):
        q = PLUS_TEMPLATES["TorF2"].format(s1=c.disp[a], line=line)
        ans = "yes" if line in c.lines_of[a] else "no"
        out.append(make_record("TorF2", i, q, ans, s1=c.disp[a], line=line, **c.common))
    return out


def _counting1(c, rng, n):
    """Counting1, App. A.2 "Local Counting 1" (intermediate stops between stop 1 and stop 2, A-D).
    Two stops listed once on a line that is not a loop (a loop has two answers); the right count
    and three others within 4 of it, shuffled."""
    seen, out = set(), []
    for _ in range(50 * max(n, 1)):
        if len(out) >= n:
            break
        line = rng.choice(list(c.metro))
        linear, ok = c.single[line]
        names = _line_stops(c.metro[line])[0]
        idx = [i for i, s in enumerate(names) if s in ok and s not in c.bad]
        if not linear or len(idx) < 2:
            continue
        i, j = sorted(rng.sample(idx, 2))
        if j - i < 2 or (line, i, j) in seen:
            continue
        seen.add((line, i, j))
        k = j - i - 1
        pool = [m for m in range(max(0, k - 4), k + 5) if m != k]
        options = rng.sample(pool, 3) + [k]
        rng.shuffle(options)
        letter = "ABCD"[options.index(k)]
        a, b = (names[i], names[j]) if rng.random() < 0.5 else (names[j], names[i])
        q = PLUS_TEMPLATES["Counting1"].format(s1=c.disp[a], s2=c.disp[b], o0=options[0],
                                               o1=options[1], o2=options[2], o3=options[3])
        out.append(make_record("Counting1", len(out), q, letter, s1=c.disp[a], s2=c.disp[b],
                               line=line, options=options, **c.common))
    return out


def _counting2(c, rng, n):
    """Counting2, App. A.2 "Local Counting 2" (lines through stop 1). Half of the stops are
    transfer stations, where counting is the skill."""
    hubs = [s for s in c.safe if len(c.lines_of[s]) > 1]
    chosen = []
    for k in range(n):
        pool = hubs if (k % 2 == 0 and hubs) else c.safe
        rest = [s for s in pool if s not in chosen] or [s for s in c.safe if s not in chosen]
        if not rest:
            break
        chosen.append(rng.choice(rest))
    return [make_record("Counting2", i, PLUS_TEMPLATES["Counting2"].format(s1=c.disp[a]),
                        len(c.lines_of[a]), s1=c.disp[a], **c.common)
            for i, a in enumerate(chosen)]


def _counting3(c):
    """Counting3, App. A.2 "Global Counting" (lines in the map). One question per map."""
    return [make_record("Counting3", 0, PLUS_TEMPLATES["Counting3"].format(),
                        len(c.metro), **c.common)]


def _planning(c, rng, n):
    """planning (RM §3, RM App. A.1 templates short / long1 / long2, in turn): pairs mixing 0 / 1 /
    >= 2 transfers, each with up to 3 optimal reference routes. A pair whose optimum needs a
    transfer at a name the data cannot vouch for (c.blocked) is not asked."""
    buckets, seen = {0: [], 1: [], 2: []}, set()
    want = {k: n // 3 + (1 if k < n % 3 else 0) for k in buckets}
    for _ in range(30 * max(n, 1)):
        if all(len(buckets[k]) >= want[k] for k in buckets):
            break
        a, b = rng.sample(c.safe, 2)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        full = best_routes(c.metro, c.disp[a], c.disp[b], limit=1)
        if not full:
            continue
        strict = best_routes(c.metro, c.disp[a], c.disp[b], limit=3, no_transfer_at=c.blocked)
        if not strict or _route_cost(strict[0]) != _route_cost(full[0]):
            continue
        k = min(transfer_count(strict[0]), 2)
        if len(buckets[k]) < want[k]:
            buckets[k].append((a, b, strict))
    # a city without (say) 2-transfer pairs fills up with what it has
    picked = [x for k in (0, 1, 2) for x in buckets[k]]
    offset = rng.randrange(3)
    out = []
    for i, (a, b, routes) in enumerate(picked):
        template = TEMPLATE_NAMES[(i + offset) % 3]
        q = PLANNING_TEMPLATES[template].format(city=c.title, s1=c.disp[a], s2=c.disp[b])
        out.append(make_record("planning", i, q, None, s1=c.disp[a], s2=c.disp[b],
                               qtc=transfer_count(routes[0]), routes=routes, template=template,
                               **c.common))
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


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def progress(items, desc, total):
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
    for i in progress(range(cities), "synth cities", cities):
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
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], test)
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
    for country, city in progress(found, "real cities", len(found)):
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
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], test)
    return paths


# ---------------------------------------------------------------------------------------------
# Reading records and images

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def check_record(r, base, figure_ok):
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
        check_metro(r["metro"])
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
    """Read a JSONL file of records, validating each (fields: make_record; types: reward.TYPES).

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
            problem = check_record(r, base, figure_ok)
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
    a = p.parse_args(argv)
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

