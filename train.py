"""RewardMap training (§4, §5.1): multi-stage GRPO with the difficulty-aware detail reward.

    python train.py                                     # CPU quick start: tiny model, synthetic maps
    torchrun --standalone --nproc_per_node=N train.py --model tiny|PATH --data FILE.jsonl --out DIR
    torchrun ... train.py --model /models/Qwen2.5-VL-7B-Instruct --data train.jsonl --out runs/7b \
        --bf16 --fsdp --grad-checkpointing                # 3B or 7B on 8 GPUs (docs/memory.md)
    python train.py --resume runs/quickstart/step-20 --out runs/quickstart   # continue a run
    torchrun --max-restarts 3 ... train.py ... --save-every 20 --resume auto  # survive crashes and
        # preemption: SIGTERM / Ctrl-C finish the step and write step-N/ (checkpoint.py)

One step (a thin composition of model.py, reward.py, grpo.py, curriculum.py):
  1. curriculum.epoch_batches gives this rank its share of the global batch (§4.3 stage order);
  2. model.generate samples K completions per question (each rank samples whole groups, so the
     group-relative advantage needs no cross-rank gather);
  3. reward.compute_reward scores them (§4.2, Alg. 1); grpo.group_advantages centres per group;
  4. model.token_logprobs (teacher-forced) -> grpo.grpo_loss -> backward; DDP averages gradients;
     AdamW step with grad-norm clip 1.0.
One optimiser update per batch, so π_θold = π_θ and old_logp = logp.detach(): the ratio is 1 and
no second forward is spent on it; the surrogate's gradient is still Â·∇log π (grpo.py).

Defaults (`--help` shows each): the paper's §5.1 settings for a real --model folder, the CPU quick
start's (QUICK below) for --model tiny. Where the release differs: docs/deviations.md.

Outputs in --out: config.json, metrics.jsonl (a line per step), step-N/ every --save-every steps
and on SIGTERM / SIGINT, final/ (model + processor via save_pretrained, trainer state, every rank's
RNG, manifest last: checkpoint.py), data/ when the quick start made it, samples.jsonl
(--log-samples) and report.html (report.py: curves, samples, Alg. 1 traces).
"""
import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

import checkpoint
import curriculum
import data as data_mod
import grpo
import model as model_mod
import report
import reward
from checkpoint import all_gather, all_sum, fsdp_reshard

# A real --model folder: §5.1, the release where the paper says nothing (weight decay, one pass),
# and ours for the memory knobs. The source of each value is shown by --help.
PAPER = dict(lr=1e-6, kl=1e-3, group_size=8, batch_size=16, max_new_tokens=2048,
             weight_decay=1e-2, epochs=1, micro_batch=4, max_pixels=data_mod.DEFAULT_MAX_PIXELS, log_samples=0)
SOURCE = dict(lr="§5.1", kl="§5.1", group_size="§5.1", batch_size="§5.1", max_new_tokens="§5.1",
              weight_decay="release", epochs="release",
              micro_batch="the largest that fits 80 GB, docs/memory.md",
              max_pixels="ours, docs/deviations.md")
# CPU quick start with --model tiny: 8 questions x 8 samples a step, 32 new tokens, lr 3e-3 (a
# random tiny model moves nowhere at 1e-6), no KL (no reference model, no second forward), one
# pass over 6 cities x 16 questions per type (38 steps). A second pass at this lr collapses: the
# model answers \boxed{yes} to everything and every counting group ties. Two groups a step go to
# samples.jsonl, for the report.html the quick start ends with. No max_pixels: the tiny
# processor keeps its own (model.TINY_MAX_PIXELS).
QUICK = dict(lr=3e-3, kl=0.0, group_size=8, batch_size=8, max_new_tokens=32,
             weight_decay=0.0, epochs=1, micro_batch=64, log_samples=2)
QUICK_CITIES = 6
QUICK_PER_TYPE = 16
TYPES = reward.TYPES


def _num(v):
    """1,003,520 / 0.01 / 1e-6, as a reader writes them."""
    if isinstance(v, int):
        return f"{v:,}"
    if 0 < abs(v) < 1e-2:
        mantissa, exponent = f"{v:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:g}"


def defaults_help(key):
    """'default 1e-6, §5.1; 3e-3 with --model tiny': from PAPER / QUICK, the dicts parse_args
    resolves a None default from, so the help cannot drift from what runs."""
    src = f", {SOURCE[key]}" if key in SOURCE else ""
    tiny = (_num(QUICK[key]) if key in QUICK else
            f"the tiny processor's {model_mod.TINY_MAX_PIXELS:,}" if key == "max_pixels" else None)
    return f"default {_num(PAPER[key])}{src}; {tiny} with --model tiny"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = defaults_help   # "default X, §5.1; Y with --model tiny"
    # Model and data
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built in code) or a local Qwen2.5-VL folder (default tiny)")
    p.add_argument("--data", default=None, help="train JSONL (data.py); default: synthesise into OUT/data")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default %(default)s)")
    p.add_argument("--synth-cities", type=int, default=QUICK_CITIES,
                   help="cities when synthesising (default %(default)s)")
    p.add_argument("--synth-per-type", type=int, default=QUICK_PER_TYPE,
                   help="questions per type per city when synthesising (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image budget in pixels, 28x28 px per image token: maps are read and processed "
                        f"at most this big ({d('max_pixels')}); the paper's budget is "
                        f"{data_mod.PAPER_MAX_PIXELS:,} (docs/memory.md: what each costs)")
    # Algorithm (the paper's ablations, §4.2, §4.3, Tables 3-7)
    p.add_argument("--algo", choices=("grpo", "sft"), default="grpo",
                   help="sft: the SFT baseline on gold answers, every weight at --lr (Table 1's "
                        "SFT -> RL; the paper's is LoRA at 1e-4, docs/deviations.md)")
    p.add_argument("--curriculum", default="rewardmap", choices=sorted(curriculum.MODES),
                   help="stage order, §4.3 (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="detail reward weight α (default %(default)s, §4.2)")
    p.add_argument("--no-detail", action="store_true", help="drop the detail reward (ablation)")
    p.add_argument("--no-difficulty", action="store_true", help="weight 1 for every question (ablation)")
    p.add_argument("--adv-scale", action="store_true",
                   help="divide advantages by the group std (release); cancels the difficulty weight")
    p.add_argument("--kl", type=float, default=None,
                   help=f"KL coefficient β, 0: no reference model ({d('kl')})")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip ε (default %(default)s, release)")
    p.add_argument("--group-size", type=int, default=None, help=f"K samples per question ({d('group_size')})")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default %(default)s, release)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens per sampled answer ({d('max_new_tokens')})")
    # Optimisation
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate ({d('lr')})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay ({d('weight_decay')})")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="grad-norm clip (default %(default)s, release)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"questions per global step ({d('batch_size')})")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="samples per forward/backward in the update (memory knob, same result): a "
                        f"divisor or a multiple of --group-size ({d('micro_batch')})")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the data ({d('epochs')})")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many global steps (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling and shuffle seed (default %(default)s)")
    # Systems
    p.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights (GPU)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2: shard per decoder layer and vision block (3B and 7B on GPUs)")
    p.add_argument("--offload", action="store_true",
                   help="with --fsdp: fp32 master shards, their gradients and AdamW state in CPU "
                        "memory (FSDP2 CPUOffloadPolicy), for 24-48 GB cards")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--freeze-vision", action="store_true", help="train the language model only")
    # Checkpoints and logs (checkpoint.py)
    p.add_argument("--save-every", type=int, default=0, help="write OUT/step-N every N steps (default 0: never)")
    p.add_argument("--resume", default=None,
                   help="auto (the newest complete checkpoint in --out, else a fresh start), a step-N/ "
                        "or final/ folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("--no-final", action="store_true",
                   help="skip writing OUT/final/ (timing and memory runs: tools/gpu_check.sh)")
    p.add_argument("--log-samples", type=int, default=None, metavar="N",
                   help="write N whole groups a step (rank 0's first) to OUT/samples.jsonl for "
                        f"the report ({d('log_samples')})")
    # Tests only: poison the loss at this step; ask rank R's questions without their image;
    # fail at a known point (checkpoint.inject_fault)
    p.add_argument("--inject-nan-at", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)
    p.add_argument("--text-only-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.model == "tiny" else PAPER
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("group_size", "batch_size", "max_new_tokens", "micro_batch", "epochs"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.log_samples < 0:
        p.error("--log-samples must be >= 0")
    if args.algo == "grpo" and args.group_size < 2:
        p.error("--group-size must be >= 2 for GRPO (a group of one has no relative advantage)")
    k = args.group_size if args.algo == "grpo" else 1
    if args.micro_batch % k and k % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide or be a multiple of --group-size {k}")
    if args.offload and not args.fsdp:
        p.error("--offload needs --fsdp (FSDP2's CPU offload)")
    return args


# ---------------------------------------------------------------------------------------------
# Data.

def prepare_data(args, rank, world):
    """Records of --data, or of a synthetic set written to OUT/data by rank 0 (quick start)."""
    path = args.data
    if path is None:
        path = os.path.join(args.out, "data", "train.jsonl")
        if rank == 0 and not os.path.exists(path):
            data_mod.synth(os.path.join(args.out, "data"), cities=args.synth_cities, seed=args.seed,
                           per_type=args.synth_per_type)
        if world > 1:
            dist.barrier()
    records = data_mod.load_records(path)
    return path, records


class ImageCache:
    """Maps are shared by many questions; read each once (bounded, oldest dropped first)."""

    def __init__(self, jsonl_path, max_pixels, size=64):
        self.root, self.max_pixels, self.size = jsonl_path, max_pixels, size
        self.items = {}

    def __call__(self, record):
        if not record.get("figure"):
            return None
        path = data_mod.figure_path(record, self.root)
        if path not in self.items:
            if len(self.items) >= self.size:
                self.items.pop(next(iter(self.items)))
            kw = {"max_pixels": self.max_pixels} if self.max_pixels else {}
            self.items[path] = data_mod.load_image(path, **kw)
        return self.items[path]


# ---------------------------------------------------------------------------------------------
# Model and optimiser (checkpoints: checkpoint.py).

def build(args, device, world, init_from):
    """(policy, wrapped policy, processor, reference or None)."""
    # Deviation: fp32 master weights under --bf16, at lr 1e-6 bf16 ones would not move (docs/deviations.md).
    # --bf16 computes in bf16 (autocast under DDP, MixedPrecisionPolicy under FSDP2). FSDP2 loads
    # on the host and fully_shard moves each unit's shard to the GPU: no GPU ever holds a whole
    # fp32 model (tools/memplan.py: 7B's load would otherwise be its peak, 50 GB).
    at = "cpu" if args.fsdp else device
    policy, processor = model_mod.load(init_from, device=at, dtype=torch.float32,
                                       max_pixels=args.max_pixels)
    ref = None
    if args.kl > 0 and args.algo == "grpo":   # a reference model only when the KL term is on
        # the reference is the initial model (also on --resume), never updated: bf16 is enough
        ref, _ = model_mod.load(args.model, device=at, max_pixels=args.max_pixels,
                                dtype=torch.bfloat16 if args.bf16 else torch.float32)
    return policy, distribute(policy, ref, processor, args, device, world), processor, ref


def distribute(policy, ref, processor, args, device, world):
    """Training setup of the loaded models, then the wrapper that syncs gradients: FSDP2 shards
    policy and reference in place (returns the policy), DDP wraps the policy (returns the wrapper).
    tools/memplan.py runs this on its own Qwen-shaped models."""
    model_mod.prepare_for_training(policy, freeze_vision=args.freeze_vision,
                                   grad_checkpointing=args.grad_checkpointing)
    if ref is not None:
        ref.eval().requires_grad_(False)
    if args.fsdp:
        fsdp_shard(policy, processor, args, device)
        if ref is not None:
            fsdp_shard(ref, processor, args, device)
        return policy
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets instead
        # of a second full copy of them (tools/memplan.py)
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DDP(policy, device_ids=ids, gradient_as_bucket_view=True)
    return policy


def fsdp_shard(net, processor, args, device):
    """FSDP2: a unit per decoder layer, per vision block and for the vision tower (token_logprobs
    encodes each image once, outside the root forward, and shares its features among the K
    samples), then the root. --offload keeps the fp32 shards, their gradients and the AdamW state
    in CPU memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if args.bf16 else MixedPrecisionPolicy())
    if args.offload:
        if not torch.cuda.is_available():
            raise SystemExit("--offload needs GPUs (FSDP2 offloads to pinned host memory)")
        kw["offload_policy"] = CPUOffloadPolicy()
    for unit in fsdp_units(net):
        fully_shard(unit, **kw)
    # FSDP2 initialises from the first root forward; gathered() calls unshard() on children
    # before any, so run one text-only token through the root now (same on every rank).
    with torch.no_grad():
        net(input_ids=torch.tensor([[processor.tokenizer.pad_token_id]], device=device))
    fsdp_reshard(net)   # else the optimizer would collect the root's gathered copies


def fsdp_units(net):
    """FSDP2's units, innermost first: decoder layers, vision blocks, the vision tower, the root."""
    return [*net.model.language_model.layers, *net.model.visual.blocks, net.model.visual, net]


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# One step.

def reward_options(args):
    return dict(alpha=args.alpha, difficulty_aware=not args.no_difficulty, detail=not args.no_detail)


def score(texts, records, k, args):
    """Rewards (§4.2) for question-major texts; one dict per completion."""
    out = []
    for i, text in enumerate(texts):
        rec = records[i // k]
        r = reward.compute_reward(text, rec, **reward_options(args))
        r["type"] = rec["type"]
        out.append(r)
    return out


@contextmanager
def gathered(policy, args):
    """FSDP2 only: hold full parameters for the whole rollout. HF generate encodes images outside
    the root forward (mixed Tensor/DTensor error otherwise), and one all-gather per rollout beats
    one per decoded token. Memory: the full model in param_dtype on each GPU (verl does the same)."""
    if not args.fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    policy.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
        policy.set_reshard_after_forward(True)
        policy.set_reshard_after_forward(False, recurse=False)   # the root's FSDP default


def autocast(args, device):
    """bf16 autocast for DDP / single process; FSDP2 casts by its own MixedPrecisionPolicy."""
    return model_mod.autocast(device, args.bf16 and not args.fsdp)


def update(wrapped, policy, ref, rollout, advantages, args, world, device, nan_now=False, phase=None):
    """Teacher-forced log-probs -> GRPO (or SFT) loss -> backward, in micro-batches of
    --micro-batch samples (whole questions, or an equal part of each: model.select).

    The loss is the token-mean over the whole global batch: each micro-batch's token sum is divided
    by the global token count / world (DDP averages over ranks), so micro-batching and the number
    of ranks change nothing but memory. Deviation: not the release's per-response mean
    (docs/deviations.md). phase(name), when given, is a context manager entered
    around "policy_fwd", "ref_fwd" and "backward" (bench.py times them, tools/memplan.py follows
    memory by them)."""
    phase = phase or (lambda name: nullcontext())
    n = rollout.input_ids.shape[0]
    local_tokens = float(rollout.completion_mask.sum())
    denom = max(all_sum(local_tokens, world, device) / world, 1.0)
    chunks = [range(i, min(i + args.micro_batch, n)) for i in range(0, n, args.micro_batch)]
    stats_sum, loss_sum = {}, 0.0
    for j, rows in enumerate(chunks):
        sub = model_mod.select(rollout, rows)
        last = j == len(chunks) - 1
        sync = nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync, autocast(args, device):
            with phase("policy_fwd"):
                logp = model_mod.token_logprobs(wrapped, sub, temperature=args.temperature)
            mask = sub.completion_mask.to(device)
            if args.algo == "sft":
                loss = -(logp * mask).sum() / denom
                st = {"tokens": float(mask.sum())}
            else:
                ref_logp = None
                if ref is not None:
                    with phase("ref_fwd"), torch.no_grad():
                        ref_logp = model_mod.token_logprobs(ref, sub, temperature=args.temperature)
                    if args.fsdp:   # FSDP2 keeps a root's gathered weights (embeddings, head)
                        ref.reshard()   # for a backward the reference never runs
                adv = advantages[rows.start:rows.stop].to(device)
                loss, st = grpo.grpo_loss(logp, logp.detach(), ref_logp, adv, mask,
                                          clip_eps=args.clip_eps, kl_coef=args.kl, num_tokens=denom)
            if sub.pixel_values is None:
                loss = loss + model_mod.vision_touch(policy)
            if nan_now:
                loss = loss * float("nan")
            with phase("backward"):
                loss.backward()
        loss_sum += float(loss.detach())
        w = st.get("tokens", 0.0)
        for key, v in st.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + (v if key == "tokens" else v * w)
    tok = max(stats_sum.get("tokens", 0.0), 1.0)
    stats = {key: (v if key == "tokens" else v / tok) for key, v in stats_sum.items()}
    return loss_sum, stats


def optimizer_step(opt, params, loss, args, world, device):
    """Grad-norm clip and AdamW step, then the gradients are freed at once (not kept through the
    next rollout; tools/memplan.py). Grads are all-reduced, so a non-finite norm is seen by every rank alike; the
    loss flag is summed as well, so all ranks skip together (a lone skip would desync DDP).
    Returns (grad norm, skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    bad = all_sum(0.0 if math.isfinite(loss) else 1.0, world, device) > 0 or not math.isfinite(norm)
    if not bad:
        opt.step()
    # Under DDP the gradients are views of its all-reduce buckets, which it keeps anyway: zero
    # them in place (set to None, the next no_sync micro-batch would build a second copy).
    opt.zero_grad(set_to_none=args.fsdp or world == 1)
    return norm, bad


def teacher_rollout(processor, questions, images, targets):
    """A Rollout whose completions are the gold answers (SFT), built with model.py's own encoding."""
    enc, has_image = model_mod.encode(processor, questions, images)
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids(model_mod.END_TOKENS[0])
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in targets]
    T = max(len(x) for x in ids)
    comp = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in ids])
    cmask = torch.tensor([[1.0] * len(x) + [0.0] * (T - len(x)) for x in ids])
    return model_mod.Rollout(
        texts=list(targets), truncated=[False] * len(ids), lengths=[len(x) for x in ids],
        num_samples=1, input_ids=torch.cat([enc["input_ids"], comp], 1),
        attention_mask=torch.cat([enc["attention_mask"], cmask.long()], 1),
        mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1),
        completion_mask=cmask, prompt_len=enc["input_ids"].shape[1],
        pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
        has_image=has_image, suppress_ids=model_mod._special_ids(processor, model_mod.VISION_TOKENS))


def step_metrics(samples, step, stage, k, loss, stats, times, world, skipped):
    """One metrics.jsonl line from every rank's per-sample scores (gathered)."""
    n = max(len(samples), 1)
    mean = lambda key, rows=samples: sum(s[key] for s in rows) / max(len(rows), 1)
    groups = [samples[i:i + k] for i in range(0, len(samples), k)]
    row = {
        "step": step, "stage": stage, "reward": mean("total"), "format": mean("format"),
        "correctness": mean("correctness"), "detail": mean("detail"),
        "accuracy": sum(s["correctness"] > 0 for s in samples) / n,
        "zero_std_frac": sum(len({g["total"] for g in grp}) == 1 for grp in groups) / max(len(groups), 1),
        "kl": stats.get("kl", 0.0), "clip_frac": stats.get("clip_frac", 0.0), "loss": loss,
        "response_length": mean("length"), "truncation_rate": mean("truncated"),
        "questions": len(groups), "samples": len(samples), "skipped": skipped,
    }
    for t in TYPES:
        rows = [s for s in samples if s["type"] == t]
        if rows:
            row[f"reward/{t}"] = mean("total", rows)
            row[f"acc/{t}"] = sum(s["correctness"] > 0 for s in rows) / len(rows)
    gen_tokens = sum(s["length"] for s in samples)
    row["tokens_per_s"] = gen_tokens / max(times["sample"], 1e-9)
    row.update({f"time/{key}": round(v, 3) for key, v in times.items()})
    return row


def param_digest(net):
    import hashlib
    h = hashlib.sha256()
    for name, p in net.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def log_samples(args, step, stage, batch, rollout, advantages, k, data_path):
    """--log-samples N: the first N groups of this rank's batch, whole, to OUT/samples.jsonl
    (report.group: question, gold answer, map, the K completions, reward parts, Alg. 1 traces,
    advantages). Figures are stored relative to OUT, which holds the quick start's maps."""
    with open(os.path.join(args.out, "samples.jsonl"), "a", encoding="utf-8") as f:
        for q, rec in enumerate(batch[:args.log_samples]):
            part = slice(q * k, (q + 1) * k)
            figure = rec.get("figure") and os.path.relpath(data_mod.figure_path(rec, data_path), args.out)
            line = report.group(rec, rollout.texts[part], figure=figure, step=step, stage=stage,
                                advantages=advantages[part].tolist(),
                                truncated=rollout.truncated[part], reward_kw=reward_options(args))
            f.write(json.dumps(line) + "\n")


def log_row(out_dir, row):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = model_mod.init_distributed()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {world} ranks")
    os.makedirs(args.out, exist_ok=True)
    data_path, records = prepare_data(args, rank, world)
    images = ImageCache(data_path, args.max_pixels)

    resume_dir, state = checkpoint.resume_point(args, rank, world)
    start_step = state["step"] if resume_dir else 0
    policy, wrapped, processor, ref = build(args, device, world, resume_dir or args.model)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    if resume_dir:
        checkpoint.load_optimizer(opt, state, resume_dir, rank, args)

    # The whole plan up front: epoch e is curriculum.epoch_batches(seed, epoch=e); global step s
    # is plan[s] on every rank, so resuming at step s is just "start at plan[s]".
    plan = []
    for epoch in range(args.epochs):
        plan += curriculum.epoch_batches(records, mode=args.curriculum, seed=args.seed, epoch=epoch,
                                         batch_size=args.batch_size, rank=rank, world_size=world)
    total = min(len(plan), args.max_steps) if args.max_steps else len(plan)
    torch.manual_seed(args.seed * 1000 + rank)   # ranks sample different completions
    random.seed(args.seed * 1000 + rank)
    if resume_dir:
        checkpoint.restore_rng(resume_dir, rank)
    if rank == 0:
        cfg = dict(vars(args), world_size=world, device=device, data_path=data_path,
                   records=len(records), steps=total, start_step=start_step,
                   parameters=sum(p.numel() for p in policy.parameters()),
                   trainable=sum(p.numel() for p in params))
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        checkpoint.trim_logs(args.out, start_step)
        if resume_dir:
            print(f"resuming from {resume_dir} (step {start_step} of {total})")

    from tqdm import tqdm
    # rank 0 only, and only on a terminal (disable=None): a redirected log gets no bar lines
    bar = tqdm(range(start_step, total), initial=start_step, total=total,
               disable=True if rank else None, desc=f"{args.algo} x{world}", unit="step",
               dynamic_ncols=True)
    k = args.group_size if args.algo == "grpo" else 1
    stop, stopped = checkpoint.StopRequest(), False
    for step in bar:
        checkpoint.inject_fault(args, "step", step + 1, rank)
        stage, batch = plan[step]
        t0 = time.time()
        ims = [None if rank == args.text_only_rank else images(r) for r in batch]
        questions = [r["question"] for r in batch]
        if args.algo == "sft":
            rollout = teacher_rollout(processor, questions, ims, [data_mod.gold_answer(r) for r in batch])
        else:
            if args.fsdp and any(im is None for im in ims):
                raise RuntimeError("--fsdp needs every question to have an image (a vision tower "
                                   "unused on one rank would skip its all-gather there only)")
            with gathered(policy, args), autocast(args, device):
                rollout = model_mod.generate(policy, processor, questions, ims, num_samples=k,
                                             max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature)
        t1 = time.time()
        scores = score(rollout.texts, batch, k, args)
        for s, n, tr in zip(scores, rollout.lengths, rollout.truncated):
            s["length"], s["truncated"] = n, float(tr)
        rewards = torch.tensor([s["total"] for s in scores], dtype=torch.float32)
        adv = grpo.group_advantages(rewards, k, scale=args.adv_scale) if args.algo == "grpo" \
            else torch.zeros_like(rewards)
        if rank == 0 and args.log_samples:
            log_samples(args, step + 1, stage, batch, rollout, adv, k, data_path)
        t2 = time.time()
        loss, stats = update(wrapped, policy, ref, rollout, adv, args, world, device,
                             nan_now=step + 1 == args.inject_nan_at)
        norm, bad = optimizer_step(opt, params, loss, args, world, device)
        if bad:
            warnings.warn(f"step {step + 1}: non-finite loss/grad-norm ({loss}, {norm}); step skipped")
        t3 = time.time()
        all_scores = [s for part in all_gather(scores, world) for s in part]
        times = {"sample": t1 - t0, "score": t2 - t1, "update": t3 - t2, "step": t3 - t0}
        row = step_metrics(all_scores, step + 1, stage, k, loss, stats, times, world, bad)
        row["grad_norm"] = norm
        if device.startswith("cuda"):   # since the start: load, rollout, update (tools/memplan.py's peak)
            row["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        if rank == 0:
            log_row(args.out, row)
            bar.set_postfix(stage=stage, R=f"{row['reward']:.2f}", fmt=f"{row['format']:.2f}",
                            acc=f"{row['accuracy']:.2f}")
        done = step + 1
        stopped = stop.agreed(world, device) and done < total    # every rank, every step
        if done < total and (stopped or args.save_every and done % args.save_every == 0):
            checkpoint.save_checkpoint(args.out, f"step-{done}", policy, processor, opt, done, args, rank, world)
        if stopped:
            break
    stop.restore()
    if not stopped and not args.no_final:
        checkpoint.save_checkpoint(args.out, "final", policy, processor, opt, max(total, start_step), args, rank,
                        world)
    if world > 1 and not args.fsdp:
        # DDP keeps replicas identical by construction; check it, since a desync is silent.
        digests = all_gather(param_digest(policy), world)
        if rank == 0:
            with open(os.path.join(args.out, "ranks.json"), "w") as f:
                json.dump({"param_sha256": digests}, f)
            if len(set(digests)) > 1:
                warnings.warn(f"parameters differ across ranks: {digests}")
    if rank == 0 and stopped:
        print(f"stopped by {stop.name or 'a signal on another rank'} after step {done} of {total}: "
              f"checkpoint {os.path.join(args.out, f'step-{done}')}\nresume: the same command with "
              f"--resume auto (or --resume {os.path.join(args.out, f'step-{done}')})")
    elif rank == 0:
        where = "not saved (--no-final)" if args.no_final else f"in {os.path.join(args.out, 'final')}"
        print(f"done: {total - start_step} steps, final model {where}")
    del wrapped                      # DDP's reducer goes before the process group
    model_mod.close_distributed()
    if rank == 0:                    # after teardown: nothing here can leave other ranks waiting
        print(f"report: {report.write(os.path.join(args.out, 'report.html'), run=args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
