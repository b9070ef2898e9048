"""DEV: eval.py's tests (folded into test_all.py at merge). Run: python test_all.py eval"""
import contextlib
import io
import json
import os
import tempfile

from _testutil import skip, need_reasonmap, REASONMAP, HERE

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


def _plan(id_, difficulty, template, s2="F"):
    routes, q = ([ROUTE_AF], 1) if s2 == "F" else ([ROUTE_AD], 0)
    return _rec(id_, "planning", difficulty, station_1="A", station_2=s2,
                question_transfer_count=q, routes=routes, template=template)


def _route(*segments):
    return "\n--\n".join(f"Route Name: {n}\nDeparture Stop: {d}\nArrival Stop: {a}"
                         for n, d, a in segments) + "\n"


GOOD_AF = _route(("Line 1", "A", "C"), ("Line 2", "C", "F"))
BAD_AF = _route(("Line 1", "A", "C"), ("Line 3", "C", "F"))   # Line 3 does not exist

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
    (_plan("p1", "easy", "short"), GOOD_AF, True),      # w = 1 + 0.5 + 0   = 1.5
    (_plan("p2", "hard", "short"), BAD_AF, False),      # w = 1 + 0.5 + 1   = 2.5
    (_plan("p3", "middle", "short", s2="D"), "no idea", False),  # w = 1 + 0 + 0.5 = 1.5
]

# Long templates (data.py / reward.py: long1 asks "Number of Via Stops: N", long2 "Via Stops: ...").
LONG_CASES = [
    (_plan("l1", "easy", "long2"),                       # w = 1.5, correct
     "Route Name: Line 1\nDeparture Stop: A\nArrival Stop: C\nVia Stops: B\n--\n"
     "Route Name: Line 2\nDeparture Stop: C\nArrival Stop: F\nVia Stops: E\n", True),
    (_plan("l2", "hard", "long1"),                       # w = 2.5, correct, second count wrong
     "Route Name: Line 1\nDeparture Stop: A\nArrival Stop: C\nNumber of Via Stops: 1\n--\n"
     "Route Name: Line 2\nDeparture Stop: C\nArrival Stop: F\nNumber of Via Stops: 3\n", True),
    (_plan("l3", "middle", "long2", s2="D"),              # w = 1.5, wrong line
     "Route Name: Line 2\nDeparture Stop: A\nArrival Stop: D\nVia Stops: B, C\n", False),
]


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _run(argv):
    import eval as ev
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = ev.main(argv)
    assert rc == 0, rc
    return buf.getvalue()


def _rescore(cases, tmp):
    ans, out = os.path.join(tmp, "crafted.jsonl"), os.path.join(tmp, "report.json")
    _write(ans, [{"id": r["id"], "response": resp, "record": r} for r, resp, _ in cases])
    text = _run(["--rescore", ans, "--out", out])
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
    _run(["--rescore", path, "--out", out])
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
        text = _run(["--compare", pa, pb])
    assert "| Plus TorF | 55.56 | 100.00 | +44.44 |" in text, text
    assert "| Plus All | 57.89 | 100.00 | +42.11 |" in text, text
    assert "| Acc. TorF2 | 0.00 | 100.00 | +100.00 |" in text, text
    assert "| RM Acc. S | – | – | – |" in text, text


def test_eval_density_metrics_by_hand():
    # Two planning groups of K = 4 on A->F (1 transfer, easy: W = 1.0 + 0.5) and one TorF group.
    # Alg. 1 detail: GOOD_AF 2+4+1 = 7, BAD_AF 2+4+1 = 7, "A->B on Line 1" 2+4 = 6,
    # "C->F on Line 2" 2+4 = 6, no sections 0.
    one = _route(("Line 1", "A", "B"))
    two = _route(("Line 2", "C", "F"))
    rows = [{"id": "d1", "responses": [GOOD_AF, BAD_AF, "no idea", one], "record": _plan("d1", "easy", "short")},
            {"id": "d2", "responses": [BAD_AF, one, two, BAD_AF], "record": _plan("d2", "easy", "short")},
            {"id": "t1", "responses": ["\\boxed{yes}"] * 4, "record": PLUS_CASES[0][0]}]
    with tempfile.TemporaryDirectory() as tmp:
        ans, out = os.path.join(tmp, "d.jsonl"), os.path.join(tmp, "density.json")
        _write(ans, rows)
        text = _run(["--rescore", ans, "--out", out])
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
        text = _run(["--model", ckpt, "--data", test, "--out", out, "--limit", "7",
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
        text = _run(["--model", "tiny", "--data", plan, "--out", out, "--density", "4",
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
