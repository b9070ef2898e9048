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
