"""DEV: tests of grpo.py and curriculum.py (folded into test_all.py at merge).

    python test_all.py grpo        python test_all.py curriculum
"""
import collections
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import contextlib

import torch

import curriculum
import grpo
from _testutil import HERE


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


def test_grpo_advantages_bad_input():
    _raises(lambda: grpo.group_advantages([1, 2, 3], 2), "3 rewards", "groups of 2")
    _raises(lambda: grpo.group_advantages([1, 2], 0), "group_size")
    _raises(lambda: grpo.group_advantages([[1, 2]], 2), "1-D")
    _raises(lambda: grpo.group_advantages([1, float("nan")], 2), "NaN")


def test_grpo_weight_cancels_with_scale_not_centred():
    # DESIGN.md §4: the difficulty weight w (same for the whole group: one question, one map)
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
