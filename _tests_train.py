"""Tests of model.py and train.py (DEV: folded into test_all.py at merge)."""
import json
import os
import subprocess
import sys
import tempfile

from _testutil import HERE, skip


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
    sub = model.select(ro, [2, 0])
    with torch.no_grad():
        lp_sub = model.token_logprobs(m, sub)
    ref = torch.cat([lp[8:12], lp[0:4]])[:, :lp_sub.shape[1]]
    assert float((lp_sub - ref).abs().max()) <= 1e-5
    ro2 = model.generate(m, p, qs, [None, ims[1], None], num_samples=2, max_new_tokens=12,
                         with_logprobs=True)
    assert ro2.image_grid_thw.shape[0] == 1
    with torch.no_grad():
        assert float((model.token_logprobs(m, ro2) - ro2.sample_logprobs).abs().max()) <= 1e-5


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
# train.py

def _args(**kw):
    import train
    a = train.parse_args(["--model", "tiny"])
    for key, v in kw.items():
        setattr(a, key, v)
    return a


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
    """--algo sft trains on gold_text(record): it must be a correct answer by reward.py's rules."""
    import data
    import reward
    import train
    with tempfile.TemporaryDirectory() as d:
        path, _ = data.synth(d, cities=3, seed=1, per_type=2)
        recs = data.load_records(path)
    assert {r["type"] for r in recs} >= {"TorF1", "Counting1", "planning"}
    for r in recs:
        out = reward.compute_reward(train.gold_text(r), r)
        assert out["format"] == 1 and out["correctness"] == 10, (r["id"], train.gold_text(r))


def _run(argv, nproc=1, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", os.path.join(HERE, "train.py")] + argv
    else:
        cmd = [sys.executable, os.path.join(HERE, "train.py")] + argv
    r = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


SMALL = ["--model", "tiny", "--group-size", "2", "--batch-size", "2", "--max-new-tokens", "6",
         "--synth-cities", "3", "--synth-per-type", "1", "--lr", "1e-2", "--weight-decay", "0.01"]


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
    """torchrun, 2 CPU ranks (gloo), 8 steps; rank 1 gets no images (DESIGN §7 trap); parameters
    end identical on both ranks, and final/ reloads and samples."""
    import torch
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
