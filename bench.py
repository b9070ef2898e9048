"""Where the time of one GRPO step goes, and how our step compares with TRL's GRPOTrainer.

    python bench.py                                          # tiny model, train.py's CPU quick-start shapes
    python bench.py --kl 1e-3 --old-logp                     # + reference forward, + an old-logp forward
    python bench.py --config 3b --layers 2 --vision-layers 2 --batch-size 1 --group-size 4 \\
                    --max-new-tokens 16 --image-size 224     # the real 3B shapes, cut in depth for a CPU
    python bench.py --model /models/Qwen2.5-VL-3B-Instruct --bf16   # a local checkpoint (GPU)
    torchrun --standalone --nproc_per_node=2 bench.py        # DDP, each rank its own questions
    /tmp/trlenv/bin/python bench.py --vs-trl                 # ours vs TRL, alternated step by step

A benchmark, not a test: it asserts nothing about time. Output is one JSON object (stdout and
--out FILE): the medians over --steps timed steps after --warmup untimed ones.

The timed step is train.py's step, re-composed from the same calls (DESIGN.md §1: nothing imports
train.py): model.generate on the unwrapped policy -> reward.compute_reward per completion ->
grpo.group_advantages -> zero_grad -> per micro-batch of questions model.select +
model.token_logprobs (through the DDP wrapper) + reference log-probs under torch.no_grad when
kl > 0 + grpo.grpo_loss(logp, logp.detach(), ...) with the global token count + backward ->
clip_grad_norm_(1.0) -> AdamW step. Phases are timed apart (synchronising CUDA before each clock
read): sample, score (reward + advantages), policy_fwd, ref_fwd, old_fwd, backward, optimizer.
train.py does one update per batch, so π_old = π_θ and it spends no old-logp forward; --old-logp
times the no_grad forward that a second update per batch (ppo_epochs > 1) would need, so its price
is on the table. Defaults follow train.py: --model tiny gets its quick-start shapes (K=8, 8
questions, 32 new tokens, no KL), a real or --config model the paper's (§5.1: K=8, KL 1e-3, 2048
new tokens; use smaller numbers on a CPU).

Numbers reported:
  phases_s            median seconds per phase, and step_s the median step
  sample_tokens_per_s generated tokens (end-of-turn included) / sampling time
  train_tokens_per_s  completion tokens / (policy + ref + old forwards + backward + optimizer)
  train_seq_tokens_per_s  all non-pad tokens (prompt + image + completion) / the same time
  padding             share of the [B*K, P+T] update tensor that is padding (work thrown away)
  reward_answers_per_s  reward.compute_reward on planning answers (right / half-right / wrong)
                      for real ReasonMap cities from ../shared/reasonmap when present, else
                      synthetic cities (data.synth_city); prints the mean reward of each kind so
                      one can see the answers are what they claim
  peak_rss_mb / peak_cuda_mb   resource.getrusage peak RSS (CPU), torch.cuda.max_memory_allocated

--config 3b|7b builds Qwen2.5-VL-3B/7B-Instruct's architecture from their published config.json
values with random weights (no download); --layers / --vision-layers cut the depth so it fits a
CPU. The tokenizer and processor are the tiny model's (their ids fit in Qwen's vocab); the model
still computes logits over Qwen's full 151936/152064-token vocabulary, which is what matters for
time and memory. A random model rarely emits end-of-turn, so completions run to --max-new-tokens:
the worst case, and the same on every run.

--vs-trl: TRL is a benchmark-only install, never a requirement of this repo:
    python3 -m venv --system-site-packages /tmp/trlenv
    /tmp/trlenv/bin/pip install trl -c <(printf 'torch==2.13.0\\ntransformers==5.24.0\\n')
One process builds the tiny model twice from the same seed and runs a TRL GRPOTrainer step and our
step in turn (ours runs inside TRL's on_step_end callback, outside TRL's clock), so both see the
same machine load. Matched: the model and its initial weights, the processor and chat template,
the same B questions and images every step (TRL's dataset is exactly those B rows), K
(num_generations), B*K completions per step (per_device_train_batch_size, one generation and one
optimizer step per step: gradient_accumulation_steps 1, steps_per_generation 1), max new tokens,
sampling (temperature 1, top_k 0, top_p 1, vision tokens suppressed via generation_kwargs),
reward (reward.compute_reward on the same record), centred advantages (scale_rewards="none"),
beta 0 (no reference model), num_iterations 1 (no old-logp forward), clip ε 0.2, token-mean loss
over the batch (loss_type "dapo" on one process), AdamW lr / weight decay / betas, constant LR,
grad-norm clip 1.0, fp32, torch threads. Not matched, by design of each side: TRL repeats every
prompt K times before the processor, so each image is preprocessed K times and the vision tower
runs K times in both generation and the training forward (ours: preprocessing once, the vision
tower once per image in both: transformers 5 encodes images before it expands the K samples, and
token_logprobs shares each image's features); TRL also computes token
entropies and logging metrics inside its step. TRL's clock runs from on_step_begin to on_step_end
(generation, reward, forward, backward, clip, optimizer, zero_grad); its dataloader fetch and
logging fall outside (reported as trl.between_steps_s).

Measured numbers, the comparison with TRL and the speed-ups they point to: docs/bench.md.
"""
import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import grpo
import model as model_mod
import reward

# train.py's defaults (copied, since nothing may import train.py; keep in step with it).
QUICK = dict(lr=3e-3, kl=0.0, group_size=8, batch_size=8, max_new_tokens=32, weight_decay=0.0,
             micro_batch=8)
PAPER = dict(lr=1e-6, kl=1e-3, group_size=8, batch_size=16, max_new_tokens=2048, weight_decay=1e-2,
             micro_batch=1)

# Qwen2.5-VL-3B / 7B-Instruct config.json values (architecture only; weights are random here).
QWEN_SHAPES = {
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
               vision_out=2048),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
               vision_out=3584),
}
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # what is timed
    p.add_argument("--model", default="tiny", help="'tiny' or a local Qwen2.5-VL folder")
    p.add_argument("--config", choices=sorted(QWEN_SHAPES), default=None,
                   help="random weights in the real 3B/7B architecture (overrides --model)")
    p.add_argument("--layers", type=int, default=None, help="with --config: decoder layers kept")
    p.add_argument("--vision-layers", type=int, default=None, help="with --config: vision blocks kept")
    p.add_argument("--group-size", type=int, default=None, help="K samples per question")
    p.add_argument("--batch-size", type=int, default=None, help="questions per step, per rank")
    p.add_argument("--micro-batch", type=int, default=None, help="questions per forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None,
                   help="maps read and processed at most SxS pixels (train.py --max-pixels S*S)")
    p.add_argument("--types", default="all",
                   help="question types in the batch, comma-separated (e.g. planning, or TorF1,TorF2 "
                        "for the first curriculum stage); default all six, round-robin")
    p.add_argument("--kl", type=float, default=None, help="> 0: a reference model and its forward")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--old-logp", action="store_true",
                   help="also time the old-policy forward a second update per batch would need")
    p.add_argument("--ref-mode", choices=("no_grad", "inference_mode"), default="no_grad",
                   help="context of the reference forward (train.py: no_grad)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as train.py)")
    # how long
    p.add_argument("--steps", type=int, default=5, help="timed steps (medians over these)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--reward-answers", type=int, default=3000,
                   help="planning answers for the reward throughput (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--vs-trl", action="store_true", help="ours vs TRL's GRPOTrainer (tiny model)")
    args = p.parse_args(argv)
    tiny = args.model == "tiny" and args.config is None
    for key, value in (QUICK if tiny else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("group_size", "batch_size", "max_new_tokens", "micro_batch", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (a group of one has no relative advantage)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if (args.layers or args.vision_layers) and not args.config:
        p.error("--layers / --vision-layers only apply with --config")
    if args.vs_trl and not tiny:
        p.error("--vs-trl compares on the tiny model only")
    if args.image_size is not None and args.image_size < 28:
        p.error("--image-size must be >= 28 (one 28x28 patch)")
    return args


# ---------------------------------------------------------------------------------------------
# Setup: devices, models, prompts.

def build_qwen_shaped(name, layers=None, vision_layers=None, seed=0):
    """(model, processor): Qwen2.5-VL-{3B,7B} architecture, random weights, optionally fewer layers."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    _, processor = model_mod.build_tiny(seed)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in model_mod.SPECIAL_TOKENS}
    s = dict(QWEN_SHAPES[name])
    vision_out, tie = s.pop("vision_out"), s.pop("tie_word_embeddings")
    if layers:
        s["num_hidden_layers"] = layers
    vis = dict(QWEN_VISION, out_hidden_size=vision_out)
    if vision_layers:
        vis["depth"] = vision_layers
        # keep a full-attention block at the same relative depth as in the real tower
        vis["fullatt_block_indexes"] = sorted({min(vision_layers - 1, i * vision_layers // 32)
                                               for i in QWEN_VISION["fullatt_block_indexes"]})
    config = Qwen2_5_VLConfig(
        text_config=dict(s, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=vis, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    net = Qwen2_5_VLForConditionalGeneration(config)
    net.generation_config = GenerationConfig(
        eos_token_id=[ids[t] for t in model_mod.END_TOKENS], pad_token_id=ids["<|endoftext|>"])
    return net, processor


def load_policy(args, device, dtype=torch.float32):
    """(model, processor) as train.py.build would get them, + the image budget in pixels.
    train.py keeps fp32 master weights (--bf16 = autocast) and a bf16 reference under --bf16."""
    max_pixels = args.image_size ** 2 if args.image_size else None
    if args.config:
        net, processor = build_qwen_shaped(args.config, args.layers, args.vision_layers, args.seed)
        # the tiny processor's budget is 112x112; a Qwen-shaped model gets 448x448 unless told
        max_pixels = max_pixels or 448 * 448
        processor.image_processor.size["longest_edge"] = max_pixels
        net.to(device=device, dtype=dtype)
    else:
        net, processor = model_mod.load(args.model, device=device, dtype=dtype, max_pixels=max_pixels)
    return net, processor, max_pixels


def bench_prompts(n, max_pixels, seed=0, types="all"):
    """n (record, image) pairs from a small synthetic set (data.synth), picked round-robin over
    the given question types so every step sees the same mix. Fixed across steps. A mix of all six
    types pads more than a curriculum batch (one stage) does: planning prompts are the longest."""
    import data as data_mod
    wanted = data_mod.TYPES if types == "all" else [t.strip() for t in types.split(",") if t.strip()]
    bad = [t for t in wanted if t not in data_mod.TYPES]
    if bad or not wanted:
        raise SystemExit(f"--types {types!r}: expected 'all' or names from {', '.join(data_mod.TYPES)}")
    out_dir = tempfile.mkdtemp(prefix="bench_synth_")
    train_path, _ = data_mod.synth(out_dir, cities=3, seed=seed, per_type=max(2, n // 4 + 1))
    records = data_mod.load_records(train_path)
    by_type = {}
    for r in records:
        by_type.setdefault(r["type"], []).append(r)
    if not any(t in by_type for t in wanted):
        raise SystemExit(f"--types {types!r}: none of them in the synthetic set")
    picked, i = [], 0
    while len(picked) < n:
        for t in wanted:
            if t in by_type and len(picked) < n:
                picked.append(by_type[t][i % len(by_type[t])])
        i += 1
    cache = {}
    kw = {"max_pixels": max_pixels} if max_pixels else {}
    for r in picked:
        path = data_mod.figure_path(r, train_path)
        if path not in cache:
            cache[path] = data_mod.load_image(path, **kw)
    return picked, [cache[data_mod.figure_path(r, train_path)] for r in picked]


# ---------------------------------------------------------------------------------------------
# The timed step (train.py's step, phase by phase).

def _clock(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def grpo_step(policy, wrapped, ref, opt, processor, records, images, args, device, world):
    """One GRPO step exactly as train.py runs it. Returns (phase seconds, counts)."""
    k = args.group_size
    t = {"sample": 0.0, "score": 0.0, "policy_fwd": 0.0, "old_fwd": 0.0, "ref_fwd": 0.0,
         "backward": 0.0, "optimizer": 0.0}
    c0 = _clock(device)
    with model_mod.autocast(device, args.bf16):
        rollout = model_mod.generate(policy, processor, [r["question"] for r in records], images,
                                     num_samples=k, max_new_tokens=args.max_new_tokens)
    c1 = _clock(device)
    t["sample"] = c1 - c0
    rewards = torch.tensor([reward.compute_reward(text, records[i // k])["total"]
                            for i, text in enumerate(rollout.texts)], dtype=torch.float32)
    adv = grpo.group_advantages(rewards, k)
    c2 = _clock(device)
    t["score"] = c2 - c1

    opt.zero_grad(set_to_none=True)
    n_q = len(rollout.has_image)
    local_tokens = float(rollout.completion_mask.sum())
    tok = torch.tensor(local_tokens, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(tok)
    denom = max(float(tok) / world, 1.0)
    chunks = [list(range(i, min(i + args.micro_batch, n_q))) for i in range(0, n_q, args.micro_batch)]
    ref_ctx = torch.inference_mode if args.ref_mode == "inference_mode" else torch.no_grad
    for j, qs in enumerate(chunks):
        sub = model_mod.select(rollout, qs)
        last = j == len(chunks) - 1
        sync = nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync, model_mod.autocast(device, args.bf16):
            a = _clock(device)
            logp = model_mod.token_logprobs(wrapped, sub)
            b = _clock(device)
            t["policy_fwd"] += b - a
            old_logp = logp.detach()
            if args.old_logp:        # what ppo_epochs > 1 would cost; train.py never runs it
                with torch.no_grad():
                    old_logp = model_mod.token_logprobs(policy, sub)
                c = _clock(device)
                t["old_fwd"] += c - b
                b = c
            ref_logp = None
            if ref is not None:
                with ref_ctx():
                    ref_logp = model_mod.token_logprobs(ref, sub)
                ref_logp = ref_logp.clone() if args.ref_mode == "inference_mode" else ref_logp
                c = _clock(device)
                t["ref_fwd"] += c - b
                b = c
            mask = sub.completion_mask.to(device)
            adv_sub = adv[[q * k + s for q in qs for s in range(k)]].to(device)
            loss, _ = grpo.grpo_loss(logp, old_logp, ref_logp, adv_sub, mask, kl_coef=args.kl,
                                     num_tokens=denom)
            if sub.pixel_values is None:
                loss = loss + model_mod.vision_touch(policy)
            loss.backward()
            c = _clock(device)
            t["backward"] += c - b
    a = _clock(device)
    params = [p for p in policy.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    t["optimizer"] = _clock(device) - a
    am = rollout.attention_mask
    counts = {"gen_tokens": float(sum(rollout.lengths)), "completion_tokens": local_tokens,
              "seq_tokens": float(am.sum()), "padded_cells": float(am.numel()),
              "completion_cells": float(rollout.completion_mask.numel()),
              "truncated": float(sum(rollout.truncated)) / len(rollout.truncated),
              "reward_mean": float(rewards.mean())}
    return t, counts


def peak_memory_mb(device):
    if str(device).startswith("cuda"):
        return {"peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}   # KB on Linux


def summarize(steps, counts):
    """Medians of per-step phase times and rates."""
    med = lambda xs: statistics.median(xs) if xs else 0.0
    phases = {key: med([s[key] for s in steps]) for key in steps[0]}
    step_s = [sum(s.values()) for s in steps]
    train_s = [s["policy_fwd"] + s["old_fwd"] + s["ref_fwd"] + s["backward"] + s["optimizer"]
               for s in steps]
    out = {
        "step_s": med(step_s),
        "phases_s": {k: round(v, 4) for k, v in phases.items()},
        "phase_share": {k: round(v / max(sum(phases.values()), 1e-12), 3) for k, v in phases.items()},
        "sample_tokens_per_s": med([c["gen_tokens"] / max(s["sample"], 1e-9)
                                    for s, c in zip(steps, counts)]),
        "train_tokens_per_s": med([c["completion_tokens"] / max(x, 1e-9)
                                   for x, c in zip(train_s, counts)]),
        "train_seq_tokens_per_s": med([c["seq_tokens"] / max(x, 1e-9) for x, c in zip(train_s, counts)]),
        "padding": {
            "update_tensor_pad_frac": round(1 - med([c["seq_tokens"] / c["padded_cells"] for c in counts]), 3),
            "completion_pad_frac": round(1 - med([c["completion_tokens"] / c["completion_cells"]
                                                  for c in counts]), 3),
        },
        "truncation_rate": med([c["truncated"] for c in counts]),
        "completion_tokens_per_step": med([c["completion_tokens"] for c in counts]),
        "step_s_all": [round(x, 4) for x in step_s],
    }
    return out


# ---------------------------------------------------------------------------------------------
# Reward throughput (§4.2 on planning answers).

def planning_answers(n, seed=0):
    """(answers, records, kinds, source): n planning answers, a third each right (the first
    reference route), half-right (right first segment, then a wrong line to a wrong end) and
    wrong (a made-up line between made-up stops), over real ReasonMap cities when present."""
    import data as data_mod
    rng = random.Random(seed)
    stations = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "reasonmap",
                            "stations")
    records = []
    if os.path.isdir(stations):
        source = "reasonmap"
        for country in sorted(os.listdir(stations)):
            for f in sorted(os.listdir(os.path.join(stations, country))):
                if not f.endswith(".json"):
                    continue
                raw = data_mod.load_metro_raw(os.path.join(stations, country, f))
                metro = {line: [data_mod.clean_name(s) for s in stops] for line, stops in raw.items()}
                try:
                    recs = data_mod.make_questions(
                        metro, city=f[:-5], country=country, difficulty=data_mod.city_difficulty(metro),
                        figure="map.png", rng=random.Random(f"bench-{f}"), per_type=4,
                        avoid=data_mod.ambiguous_stops(raw))
                except ValueError:
                    continue
                records += [r for r in recs if r["type"] == "planning" and r["routes"]]
    else:
        source = "synthetic"
        for i, difficulty in enumerate(data_mod.DIFFICULTIES * 3):
            metro, _ = data_mod.synth_city(random.Random(f"bench-{i}"), difficulty)
            recs = data_mod.make_questions(metro, city=f"s{i}", country="synthland",
                                           difficulty=data_mod.city_difficulty(metro),
                                           figure="map.png", rng=random.Random(i), per_type=4)
            records += [r for r in recs if r["type"] == "planning" and r["routes"]]
    if not records:
        raise RuntimeError("no planning records could be built for the reward benchmark")
    answers, recs, kinds = [], [], []
    for i in range(n):
        r = records[i % len(records)]
        route = r["routes"][0]
        kind = ("right", "half", "wrong")[i % 3]
        if kind == "right":
            text = data_mod.format_route(route)
        elif kind == "half":
            other = rng.choice(sorted(r["metro"]))
            text = data_mod.format_route(route[:1]) + (f"\n--\nRoute Name: {other} Express\nDeparture Stop: "
                                         f"{route[0]['arrival_stop']}\nArrival Stop: Nowhere {i}")
        else:
            text = f"Route Name: Line {900 + i % 7}\nDeparture Stop: Foo {i}\nArrival Stop: Bar {i}"
        answers.append(text)
        recs.append(r)
        kinds.append(kind)
    return answers, recs, kinds, source


def bench_reward(n, seed=0):
    answers, records, kinds, source = planning_answers(n, seed)
    for a, r in zip(answers[:30], records[:30]):          # warm the per-metro cache as training would
        reward.compute_reward(a, r)
    t0 = time.perf_counter()
    scores = [reward.compute_reward(a, r) for a, r in zip(answers, records)]
    dt = time.perf_counter() - t0
    by_kind = {}
    for kind, s in zip(kinds, scores):
        by_kind.setdefault(kind, []).append(s)
    return {"reward_answers_per_s": n / dt, "reward_answers": n, "reward_source": source,
            "reward_planning_records": len({id(r) for r in records}),
            "reward_mean_by_kind": {k: {part: round(statistics.mean(s[part] for s in v), 3)
                                        for part in ("correctness", "detail", "total")}
                                    for k, v in by_kind.items()}}


# ---------------------------------------------------------------------------------------------
# Ours vs TRL's GRPOTrainer (settings matched as the module docstring lists).

def vs_trl(args):
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(
            f"--vs-trl needs TRL ({e}). It is a benchmark-only install, kept out of this repo's "
            "requirements; put it in a separate venv that sees the system torch/transformers:\n"
            "  python3 -m venv --system-site-packages /tmp/trlenv\n"
            "  /tmp/trlenv/bin/pip install trl -c <(printf 'torch==2.13.0\\ntransformers==5.24.0\\n')\n"
            "  /tmp/trlenv/bin/python bench.py --vs-trl") from None
    import trl
    if args.kl > 0:
        raise SystemExit("--vs-trl compares with beta = 0 (no reference model): drop --kl")
    _, world, device = model_mod.init_distributed(args.threads)
    if world > 1:
        raise SystemExit("--vs-trl runs in one process (no torchrun)")
    k, n_q, T = args.group_size, args.batch_size, args.max_new_tokens
    max_pixels = args.image_size ** 2 if args.image_size else None
    ours, processor = model_mod.load("tiny", max_pixels=max_pixels)
    theirs, trl_processor = model_mod.load("tiny", max_pixels=max_pixels)   # same seed, same weights
    records, images = bench_prompts(n_q, max_pixels, args.seed, args.types)
    suppress = model_mod._special_ids(processor, model_mod.VISION_TOKENS)
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.999))

    rows = [{"prompt": [{"role": "user", "content": r["question"]}], "image": im, "rid": i}
            for i, (r, im) in enumerate(zip(records, images))]

    def trl_reward(prompts, completions, rid, **_):
        out = []
        for c, i in zip(completions, rid):
            text = c[-1]["content"] if isinstance(c, list) else c
            if isinstance(text, list):   # content blocks
                text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
            out.append(reward.compute_reward(text, records[i])["total"])
        return out

    total_steps = args.warmup + args.steps
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=n_q * k,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=k,
        max_completion_length=T, temperature=1.0, top_k=0, top_p=1.0,
        generation_kwargs={"suppress_tokens": suppress}, beta=0.0, num_iterations=1, epsilon=0.2,
        scale_rewards="none", loss_type="dapo", learning_rate=args.lr,
        weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.999, optim="adamw_torch",
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, max_steps=total_steps,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=device == "cpu", bf16=False,
        dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, remove_unused_columns=False)

    ours_t, ours_c, trl_t, trl_between = [], [], [], []
    trl_phase = {"generate": [], "reward": [], "forward": []}
    state = {"begin": None, "end": None, "phase": {}}
    args_step = argparse.Namespace(**vars(args), )
    args_step.kl, args_step.old_logp, args_step.micro_batch = 0.0, False, n_q

    class Alternate(TrainerCallback):
        """TRL's clock from on_step_begin to on_step_end; our step runs in on_step_end, off it."""

        def on_step_begin(self, a, s, control, **kw):
            now = time.perf_counter()
            if state["end"] is not None:
                trl_between.append(now - state["end"])
            state["phase"] = {key: 0.0 for key in trl_phase}
            state["begin"] = now

        def on_step_end(self, a, s, control, **kw):
            trl_s = time.perf_counter() - state["begin"]
            t, c = grpo_step(ours, ours, None, opt, processor, records, images, args_step, device, 1)
            if s.global_step > args.warmup:
                trl_t.append(trl_s)
                for key in trl_phase:
                    trl_phase[key].append(state["phase"][key])
                ours_t.append(t)
                ours_c.append(c)
            state["end"] = time.perf_counter()

    trainer = GRPOTrainer(model=theirs, reward_funcs=[trl_reward], args=cfg,
                          train_dataset=Dataset.from_list(rows), processing_class=trl_processor,
                          callbacks=[Alternate()])

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                state["phase"][name] = state["phase"].get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    # Instrumentation only (a clock around TRL's own methods; nothing in them changes).
    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer.compute_loss = timed("forward", trainer.compute_loss)
    # Same prompt tokens on both sides: TRL's own tokenisation of row 0 against ours.
    prompt_ids, _, _ = trainer._tokenize_prompts([
        [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                      {"type": "text", "text": records[0]["question"]}]}]])
    enc, _ = model_mod.encode(processor, [records[0]["question"]], [images[0]])
    same_prompt = list(prompt_ids[0]) == enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    trainer.train()

    med = statistics.median
    ours_sum = summarize(ours_t, ours_c)
    paired = [sum(o.values()) / t for o, t in zip(ours_t, trl_t)]
    return {
        "ratio_ours_over_trl": ours_sum["step_s"] / med(trl_t),
        "ratio_paired_median": med(paired),
        "ours": ours_sum,
        "trl": {"step_s": med(trl_t), "step_s_all": [round(x, 4) for x in trl_t],
                "phases_s": {key: round(med(v), 4) for key, v in trl_phase.items()},
                "backward_optimizer_other_s": round(med(
                    [t - sum(trl_phase[key][i] for key in trl_phase) for i, t in enumerate(trl_t)]), 4),
                "between_steps_s": round(med(trl_between), 4) if trl_between else None},
        "matched": {"same_prompt_tokens": same_prompt, "group_size": k, "questions": n_q,
                    "max_new_tokens": T, "beta": 0.0, "num_iterations": 1, "lr": args.lr,
                    "weight_decay": args.weight_decay, "grad_clip": 1.0, "advantages": "centred",
                    "loss": "token-mean", "torch_threads": torch.get_num_threads()},
        "versions": {"trl": trl.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "steps": args.steps, "warmup": args.warmup,
    }


# ---------------------------------------------------------------------------------------------
# Main benchmark.

def run_bench(args):
    rank, world, device = model_mod.init_distributed(args.threads)
    policy, processor, max_pixels = load_policy(args, device)
    model_mod.prepare_for_training(policy, freeze_vision=args.freeze_vision,
                                   grad_checkpointing=args.grad_checkpointing)
    ref = None
    if args.kl > 0:
        ref, _, _ = load_policy(args, device, torch.bfloat16 if args.bf16 else torch.float32)
        ref.eval().requires_grad_(False)
    wrapped = policy
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(policy, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    records, images = bench_prompts(args.batch_size * world, max_pixels, args.seed, args.types)
    records = records[rank * args.batch_size:(rank + 1) * args.batch_size]   # own questions per rank
    images = images[rank * args.batch_size:(rank + 1) * args.batch_size]
    torch.manual_seed(args.seed * 1000 + rank)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    steps, counts = [], []
    for i in range(args.warmup + args.steps):
        t, c = grpo_step(policy, wrapped, ref, opt, processor, records, images, args, device, world)
        if i >= args.warmup:
            steps.append(t)
            counts.append(c)
    result = summarize(steps, counts)
    result.update(peak_memory_mb(device))
    if world > 1:   # the slowest rank sets the pace of a synchronous step
        gathered = [None] * world
        dist.all_gather_object(gathered, result["step_s"])
        result["step_s_per_rank"] = gathered
    result["setup"] = {
        "model": args.config or args.model, "layers": args.layers, "vision_layers": args.vision_layers,
        "parameters": sum(p.numel() for p in policy.parameters()), "device": device,
        "world_size": world, "torch_threads": torch.get_num_threads(), "group_size": args.group_size,
        "batch_size_per_rank": args.batch_size, "micro_batch": args.micro_batch,
        "max_new_tokens": args.max_new_tokens, "max_pixels": max_pixels, "kl": args.kl,
        "ref_mode": args.ref_mode, "old_logp": args.old_logp, "bf16": args.bf16,
        "grad_checkpointing": args.grad_checkpointing, "steps": args.steps, "warmup": args.warmup,
        "prompt_types": [r["type"] for r in records], "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    if args.reward_answers and rank == 0:
        result.update(bench_reward(args.reward_answers, args.seed))
    if world > 1:
        dist.destroy_process_group()
    return rank, result


def main(argv=None):
    args = parse_args(argv)
    if args.vs_trl:
        rank, result = 0, vs_trl(args)
    else:
        rank, result = run_bench(args)
    if rank == 0:
        text = json.dumps(result, indent=2, ensure_ascii=False)
        print(text)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
