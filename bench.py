"""Where the time of one GRPO step goes, and how fast the reward is. A benchmark, not a test: it
asserts nothing about time. Measured numbers and what they point to: docs/bench.md.

    python bench.py                                          # tiny model, train.py's CPU quick-start shapes
    python bench.py --kl 1e-3 --old-logp                     # + reference forward, + an old-logp forward
    python bench.py --config 3b --layers 2 --vision-layers 2 --batch-size 1 --group-size 4 \\
                    --max-new-tokens 16 --max-pixels 50176   # the real 3B shapes, cut in depth for a CPU
    python bench.py --config 3b --bf16 --batch-size 1 --max-new-tokens 256   # the full 3B, random init (GPU)
    python bench.py --model /models/Qwen2.5-VL-3B-Instruct --bf16   # a local checkpoint (GPU)
    torchrun --standalone --nproc_per_node=2 bench.py        # DDP, each rank its own questions

The GPU memory plan and the TRL comparison use this file's models and step: tools/memplan.py,
tools/vs_trl.py. Every flag bench.py does not know is train.py's (train.parse_args), so a README
command is timed exactly as written, its defaults too (--model tiny: the quick-start shapes; a
real or --config model: the paper's §5.1 settings, K=8, KL 1e-3, 2048 new tokens).

The timed step is train.py's: model.generate (under train.gathered / train.autocast) ->
train.score -> grpo.group_advantages -> train.update, whose phase hooks time the policy forwards,
the reference forwards and the backwards -> train.optimizer_step (CUDA synchronised before each
clock read). --old-logp also times the no_grad forward a second update per batch would need
(train.py does one update per batch, so pi_old = pi_theta). --config 3b|7b builds
Qwen2.5-VL-3B/7B-Instruct's architecture from their config.json values with random weights (no
download; --layers / --vision-layers cut the depth), with the tiny model's tokenizer: a random
model rarely ends its turn, so completions run to --max-new-tokens, the worst case.

Output: one JSON object (stdout and --json-out FILE) of medians over --steps timed steps after
--warmup untimed ones: step_s, phases_s, sample_tokens_per_s, train_tokens_per_s, padding,
reward_answers_per_s, peak_rss_mb (CPU) or peak_cuda_mb (torch.cuda.max_memory_allocated); each
field is described in docs/bench.md.
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
from contextlib import contextmanager

import torch
import torch.distributed as dist

import data as data_mod
import grpo
import model as model_mod
import reward
import train

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
    """bench.py's own options; every other flag is train.py's, parsed by train.parse_args (so a
    README training command can be timed exactly as written): args.train."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # what is measured (model, shapes and settings: train.py's flags)
    p.add_argument("--config", choices=sorted(QWEN_SHAPES), default=None,
                   help="random weights in the real 3B/7B architecture (instead of --model)")
    p.add_argument("--layers", type=int, default=None, help="with --config: decoder layers kept")
    p.add_argument("--vision-layers", type=int, default=None, help="with --config: vision blocks kept")
    p.add_argument("--types", default="all",
                   help="question types in the batch, comma-separated (e.g. planning, or TorF1,TorF2 "
                        "for the first curriculum stage); default all six, round-robin")
    p.add_argument("--old-logp", action="store_true",
                   help="also time the old-policy forward a second update per batch would need")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as train.py)")
    # how long
    p.add_argument("--steps", type=int, default=5, help="timed steps (medians over these)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--reward-answers", type=int, default=3000,
                   help="planning answers for the reward throughput (0: skip)")
    p.add_argument("--json-out", default=None, help="also write the JSON here")
    args, rest = p.parse_known_args(argv)
    moved = {"--plan": "tools/memplan.py", "--table": "tools/memplan.py --table",
             "--check-readme": "tools/memplan.py --check-readme", "--vs-trl": "tools/vs_trl.py"}
    for flag, where in moved.items():
        if flag in rest:
            p.error(f"{flag} moved: python {where} (same flags otherwise)")
    args.train = train_args(args.config, rest)
    args.tiny = args.train.model == "tiny" and args.config is None
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if (args.layers or args.vision_layers) and not args.config:
        p.error("--layers / --vision-layers only apply with --config")
    return args


def train_args(config, argv):
    """train.parse_args(argv); a --config model gets the paper's defaults (§5.1), as a real
    checkpoint does."""
    if config and "--model" not in argv:
        argv = ["--model", f"Qwen2.5-VL-{config.upper()}"] + argv
    return train.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Setup: devices, models, prompts.

def build_qwen_shaped(name, layers=None, vision_layers=None, seed=0, dtype=torch.float32):
    """(model, processor): Qwen2.5-VL-{3B,7B} architecture (name, or a QWEN_SHAPES-like dict),
    random weights built in dtype, optionally fewer layers."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    _, processor = model_mod.build_tiny(seed)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in model_mod.SPECIAL_TOKENS}
    s = dict(QWEN_SHAPES[name] if isinstance(name, str) else name)
    vision_out, tie = s.pop("vision_out"), s.pop("tie_word_embeddings")
    vis = dict(QWEN_VISION, **s.pop("vision", {}), out_hidden_size=vision_out)
    if layers:
        s["num_hidden_layers"] = layers
    if vision_layers:
        # keep a full-attention block at the same relative depth as in the real tower
        vis["fullatt_block_indexes"] = sorted({min(vision_layers - 1, i * vision_layers // vis["depth"])
                                               for i in vis["fullatt_block_indexes"]})
        vis["depth"] = vision_layers
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    config = Qwen2_5_VLConfig(
        text_config=dict(s, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": _mrope_section(head_dim)},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=vis, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    net = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    net.generation_config = GenerationConfig(
        eos_token_id=[ids[t] for t in model_mod.END_TOKENS], pad_token_id=ids["<|endoftext|>"])
    return net, processor


def _mrope_section(head_dim):
    """Qwen2.5-VL's M-RoPE split [16, 24, 24] of head_dim/2 = 64 (t, h, w), scaled to other widths
    (it must sum to head_dim/2)."""
    half = head_dim // 2
    h = half * 3 // 8
    return [half - 2 * h, h, h]


def load_policy(args, device, dtype=torch.float32):
    """(model, processor) as train.build loads them: fp32 master weights (--bf16 = autocast),
    the reference in bf16 under --bf16. A --config model gets the tiny processor with the
    --max-pixels budget."""
    if args.config:
        net, processor = build_qwen_shaped(args.config, args.layers, args.vision_layers,
                                           args.train.seed, dtype)
        model_mod.set_max_pixels(processor, args.train.max_pixels)
        return net.to(device), processor
    return model_mod.load(args.train.model, device=device, dtype=dtype, max_pixels=args.train.max_pixels)


def bench_prompts(n, max_pixels, seed=0, types="all"):
    """n (record, image) pairs from a small synthetic set (data.synth), picked round-robin over
    the given question types so every step sees the same mix. Fixed across steps. A mix of all six
    types pads more than a curriculum batch (one stage) does: planning prompts are the longest."""
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


@contextmanager
def _timer(times, name, device):
    a = _clock(device)
    try:
        yield
    finally:
        times[name] += _clock(device) - a


def grpo_step(policy, wrapped, ref, opt, processor, records, images, targs, device, world,
              old_logp=False):
    """One GRPO step as train.py runs it, phase by phase: train.update itself (its phase hooks
    time the forwards and the backward) and train.optimizer_step. Returns (phase seconds, counts)."""
    k = targs.group_size
    t = dict.fromkeys(("sample", "score", "policy_fwd", "old_fwd", "ref_fwd", "backward",
                       "optimizer"), 0.0)
    with _timer(t, "sample", device), train.gathered(policy, targs), train.autocast(targs, device):
        rollout = model_mod.generate(policy, processor, [r["question"] for r in records], images,
                                     num_samples=k, max_new_tokens=targs.max_new_tokens,
                                     temperature=targs.temperature)
    with _timer(t, "score", device):
        rewards = torch.tensor([s["total"] for s in train.score(rollout.texts, records, k, targs)])
        adv = grpo.group_advantages(rewards, k, scale=targs.adv_scale)
    loss, _ = train.update(wrapped, policy, ref, rollout, adv, targs, world, device,
                           phase=lambda name: _timer(t, name, device))
    if old_logp:   # what a second update per batch (ppo_epochs > 1) would cost; train.py never runs it
        n = rollout.input_ids.shape[0]
        with _timer(t, "old_fwd", device), torch.no_grad(), train.autocast(targs, device):
            for i in range(0, n, targs.micro_batch):
                sub = model_mod.select(rollout, range(i, min(i + targs.micro_batch, n)))
                model_mod.token_logprobs(policy, sub, temperature=targs.temperature)
    with _timer(t, "optimizer", device):
        train.optimizer_step(opt, [p for p in policy.parameters() if p.requires_grad], loss, targs,
                             world, device)
    am = rollout.attention_mask
    counts = {"gen_tokens": float(sum(rollout.lengths)),
              "completion_tokens": float(rollout.completion_mask.sum()),
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
        for i, difficulty in enumerate(reward.DIFFICULTIES * 3):
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
# Main benchmark.

def run_bench(args):
    targs = args.train
    rank, world, device = model_mod.init_distributed(args.threads)
    if targs.batch_size % world:
        raise SystemExit(f"--batch-size {targs.batch_size} is not a multiple of {world} ranks")
    policy, processor = load_policy(args, device)
    ref = None
    if targs.kl > 0:
        ref, _ = load_policy(args, device, torch.bfloat16 if targs.bf16 else torch.float32)
    wrapped = train.distribute(policy, ref, processor, targs, device, world)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=targs.lr, weight_decay=targs.weight_decay, betas=(0.9, 0.999))
    n = targs.batch_size // world
    records, images = bench_prompts(targs.batch_size, targs.max_pixels, targs.seed, args.types)
    records, images = records[rank * n:(rank + 1) * n], images[rank * n:(rank + 1) * n]   # own questions
    torch.manual_seed(targs.seed * 1000 + rank)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    steps, counts = [], []
    for i in range(args.warmup + args.steps):
        t, c = grpo_step(policy, wrapped, ref, opt, processor, records, images, targs, device, world,
                         old_logp=args.old_logp)
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
        "model": args.config or targs.model, "layers": args.layers, "vision_layers": args.vision_layers,
        "parameters": sum(p.numel() for p in policy.parameters()), "device": device,
        "world_size": world, "torch_threads": torch.get_num_threads(), "group_size": targs.group_size,
        "batch_size_per_rank": n, "micro_batch": targs.micro_batch,
        "max_new_tokens": targs.max_new_tokens, "max_pixels": targs.max_pixels, "kl": targs.kl,
        "old_logp": args.old_logp, "bf16": targs.bf16, "fsdp": targs.fsdp,
        "grad_checkpointing": targs.grad_checkpointing, "steps": args.steps, "warmup": args.warmup,
        "prompt_types": [r["type"] for r in records], "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    if args.reward_answers and rank == 0:
        result.update(bench_reward(args.reward_answers, targs.seed))
    del wrapped
    model_mod.close_distributed()
    return rank, result


def print_json(result, path=None):
    """The result on stdout, and in the file `path` (--json-out) if given."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def main(argv=None):
    args = parse_args(argv)
    rank, result = run_bench(args)
    if rank == 0:
        print_json(result, args.json_out)


if __name__ == "__main__":
    main(sys.argv[1:])
