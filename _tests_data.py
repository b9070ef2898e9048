"""DEV: tests of data.py (folded into test_all.py at merge). python test_all.py data"""
import glob
import json
import os
import random
import tempfile
import time
import warnings

from PIL import Image

from _testutil import skip, need_reasonmap, REASONMAP, HERE  # noqa: F401
import data
from reward import normalize_stop


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
        assert all(f"{'ABCD'[k]}. {o}" in rec["question"] for k, o in enumerate(opts))
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
    im = data.load_image(path, data.MAX_PIXELS)
    print(f"    kl.png 14032x19843 -> {im.size} in {time.time() - t:.1f}s")
    assert im.mode == "RGB" and im.size[0] * im.size[1] <= data.MAX_PIXELS
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
