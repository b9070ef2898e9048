"""Tests of plot_experiments.py (the issue-7 sweep summary) on hand-made run folders."""
import json
import os
import tempfile


def _write_run(root, name, seed, rows, plus_torf):
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


def _row(step, stage, reward, zsf, **extra):
    r = {"step": step, "stage": stage, "reward": reward, "accuracy": 0.0, "zero_std_frac": zsf,
         "format": 1.0, "detail": 0.0}
    r.update(extra)
    return r


def test_experiments_summary_means_stages_and_spread():
    import plot_experiments as pe
    with tempfile.TemporaryDirectory() as out:
        # seed 0: TorF stage zsf 0 and 0.5, planning stage zsf 1; seed 1: TorF 0.25, planning 0.5
        _write_run(out, "default", 0, [_row(1, "1:TorF1+TorF2", 2.0, 0.0, **{"acc/TorF1": 0.5}),
                                       _row(2, "1:TorF1+TorF2", 4.0, 0.5, **{"acc/TorF1": 0.25}),
                                       _row(3, "2:planning", 0.0, 1.0)], 0.5)
        _write_run(out, "default", 1, [_row(1, "1:TorF1+TorF2", 1.0, 0.25),
                                       _row(2, "2:planning", 2.0, 0.5)], 0.0)
        # a mixed stage ends with "planning" but is no planning-only stage
        _write_run(out, "none", 0, [_row(1, "1:TorF1+TorF2+planning", 3.0, 0.5)], 0.5)
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
