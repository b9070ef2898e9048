"""DEV: tests of reward.py (folded into test_all.py at merge).  python test_all.py reward"""
import glob
import inspect
import json
import os
import random
import time

from _testutil import skip, need_reasonmap, REASONMAP, HERE

import reward
from reward import (compute_reward, parse_boxed, parse_route, parse_answer, difficulty_weight,
                    plus_weight, reasonmap_weight, map_score, map_score_max,
                    normalize_stop, normalize_line)

# A toy network worked by hand:   Line 1: A B C D   Line 2: E C F   Line 3: F G H
_TOY = {"Line 1": ["A", "B", "C", "D"], "Line 2": ["E", "C", "F"], "Line 3": ["F", "G", "H"]}


def _plan(s1="A", s2="F", q=1, level="middle", metro=None, template="short", routes=None):
    return {"id": "p", "type": "planning", "station_1": s1, "station_2": s2,
            "metro": _TOY if metro is None else metro, "question_transfer_count": q,
            "difficulty_city": level, "template": template,
            "routes": routes or [[{"route_name": "Line 1", "departure_stop": "A",
                                   "arrival_stop": "C", "via_stops": ["B"]},
                                  {"route_name": "Line 2", "departure_stop": "C",
                                   "arrival_stop": "F", "via_stops": []}]]}


def _route(*segs, extra=None):
    parts = []
    for k, (line, dep, arr) in enumerate(segs):
        text = f"Route Name: {line}\nDeparture Stop: {dep}\nArrival Stop: {arr}\n"
        if extra is not None:
            text += extra[k] + "\n"
        parts.append(text)
    return "--\n".join(parts)


def _parts(r):
    return r["format"], r["correctness"], r["detail"]


# ---------------------------------------------------------------------------------------------
# Algorithm 1, branch by branch (toy record: A -> F, fewest transfers 1, middle map: W = 1.2+0.5)

def test_reward_alg1_correct_transfer_route():
    r = compute_reward(_route(("Line 1", "A", "C"), ("Line 2", "C", "F")), _plan())
    # +2 endpoints, +4 valid first segment, +1 for the transfer C = C; correct; W = 1.7
    assert _parts(r) == (1.0, 10.0, 7.0) and r["weight"] == 1.7
    assert abs(r["total"] - 1.7 * (1 + 10 + 0.5 * 7)) < 1e-12 and abs(r["total"] - 24.65) < 1e-9


def test_reward_alg1_endpoints_or():
    one_end = compute_reward(_route(("Line 1", "A", "D")), _plan())       # departure right only
    other_end = compute_reward(_route(("Line 2", "E", "F")), _plan())     # arrival right only
    neither = compute_reward(_route(("Line 3", "G", "H")), _plan())       # valid line, both wrong
    assert _parts(one_end) == (1.0, 0.0, 6.0) and abs(one_end["total"] - 1.7 * 4) < 1e-12
    assert _parts(other_end) == (1.0, 0.0, 6.0)
    assert _parts(neither) == (1.0, 0.0, 4.0)            # +4 needs no endpoint, +2 does


def test_reward_alg1_first_segment_and_links():
    # wrong line for the first segment: no +4 and no +1 for its (matching) link; +2 for ends
    r = compute_reward(_route(("Line 3", "A", "C"), ("Line 2", "C", "F")), _plan())
    assert _parts(r) == (1.0, 0.0, 2.0)
    # broken link B != C: +2 +4, no +1; not correct though both lines are right
    r = compute_reward(_route(("Line 1", "A", "B"), ("Line 2", "C", "F")), _plan())
    assert _parts(r) == (1.0, 0.0, 6.0)
    # a good link after an invalid segment earns nothing (+1 needs the segment's stops on its line);
    # the third segment is a transfer beyond the fewest (i = 2 > 1): -5
    r = compute_reward(_route(("Line 1", "A", "C"), ("Line 9", "C", "E"), ("Line 2", "E", "F")),
                       _plan())
    assert _parts(r) == (1.0, 0.0, 2.0 + 4 + 1 - 5)


def test_reward_alg1_penalty_beyond_fewest_transfers():
    r = compute_reward(_route(("Line 1", "A", "C"), ("Line 2", "C", "F"), ("Line 3", "F", "H")),
                       _plan())
    assert _parts(r) == (1.0, 0.0, 2 + 4 + 1 + 1 - 5)
    # a correct direct route (fewest transfers 0) is not penalised: the released code's
    # (i+1) > count would give it 2 + 4 - 5 = 1
    r = compute_reward(_route(("Line 1", "A", "D")), _plan(s2="D", q=0, level="easy"))
    assert _parts(r) == (1.0, 10.0, 6.0) and r["weight"] == 1.0 and r["total"] == 14.0
    # a correct route with one transfer more than needed: correct, and penalised once
    r = compute_reward(_route(("Line 1", "A", "C"), ("Line 1", "C", "D")),
                       _plan(s2="D", q=0, level="easy"))
    assert _parts(r) == (1.0, 10.0, 2 + 4 + 1 - 5)


def test_reward_alg1_cap_at_10():
    chain = {f"K{i}": [f"P{i}", f"P{i + 1}"] for i in range(1, 8)}
    rec = _plan(s1="P1", s2="P8", q=6, level="easy", metro=chain)
    answer = _route(*[(f"K{i}", f"P{i}", f"P{i + 1}") for i in range(1, 8)])
    r = compute_reward(answer, rec)                      # 2 + 4 + 6 links = 12 -> 10
    assert _parts(r) == (1.0, 10.0, 10.0) and r["weight"] == 1.5 and r["total"] == 24.0


def test_reward_alg1_negative_total():
    rec = _plan(s2="D", q=0, level="easy")
    answer = _route(("Line 9", "X", "Y"), ("Line 9", "Y", "Z"), ("Line 9", "Z", "W"))
    r = compute_reward(answer, rec)                      # i = 1, 2 > 0: -5 -5; nothing else
    assert _parts(r) == (1.0, 0.0, -10.0) and r["total"] == 1 + 0.5 * -10 == -4.0


def test_reward_baselines_and_alpha():
    answer = _route(("Line 1", "A", "C"), ("Line 2", "C", "F"))
    r = compute_reward(answer, _plan(), detail=False, difficulty_aware=False)
    assert r == {"format": 1.0, "correctness": 10.0, "detail": 0.0, "weight": 1.0, "total": 11.0}
    r = compute_reward(answer, _plan(), alpha=1.0, difficulty_aware=False)
    assert r["total"] == 1 + 10 + 7
    r = compute_reward("no route here", _plan())
    assert r == {"format": 0.0, "correctness": 0.0, "detail": 0.0, "weight": 1.7, "total": 0.0}


# ---------------------------------------------------------------------------------------------
# Parsing

def test_reward_parse_route_formats():
    one_line = ("Route Name: Line 1 Departure Stop: A Arrival Stop: C -- "
                "Route Name: Line 2 Departure Stop: C Station Arrival Stop: F")
    assert [(s["route_name"], s["departure_stop"], s["arrival_stop"])
            for s in parse_route(one_line)] == [("Line 1", "A", "C"), ("Line 2", "C Station", "F")]
    bold = "**Route Name:** 1号线\n**Departure Stop**: a\n- arrival stop： C\n\nDone."
    assert [(s["route_name"], s["departure_stop"], s["arrival_stop"])
            for s in parse_route(bold)] == [("1号线", "a", "C")]
    r = compute_reward(one_line, _plan())
    assert _parts(r) == (1.0, 10.0, 7.0)
    long1 = _route(("Line 1", "A", "C"), extra=["Number of Via Stops: 1 stop"])
    long2 = _route(("Line 1", "A", "D"), extra=["Via Stops: B Station, C，  ,None"])
    assert parse_route(long1)[0]["num_via_stops"] == 1 and parse_route(long1)[0]["via_stops"] is None
    assert parse_route(long2)[0]["via_stops"] == ["B Station", "C"]
    assert parse_route(long2)[0]["num_via_stops"] is None
    # the value runs to the next label even when it is "Via Stops" inside "Number of Via Stops"
    both = "Route Name: 1 Departure Stop: A Arrival Stop: D Number of Via Stops: 2 Via Stops: B, C"
    assert parse_route(both) == [{"route_name": "1", "departure_stop": "A", "arrival_stop": "D",
                                  "via_stops": ["B", "C"], "num_via_stops": 2}]
    # a section needs all three fields, with values; first occurrence of a label wins
    assert parse_route("Route Name: 1\nDeparture Stop: A\n") == []
    assert parse_route("Route Name: 1\nDeparture Stop:\nArrival Stop: D") == []
    assert parse_route("Route Name: 1\nRoute Name: 2\nDeparture Stop: A\nArrival Stop: D")[0][
        "route_name"] == "1"
    assert parse_answer("nothing", _plan()) is None
    assert parse_answer(one_line, _plan())[1]["arrival_stop"] == "F"


def test_reward_parse_boxed():
    assert parse_boxed(r"so \boxed{A} then \boxed{ {B} }") == " {B} "
    assert parse_boxed(r"\boxed{\text{(B)}}") == r"\text{(B)}"
    assert parse_boxed(r"\boxed{\boxed{C}}") == "C"                  # the box opened last
    assert parse_boxed(r"\boxed{A} and \boxed{B") == "A"               # unclosed box skipped
    assert parse_boxed(r"} \boxed{x{y}z}}") == "x{y}z"
    assert parse_boxed("no box") is None and parse_boxed(None) is None
    assert parse_boxed(r"\boxed{}") == ""


def test_reward_plus_types():
    def rec(kind, answer, level="hard"):
        return {"id": "q", "type": kind, "answer": answer, "difficulty_city": level}

    right = {"TorF1": ("yes", [r"\boxed{Yes}", r"\boxed{\text{yes.}}", r"$\boxed{YES, they are}$"]),
             "TorF2": ("no", [r"\boxed{no}", r"\boxed{No}."]),
             "Counting1": ("B", [r"\boxed{B}", r"\boxed{(B)}", r"\boxed{B)}", r"\boxed{\text{B}}",
                                 r"\boxed{Option B}", r"\boxed{B. 12}", r"\boxed{ b }"]),
             "Counting2": (3, [r"\boxed{3}", r"\boxed{3 lines}", r"$\boxed{3}$.",
                               "\\boxed{4}\nwait\\boxed{3}"]),
             "Counting3": (12, [r"\boxed{12}", r"\boxed{\mathbf{12}}"])}
    for kind, (answer, texts) in right.items():
        for text in texts:
            r = compute_reward(text, rec(kind, answer))
            assert _parts(r) == (1.0, 10.0, 0.0), (kind, text, r)
            assert r["weight"] == 1.5 and r["total"] == 16.5        # hard map, no β for Plus
    wrong = {"TorF1": ("yes", [r"\boxed{no}", r"\boxed{not sure}", r"\boxed{yesterday}"]),
             "Counting1": ("B", [r"\boxed{12}", r"\boxed{Dupont}", r"\boxed{C}", r"\boxed{(A)}"]),
             "Counting2": (3, [r"\boxed{3.5}", r"\boxed{13}", r"\boxed{3}\boxed{4}"])}
    for kind, (answer, texts) in wrong.items():
        for text in texts:
            assert _parts(compute_reward(text, rec(kind, answer))) == (1.0, 0.0, 0.0), (kind, text)
    for text in ["yes", r"\boxed{}", r"\boxed{  }", ""]:
        assert _parts(compute_reward(text, rec("TorF1", "yes"))) == (0.0, 0.0, 0.0)
    assert parse_answer(r"\boxed{(c)}", rec("Counting1", "C")) == "C"
    assert parse_answer(r"\boxed{7 lines}", rec("Counting3", 7)) == 7
    assert parse_answer(r"\boxed{Yes}", rec("TorF2", "yes")) == "yes"
    assert parse_answer("nothing", rec("TorF2", "yes")) is None


# ---------------------------------------------------------------------------------------------
# Weights

def test_reward_weights():
    for level, gamma, plus, m in [("easy", 1.0, 1.0, 0), ("middle", 1.2, 1.5, 1), ("hard", 1.5, 2.0, 2)]:
        assert difficulty_weight({"type": "TorF1", "difficulty_city": level}) == gamma
        assert plus_weight({"type": "TorF1", "difficulty_city": level}) == plus
        for q, qq in [(0, 0), (1, 1), (2, 2), (5, 2)]:
            rec = _plan(q=q, level=level)
            assert difficulty_weight(rec) == gamma + (0.5 if q else 0.0)
            assert reasonmap_weight(rec) == 1 + 0.5 * qq + 0.5 * m
    assert reasonmap_weight(_plan(q=3, level="hard")) == 3.0


def test_reward_bad_records_raise_naming_the_field():
    cases = [({"type": "Foo", "difficulty_city": "easy"}, "type"),
             ({"type": "TorF1", "difficulty_city": "hard-ish", "answer": "yes"}, "difficulty_city"),
             ({"type": "Counting1", "difficulty_city": "easy", "answer": "E"}, "answer"),
             (dict(_plan(), metro=None), "metro"),
             (dict(_plan(), question_transfer_count=None), "question_transfer_count"),
             (dict(_plan(), station_1=None), "station_1")]
    for rec, field in cases:
        try:
            compute_reward("x", rec)
        except ValueError as e:
            assert field in str(e), (field, e)
        else:
            raise AssertionError(f"no error for bad {field}")
    for rec, field in [(dict(_plan(), routes=[]), "routes"), (dict(_plan(), template="long3"), "template")]:
        try:
            map_score("x", rec)
        except ValueError as e:
            assert field in str(e)
        else:
            raise AssertionError(field)


# ---------------------------------------------------------------------------------------------
# Map score (RM Alg. 2)

def test_reward_map_score_short():
    rec = _plan()
    assert map_score_max(rec) == 20.0 and map_score_max(dict(rec, template="long1")) == 40.0
    right = _route(("Line 1", "A", "C"), ("Line 2", "C", "F"))
    assert map_score(right, rec) == 1 + 4 + 4 + 10                   # 19
    # wrong second line: not correct; endpoints +1, seg 1 +4, seg 2 +1 +1
    assert map_score(_route(("Line 1", "A", "C"), ("Line 3", "C", "F")), rec) == 7
    assert map_score(_route(("Line 1", "B", "C"), ("Line 2", "C", "F")), rec) == 0   # endpoint
    assert map_score("garbage", rec) == 0
    # best over reference routes
    other = [{"route_name": "Line 1", "departure_stop": "A", "arrival_stop": "B", "via_stops": []},
             {"route_name": "Line 2", "departure_stop": "B", "arrival_stop": "F", "via_stops": []}]
    two = _plan(routes=[other, rec["routes"][0]])
    assert map_score(right, two) == 19 and map_score(right, _plan(routes=[other])) == 7 + 10
    # cap 10 before the +10
    chain = {f"K{i}": [f"P{i}", f"P{i + 1}"] for i in range(1, 8)}
    segs = [(f"K{i}", f"P{i}", f"P{i + 1}") for i in range(1, 8)]
    ref = [{"route_name": l, "departure_stop": d, "arrival_stop": a, "via_stops": []} for l, d, a in segs]
    crec = _plan(s1="P1", s2="P8", q=6, metro=chain, routes=[ref])
    assert map_score(_route(*segs), crec) == 20


def test_reward_map_score_long():
    ref = [[{"route_name": "Line 1", "departure_stop": "A", "arrival_stop": "D", "via_stops": ["B", "C"]}]]
    long1 = _plan(s2="D", q=0, template="long1", routes=ref)      # "Number of Via Stops"
    seg = ("Line 1", "A", "D")
    assert map_score(_route(seg, extra=["Number of Via Stops: 2"]), long1) == 1 + 4 + 4 + 20
    assert map_score(_route(seg, extra=["Number of Via Stops: 3"]), long1) == 1 + 4 + 2 + 20
    assert map_score(_route(seg), long1) == 1 + 4 + 0 + 20           # missing count reads 0
    long2 = dict(long1, template="long2")                          # "Via Stops"
    got = map_score(_route(seg, extra=["Via Stops: B Station, Z"]), long2)
    assert abs(got - (1 + 4 + (10 * 1 / 3 + 1) / 2 + 20)) < 1e-12    # IoU {b}/{b,c,z}, 1 hit
    assert map_score(_route(seg, extra=["Via Stops: B, C"]), long2) == 1 + 4 + (10 + 2) / 2 + 20
    # repeats count once; a wrong line keeps the hits but drops the IoU
    assert map_score(_route(seg, extra=["Via Stops: B, B, B"]), long2) == 1 + 4 + (5 + 1) / 2 + 20
    assert map_score(_route(("Line 2", "A", "D"), extra=["Via Stops: B, C"]), long2) == \
        1 + 2 + (0 + 2) / 2
    # the short template ignores via stops
    assert map_score(_route(seg, extra=["Via Stops: B, C"]), dict(long1, template="short")) == 5 + 10


# ---------------------------------------------------------------------------------------------
# The per-metro cache must never confuse two dicts

def test_reward_metro_cache_two_dicts():
    m1, m2 = {"Line 1": ["A", "B"]}, {"Line 1": ["A", "C"]}
    ans = _route(("Line 1", "A", "C"))
    for _ in range(3):
        assert compute_reward(ans, _plan(s2="C", q=0, metro=m2))["correctness"] == 10
        assert compute_reward(ans, _plan(s2="C", q=0, metro=m1))["correctness"] == 0
    for i in range(300):      # fresh dicts, freed at once: ids get reused
        m = {"Line 1": ["A", f"S{i}"]}
        assert compute_reward(_route(("Line 1", "A", f"S{i}")), _plan(s2=f"S{i}", q=0, metro=m))[
            "correctness"] == 10
        assert compute_reward(_route(("Line 1", "A", f"S{i - 1}")), _plan(s2=f"S{i}", q=0, metro=m))[
            "detail"] == 2 + 0    # departure right, S{i-1} not on this dict's line
    twin = json.loads(json.dumps(m2))          # same content, another dict (as from JSONL)
    assert compute_reward(ans, _plan(s2="C", q=0, metro=twin))["correctness"] == 10
    assert reward._metro_lookup(twin) is reward._metro_lookup(m2)
    m1["Line 1"].append("C")  # edited in place (the stop count changes): seen
    assert compute_reward(ans, _plan(s2="C", q=0, metro=m1))["correctness"] == 10


# ---------------------------------------------------------------------------------------------
# Hostile model text

def test_reward_hostile_answers_never_raise():
    seg = "Route Name: Line 1\nDeparture Stop: A\nArrival Stop: C\n"
    hostile = ["", "x" * 2_000_000, seg * 40_000, "\\boxed{" * 20_000 + "}" * 20_000,
               "{" * 20_000 + "\\boxed{3}" + "}" * 20_000, "\\boxed{" * 300_000, "--" * 100_000,
               ("--" + seg) * 20_000, "".join(map(chr, range(32))) * 1000,
               "\ud800\udfff\ud83d" * 1000 + seg.replace("A", "\ud800"), None, 12345,
               b"Route Name: x", ["a"], "Route Name: " + "L" * 2_000_000 + "\nDeparture Stop: A\n"
               "Arrival Stop: C", "Route Name:" * 300_000, "Number of Via Stops: " + "9" * 1_000_000,
               "}" * 1_000_000 + "\\boxed{" + "{" * 1_000_000, "Route Name" + " " * 1_000_000 + "x:",
               "Route Name " + "* " * 500_000 + ":", "Via Stops: " + "a," * 500_000,
               "Route Name: 1 Departure Stop: A Arrival Stop: C Via Stops: " + "a, " * 300_000]
    records = [_plan(template="long1"), {"type": "Counting2", "answer": 3, "difficulty_city": "easy"}]
    worst = 0.0
    for text in hostile:
        for rec in records:
            calls = [compute_reward, parse_answer] + [map_score] * (rec["type"] == "planning")
            for fn in calls:
                start = time.perf_counter()
                out = fn(text, rec)
                worst = max(worst, time.perf_counter() - start)
                if fn is compute_reward:
                    assert set(out) == {"format", "correctness", "detail", "weight", "total"}
                    assert all(isinstance(v, float) for v in out.values())
                if fn is map_score:
                    assert 0 <= out <= map_score_max(rec)
    assert worst < 1.0, worst          # per call; generous: the slowest takes ~0.15 s here


def test_reward_never_evaluates_model_text():
    source = inspect.getsource(reward)
    for banned in ("eval(", "exec(", "sympy", "__import__", "pickle", "builtins", "literal_eval"):
        assert banned not in source, banned


# ---------------------------------------------------------------------------------------------
# Agreement with an independent implementation of DESIGN.md §3 on the 30 real cities.
# Nothing below calls reward.py except the two normalisers; the parser works from str.find over
# a lower-cased copy instead of one regex, the network check walks the raw Metro Data each time.

_MARKERS = (" (Transfer Station)", "（换乘站）", " (Branch-starting Station)", "（支线起始站）")
_LABELS = ("number of via stops", "route name", "departure stop", "arrival stop", "via stops")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _load_cities():
    cities = {}
    for path in sorted(glob.glob(os.path.join(REASONMAP, "stations", "*", "*.json"))):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        metro = {}
        for line, stops in raw.items():
            clean = []
            for stop in stops:
                for marker in _MARKERS:
                    stop = stop.replace(marker, "")
                clean.append(stop)
            metro[line] = clean
        cities[os.path.basename(path)[:-5]] = metro
    return cities


def _ind_label_hits(section):
    """[(start, end, label)] of labels followed by optional spaces, '*'s and a colon; scanned
    left to right without overlaps, longest label first at one position."""
    low = section.translate(_ASCII_LOWER)
    found = []
    for label in _LABELS:
        at = low.find(label)
        while at >= 0:
            j = at + len(label)
            while j < len(low) and low[j] in " \t":
                j += 1
            while j < len(low) and low[j] == "*":
                j += 1
            while j < len(low) and low[j] in " \t":
                j += 1
            if j < len(low) and low[j] in ":：":
                found.append((at, j + 1, label))
            at = low.find(label, at + 1)
    found.sort(key=lambda t: (t[0], -len(t[2])))
    hits, end = [], 0
    for start, stop, label in found:
        if start >= end:
            hits.append((start, stop, label))
            end = stop
    return hits


def _ind_sections(text):
    if not isinstance(text, str):
        return []
    out = []
    for section in text.split("--"):
        hits = _ind_label_hits(section)
        got = {}
        for k, (start, stop, label) in enumerate(hits):
            if label in got:
                continue
            nxt = hits[k + 1][0] if k + 1 < len(hits) else len(section)
            got[label] = section[stop:nxt].lstrip().partition("\n")[0].strip(" \t\r\f\v*`")
        if got.get("route name") and got.get("departure stop") and got.get("arrival stop"):
            out.append((got["route name"], got["departure stop"], got["arrival stop"]))
    return out


def _ind_serves(metro, line, dep, arr):
    for name, stops in metro.items():
        if normalize_line(name) == normalize_line(line):
            names = [normalize_stop(s) for s in stops]
            if normalize_stop(dep) in names and normalize_stop(arr) in names:
                return True
    return False


def _ind_reward(text, rec, alpha=0.5):
    secs = _ind_sections(text)
    s1, s2 = normalize_stop(rec["station_1"]), normalize_stop(rec["station_2"])
    weight = {"easy": 1.0, "middle": 1.2, "hard": 1.5}[rec["difficulty_city"]]
    if rec["question_transfer_count"] != 0:
        weight += 0.5
    if not secs:
        return 0.0, 0.0, 0.0, weight, weight * (0.0 + 0.0 + alpha * 0.0)
    good = [_ind_serves(rec["metro"], *s) for s in secs]
    same = [normalize_stop(secs[i][2]) == normalize_stop(secs[i + 1][1]) for i in range(len(secs) - 1)]
    dep_ok, arr_ok = normalize_stop(secs[0][1]) == s1, normalize_stop(secs[-1][2]) == s2
    correct = 10.0 if dep_ok and arr_ok and all(good) and all(same) else 0.0
    detail = 0.0
    if dep_ok or arr_ok:
        detail += 2
    for i in range(len(secs)):
        if i > rec["question_transfer_count"]:
            detail -= 5
        if i == 0 and good[0]:
            detail += 4
        if good[i] and i + 1 < len(secs) and same[i]:
            detail += 1
    detail = min(detail, 10.0)
    return 1.0, correct, detail, weight, weight * (1.0 + correct + alpha * detail)


def _fewest_transfer_route(metro, s1, s2, rng):
    """Lines path by BFS over 'lines sharing a stop name', then a random transfer stop each time."""
    stops = {line: {normalize_stop(s): s for s in seq} for line, seq in metro.items()}
    start = [l for l in metro if normalize_stop(s1) in stops[l]]
    goal = {l for l in metro if normalize_stop(s2) in stops[l]}
    prev, frontier = {l: None for l in start}, list(start)
    while frontier and not goal & set(frontier):
        nxt = []
        for a in frontier:
            for b in metro:
                if b not in prev and stops[a].keys() & stops[b].keys():
                    prev[b] = a
                    nxt.append(b)
        frontier = nxt
    end = next((l for l in frontier if l in goal), None)
    if end is None:
        return None
    lines = [end]
    while prev[lines[-1]] is not None:
        lines.append(prev[lines[-1]])
    lines.reverse()
    segs, here = [], s1
    for a, b in zip(lines, lines[1:]):
        via = rng.choice(sorted(stops[a].keys() & stops[b].keys()))
        segs.append([a, here, stops[a][via]])
        here = stops[b][via]
    segs.append([lines[-1], here, s2])
    return segs


def _dress_line(name, rng):
    pick = rng.random()
    if pick < 0.6:
        return name
    if name.lower().startswith("line ") and pick < 0.75:
        return name[5:]                                  # "Line 1" -> "1"
    if name.lower().startswith("line ") and pick < 0.85:
        return name[5:] + "号线"
    return rng.choice([name.upper(), name.lower(), name + " (towards the end)"])


def _dress_stop(name, rng):
    pick = rng.random()
    if pick < 0.7:
        return name
    plain = not name.lower().endswith(("station", "站"))     # "X Station Station" is another stop
    return rng.choice([name + " Station" if plain else name, name.upper(), "  " + name + ".",
                       name + "站" if plain else name, f"**{name}**"])


def _render(segs, rng, style, extra_field=None):
    out = []
    for line, dep, arr in segs:
        fields = [("Route Name", line), ("Departure Stop", dep), ("Arrival Stop", arr)]
        if extra_field == "num":
            fields.append(("Number of Via Stops", str(rng.randint(0, 9))))
        elif extra_field == "via":
            fields.append(("Via Stops", "X, Y"))
        if rng.random() < 0.1:
            rng.shuffle(fields)
        if style == "lines":
            out.append("".join(f"{k}: {v}\n" for k, v in fields))
        elif style == "one":
            out.append(" ".join(f"{k}: {v}" for k, v in fields))
        elif style == "bold":
            out.append("".join(f"**{k}:** {v}\n" for k, v in fields))
        else:
            out.append("".join(f"{k.upper()} ：{v}\n" for k, v in fields))
    sep = rng.choice(["--\n", "\n--\n", " -- ", "----\n"])
    head = rng.choice(["", "Let me trace the lines.\n", "Answer:\n--\n"])
    return head + sep.join(out) + rng.choice(["", "\n", "\nThat is the route."])


def _answers_for(metro, segs, rng):
    """Right, half-right and wrong answers (lists of segments), plus raw texts."""
    all_stops = [s for seq in metro.values() for s in seq]
    lines = list(metro)
    variants = [("right", [list(s) for s in segs])]
    v = [list(s) for s in segs]; v[0][1] = rng.choice(all_stops); variants.append(("endpoint", v))
    v = [list(s) for s in segs]; v[-1][2] = rng.choice(all_stops); variants.append(("endpoint2", v))
    v = [list(s) for s in segs]; v[rng.randrange(len(v))][0] = rng.choice(lines); variants.append(("line", v))
    if len(segs) > 1:
        v = [list(s) for s in segs]; del v[rng.randrange(len(v))]; variants.append(("missing", v))
        v = [list(s) for s in segs]; k = rng.randrange(len(v) - 1); v[k][2] = rng.choice(all_stops)
        variants.append(("transfer", v))
    v = [list(s) for s in segs]
    for _ in range(rng.randint(1, 3)):
        last = v[-1]
        v.append([rng.choice(lines), last[2], rng.choice(all_stops)])
    variants.append(("extra", v))
    v = [list(s) for s in segs]; k = rng.randrange(len(v)); v[k][1], v[k][2] = v[k][2], v[k][1]
    variants.append(("swap", v))
    v = [[rng.choice(lines), rng.choice(all_stops), rng.choice(all_stops)] for _ in range(rng.randint(1, 4))]
    variants.append(("wrong", v))
    return variants


def _garbage(rng, text):
    pick = rng.random()
    if pick < 0.3:
        return text[:rng.randrange(len(text) + 1)]                 # truncated answer
    if pick < 0.5:
        return text.replace("Arrival Stop", "Arrival", 1)          # a field lost
    if pick < 0.7:
        return text.replace("Departure Stop: ", "Departure Stop:  \n", 1)   # value on no line
    alphabet = "ab -:\n*：Route Name Departure Stop Arrival Stop"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))


def test_reward_agrees_with_independent_implementation_on_real_cities():
    need_reasonmap()
    cities = _load_cities()
    assert len(cities) == 30
    rng = random.Random(1234)
    checked = correct = 0
    kinds = {}
    for name, metro in sorted(cities.items()):
        for stops in metro.values():
            assert all(normalize_stop(s) for s in stops)     # no real stop normalises to ""
        all_stops = sorted({s for seq in metro.values() for s in seq})
        for _ in range(30):
            s1, s2 = rng.sample(all_stops, 2)
            if normalize_stop(s1) == normalize_stop(s2):
                continue
            segs = _fewest_transfer_route(metro, s1, s2, rng)
            if segs is None:
                continue
            q = len(segs) - 1
            for kind, plan in _answers_for(metro, segs, rng):
                dressed = [(_dress_line(l, rng), _dress_stop(d, rng), _dress_stop(a, rng))
                           for l, d, a in plan]
                text = _render(dressed, rng, rng.choice(["lines", "one", "bold", "caps"]),
                               rng.choice([None, None, "num", "via"]))
                if rng.random() < 0.15:
                    text, kind = _garbage(rng, text), "garbage"
                rec = {"id": f"{name}-{checked}", "type": "planning", "station_1": s1,
                       "station_2": s2, "metro": metro,
                       "question_transfer_count": q if rng.random() < 0.8 else rng.randint(0, 3),
                       "difficulty_city": rng.choice(["easy", "middle", "hard"])}
                got = compute_reward(text, rec)
                want = _ind_reward(text, rec)
                assert (got["format"], got["correctness"], got["detail"], got["weight"],
                        got["total"]) == want, (text, rec["station_1"], rec["station_2"], got, want)
                assert [(s["route_name"], s["departure_stop"], s["arrival_stop"])
                        for s in parse_route(text)] == _ind_sections(text), text
                if kind == "right":
                    assert got["correctness"] == 10.0, (text, s1, s2)
                kinds[kind] = kinds.get(kind, 0) + 1
                checked += 1
                correct += got["correctness"] > 0
    assert checked >= 6000, checked
    assert 0.1 < correct / checked < 0.6, (correct, checked)    # a real mix of right and wrong
    assert kinds.get("garbage", 0) > 500 and kinds.get("extra", 0) > 500
