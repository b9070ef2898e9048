"""RewardMap training (§4, §5.1): multi-stage GRPO with the difficulty-aware detail reward.

    python train.py                                     # CPU quick start: tiny model, synthetic maps
    torchrun --standalone --nproc_per_node=N train.py --model tiny|PATH --data FILE.jsonl --out DIR
    torchrun ... train.py --model /models/Qwen2.5-VL-7B-Instruct --data train.jsonl --out runs/7b \
        --bf16 --fsdp --grad-checkpointing                # 3B or 7B on 8 GPUs (bench.py --plan)
    python train.py --resume runs/quickstart/step-20 --out runs/quickstart   # continue a run
    torchrun --max-restarts 3 ... train.py ... --save-every 20 --resume auto  # survive crashes and
        # preemption: SIGTERM / Ctrl-C finish the step and write step-N/ (README "Long runs")

One step (a thin composition of model.py, reward.py, grpo.py, curriculum.py):
  1. curriculum.epoch_batches gives this rank its share of the global batch (§4.3 stage order);
  2. model.generate samples K completions per question (each rank samples whole groups, so the
     group-relative advantage needs no cross-rank gather);
  3. reward.compute_reward scores them (§4.2, Alg. 1); grpo.group_advantages centres per group;
  4. model.token_logprobs (teacher-forced) -> grpo.grpo_loss -> backward; DDP averages gradients;
     AdamW step with grad-norm clip 1.0.
One optimiser update per batch (as the release, ppo_epochs 1), so π_θold = π_θ at the update and
old_logp = logp.detach(): the ratio is exactly 1 and no second forward is spent on it. The
surrogate's gradient is still the policy gradient Â·∇log π (grpo.py module note).

Defaults. With a real --model path the paper's §5.1 settings apply (lr 1e-6, KL 1e-3, K=8, 16
questions per global step, α=0.5, curriculum rewardmap, 2048 new tokens, AdamW weight decay 1e-2,
grad clip 1.0, temperature 1.0, one pass over the data). The release's launch script
(scripts/reward_map.sh) differs from the paper: KL 1e-2 (scripts/reward_map.yaml: 5e-3), K=4
(yaml: 8), a micro-batch of one response (so a per-response loss mean, not our token-mean), and
verl's default entropy bonus 1e-3; grpo.py's module notes give each with its file.
With --model tiny (no arguments at all: the README quick start) the CPU settings below apply
instead: a random 1.2 M-parameter model needs a large learning rate, short answers and no KL to
learn anything in minutes.

Outputs in --out: config.json, metrics.jsonl (a line per step), step-N/ every --save-every steps
(and on SIGTERM / SIGINT) and final/ (model + processor via save_pretrained, trainer_state.pt with
optimiser and step, every rank's RNG, manifest.json last; written to a temp dir and renamed),
data/ when the quick start made it, samples.jsonl (--log-samples) and report.html (report.py:
curves, samples, Alg. 1 traces).
"""
import argparse
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

import curriculum
import data as data_mod
import grpo
import model as model_mod
import report
import reward

# §5.1 (and the release for what the paper does not state).
# micro_batch (samples per forward/backward) is ours: the largest that bench.py --plan fits on 80 GB.
PAPER = dict(lr=1e-6, kl=1e-3, group_size=8, batch_size=16, max_new_tokens=2048,
             weight_decay=1e-2, epochs=1, micro_batch=4, max_pixels=data_mod.DEFAULT_MAX_PIXELS, log_samples=0)
# CPU quick start with --model tiny: 8 questions x 8 samples a step, 32 new tokens, lr 3e-3 (a
# random tiny model moves nowhere at 1e-6), no KL (no reference model, no second forward), one
# pass over 6 cities x 16 questions per type (38 steps). A second pass at this lr collapses: the
# model answers \boxed{yes} to everything and every counting group ties. Two groups a step go to
# samples.jsonl, for the report.html the quick start ends with.
# Measured on 2 cores: see the README quick start for its wall time and metrics.
QUICK = dict(lr=3e-3, kl=0.0, group_size=8, batch_size=8, max_new_tokens=32,
             weight_decay=0.0, epochs=1, micro_batch=64, log_samples=2)
QUICK_CITIES = 6
QUICK_PER_TYPE = 16
TYPES = reward.TYPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    p.add_argument("--model", default="tiny", help="'tiny' (built in code) or a local Qwen2.5-VL folder")
    p.add_argument("--data", default=None, help="train JSONL (data.py); default: synthesise into OUT/data")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--synth-cities", type=int, default=QUICK_CITIES, help="cities when synthesising")
    p.add_argument("--synth-per-type", type=int, default=QUICK_PER_TYPE, help="questions per type per city")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image budget in pixels, 28x28 px per image token: maps are read and processed "
                        f"at most this big (default {data_mod.DEFAULT_MAX_PIXELS:,} for a real model; the "
                        f"paper's Qwen2.5-VL processor budget is {data_mod.PAPER_MAX_PIXELS:,}; "
                        "README: what each costs)")
    # algorithm (the paper's ablations)
    p.add_argument("--algo", choices=("grpo", "sft"), default="grpo",
                   help="sft: the SFT baseline on gold answers (Table 1's SFT -> RL comparison)")
    p.add_argument("--curriculum", default="rewardmap", choices=sorted(curriculum.MODES))
    p.add_argument("--alpha", type=float, default=0.5, help="detail reward weight α (§4.2)")
    p.add_argument("--no-detail", action="store_true", help="drop the detail reward (ablation)")
    p.add_argument("--no-difficulty", action="store_true", help="weight 1 for every question (ablation)")
    p.add_argument("--adv-scale", action="store_true",
                   help="divide advantages by the group std (release); cancels the difficulty weight")
    p.add_argument("--kl", type=float, default=None, help="KL coefficient β (0: no reference model)")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--group-size", type=int, default=None, help="K samples per question")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    # optimisation
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=None, help="questions per global step")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="samples per forward/backward in the update (memory knob, same result): a "
                        "divisor or a multiple of --group-size")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many global steps (0: all)")
    p.add_argument("--seed", type=int, default=0)
    # systems
    p.add_argument("--bf16", action="store_true", help="bf16 weights and compute (GPU)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2: shard per decoder layer and vision block (3B and 7B on GPUs)")
    p.add_argument("--offload", action="store_true",
                   help="with --fsdp: fp32 master shards, their gradients and AdamW state in CPU "
                        "memory (FSDP2 CPUOffloadPolicy), for 24-48 GB cards")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--freeze-vision", action="store_true", help="train the language model only")
    # checkpoints and logs
    p.add_argument("--save-every", type=int, default=0, help="write OUT/step-N every N steps")
    p.add_argument("--resume", default=None,
                   help="auto (the newest complete checkpoint in --out, else a fresh start), a step-N/ "
                        "or final/ folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("--log-samples", type=int, default=None, metavar="N",
                   help="write N whole groups a step (rank 0's first) to OUT/samples.jsonl for "
                        "the report (default 0; 2 with --model tiny)")
    # tests only: poison the loss at this step; ask rank R's questions without their image;
    # fail at a known point (inject_fault)
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
# Distributed setup.

def all_gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_sum(x, world, device):
    t = torch.tensor(float(x), device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return float(t)


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
# Model, optimiser, checkpoints.

def build(args, device, world, init_from):
    """(policy, wrapped policy, processor, reference or None)."""
    # fp32 master weights always: at lr 1e-6 a bf16 weight (8-bit mantissa) would not move at all.
    # --bf16 computes in bf16 (autocast under DDP, MixedPrecisionPolicy under FSDP2). FSDP2 loads
    # on the host and fully_shard moves each unit's shard to the GPU: no GPU ever holds a whole
    # fp32 model (bench.py --plan: 7B's load would otherwise be its peak, 50 GB).
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
    bench.py --plan runs this on its own Qwen-shaped models."""
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
        # of a second full copy of them (bench.py --plan)
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


def fsdp_reshard(policy):
    """Register the sharded parameters again: FSDP2's root keeps its gathered copies after a forward,
    and the optimizer and state_dict must see the sharded DTensors."""
    from torch.distributed.fsdp import FSDPModule
    for m in policy.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ---------------------------------------------------------------------------------------------
# Checkpoints. OUT/step-N/ and OUT/final/ hold the model and processor (save_pretrained),
# trainer_state.pt (step, settings, and the optimizer under DDP), rng_rank{R}.pt for every rank, under
# FSDP2 optimizer_rank{R}.pt for every rank, and manifest.json, written last: a checkpoint is
# complete when its manifest lists every file it needs and each has the size written there. Every
# .pt file holds only tensors, numbers, strings, lists, tuples and dicts and is read with
# torch.load(weights_only=True): a checkpoint folder is what people share and download, and a
# crafted pickle would otherwise run whatever it likes at load time.

MANIFEST = "manifest.json"
LOGS = ("metrics.jsonl", "samples.jsonl")         # a line per step, each with a "step" field
# Settings that may change between a run and its resumption without a warning.
RUN_CONTROL = {"resume", "out", "max_steps", "epochs", "save_every", "fault", "inject_nan_at"}


def safe_load(path):
    """torch.load that runs no code from the file, or a ValueError saying why it was refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise ValueError(f"{path}: refused to load: it holds Python objects other than tensors, numbers, "
                         f"strings, lists and dicts, which could run code when unpickled; a checkpoint "
                         f"written by train.py never does. {why}") from None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}   # python: a tuple of ints
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _full_state(policy, opt, args):
    """(full model state dict or None, optimizer state to save). Under FSDP2 every rank takes part in
    gathering the model, one tensor at a time, but only rank 0 keeps it, on its CPU (the other ranks
    get {}): a checkpoint needs one fp32 copy of the model in host memory per job, not one per rank.
    The optimizer state stays sharded: each rank saves its own shard as plain tensors
    (to_local), so a resumed FSDP run needs the same world size."""
    if not args.fsdp:
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    fsdp_reshard(policy)
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    opt_sd = opt.state_dict()
    opt_sd["state"] = {i: {key: v.to_local() if isinstance(v, DTensor) else v for key, v in s.items()}
                       for i, s in opt_sd["state"].items()}
    return full, opt_sd


def _absent(names, world, fsdp):
    """The files a checkpoint of `world` ranks needs that are not among names."""
    need = (["trainer_state.pt", "config.json", "tokenizer_config.json"]
            + [f"rng_rank{r}.pt" for r in range(world)]
            + ([f"optimizer_rank{r}.pt" for r in range(world)] if fsdp else []))
    out = [name for name in need if name not in names]
    if not any(name.startswith("model") and name.endswith(".safetensors") for name in names):
        out.append("model weights (model*.safetensors)")
    return out


def write_manifest(ckpt, step, world, fsdp):
    """The last file of a checkpoint: every file under ckpt with its size."""
    files = {}
    for root, _, names in os.walk(ckpt):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, ckpt)] = os.path.getsize(path)
    manifest = {"step": step, "world_size": world, "fsdp": fsdp, "files": files}
    missing = checkpoint_problems(ckpt, manifest)
    if missing:
        raise RuntimeError(f"{ckpt}: not written completely: {', '.join(missing)}")
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def read_manifest(ckpt):
    with open(os.path.join(ckpt, MANIFEST)) as f:
        return json.load(f)


def checkpoint_problems(ckpt, manifest=None):
    """What an incomplete checkpoint lacks (empty list: complete)."""
    if manifest is None:
        try:
            manifest = read_manifest(ckpt)
        except FileNotFoundError:           # unfinished: name the manifest and what else is absent
            return [f"{MANIFEST} (written last: this checkpoint was never finished)"] + \
                _absent(os.listdir(ckpt), world=1, fsdp=False)
        except ValueError as e:
            return [f"{MANIFEST} (unreadable: {e})"]
    listed = manifest["files"]
    problems = _absent(listed, manifest["world_size"], manifest["fsdp"])
    for name, size in listed.items():
        path = os.path.join(ckpt, name)
        if not os.path.exists(path):
            problems.append(name)
        elif os.path.getsize(path) != size:
            problems.append(f"{name} ({os.path.getsize(path)} bytes, {size} when written)")
    return problems


def save_checkpoint(out_dir, name, policy, processor, opt, step, args, rank, world):
    """OUT/name/ atomically: written to OUT/.name.tmp, manifest last, then renamed. Every rank adds
    its RNG (and under FSDP2 its optimizer shard)."""
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".{name}.tmp")
    model_sd, opt_sd = _full_state(policy, opt, args)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        net = getattr(policy, "module", policy)
        if model_sd is not None:
            net.save_pretrained(tmp, state_dict=model_sd)
            processor.save_pretrained(tmp)
        else:
            model_mod.save(net, processor, tmp)
        torch.save({"optimizer": None if args.fsdp else opt_sd, "step": step, "config": vars(args)},
                   os.path.join(tmp, "trainer_state.pt"))
        inject_fault(args, "save", step, rank)
    if world > 1:
        dist.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if args.fsdp:
        torch.save(opt_sd, os.path.join(tmp, f"optimizer_rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_manifest(tmp, step, world, args.fsdp)
        # Move an older checkpoint of the same name aside first, so a crash at any point leaves
        # a whole checkpoint on disk (the old one under .name.old, or the new one).
        old = os.path.join(out_dir, f".{name}.old")
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def _is_checkpoint_name(name):
    return name == "final" or (name.startswith("step-") and name[5:].isdigit())


def find_checkpoint(path):
    """The checkpoint --resume PATH means: PATH itself when it is one (it must be complete), else the
    newest complete step-N/ or final/ in the run folder PATH (None when there is none; .tmp and .old
    leftovers are never candidates)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {path}: no such folder")
    if _is_checkpoint_name(os.path.basename(os.path.normpath(path))) or any(
            os.path.exists(os.path.join(path, f)) for f in (MANIFEST, "trainer_state.pt")):
        problems = checkpoint_problems(path)
        if problems:
            raise ValueError(f"--resume {path}: incomplete checkpoint, missing: {', '.join(problems)}")
        return path
    done = []
    for name in filter(_is_checkpoint_name, os.listdir(path)):
        ckpt = os.path.join(path, name)
        problems = checkpoint_problems(ckpt)
        if problems:
            warnings.warn(f"skipping {ckpt}: incomplete, missing: {', '.join(problems)}")
        else:
            done.append((read_manifest(ckpt)["step"], name == "final", ckpt))
    return max(done)[2] if done else None


def resume_point(args, rank, world):
    """(checkpoint folder, its trainer state) to continue from, or (None, None) for a fresh start.
    --resume auto: the newest complete checkpoint in --out, if any (so a relaunch by
    `torchrun --max-restarts` continues by itself). Rank 0 decides, so all ranks agree."""
    if not args.resume:
        return None, None
    ckpt, error = None, None
    if rank == 0:
        try:
            ckpt = find_checkpoint(args.out if args.resume == "auto" else args.resume)
            if ckpt is None and args.resume != "auto":
                error = f"--resume {args.resume}: no complete checkpoint there or in its step-N/ final/"
        except (OSError, ValueError) as e:
            error = str(e)
    ckpt, error = all_gather((ckpt, error), world)[0]
    if error:
        raise SystemExit(f"error: {error}")
    if ckpt is None:
        return None, None
    manifest = read_manifest(ckpt)
    if manifest["fsdp"] != args.fsdp or (args.fsdp and manifest["world_size"] != world):
        raise SystemExit(f"error: --resume {ckpt}: written with fsdp={manifest['fsdp']} on "
                         f"{manifest['world_size']} ranks; resume with the same --fsdp setting"
                         + (" and world size (each rank's optimizer shard)" if args.fsdp else ""))
    state = safe_load(os.path.join(ckpt, "trainer_state.pt"))
    changed = sorted(k for k, v in state["config"].items()
                     if k not in RUN_CONTROL and getattr(args, k, v) != v)
    if changed and rank == 0:
        warnings.warn(f"resuming {ckpt} with different settings: "
                      + ", ".join(f"{k} {state['config'][k]!r} -> {getattr(args, k)!r}" for k in changed))
    return ckpt, state


def load_optimizer(opt, state, resume_dir, rank, args):
    if not args.fsdp:
        opt.load_state_dict(state["optimizer"])
        return
    # each rank's own shard, saved as plain tensors: wrap it back into its parameter's DTensor layout
    from torch.distributed.tensor import DTensor
    sd = safe_load(os.path.join(resume_dir, f"optimizer_rank{rank}.pt"))
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, s in sd["state"].items():
        p = params[int(i)]
        for key, v in s.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.to_local().shape:
                s[key] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
    opt.load_state_dict(sd)


def restore_rng(resume_dir, rank):
    path = os.path.join(resume_dir, f"rng_rank{rank}.pt")
    if os.path.exists(path):
        set_rng_state(safe_load(path))
    else:
        warnings.warn(f"{path} missing (more ranks than the run that wrote it): sampling will not repeat")


def trim_logs(out_dir, step):
    """Keep the lines of OUT/metrics.jsonl and OUT/samples.jsonl up to this step (none on a fresh
    start): a resumed run then logs each later step exactly once, whatever an interrupted attempt
    had written past its checkpoint (a line cut short by a kill included)."""
    for name in LOGS:
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        keep = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line.rstrip("\n") + "\n")
                except (ValueError, KeyError, TypeError):
                    pass
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


class StopRequest:
    """SIGTERM and SIGINT (a preemption notice, Ctrl-C) ask the run to stop at the next step boundary.
    The handler only notes the signal; agreed() is a collective at every step boundary, so all ranks
    stop after the same step even when the signal reached only some of them (a rank stopping alone
    would leave the others blocked in the next all-reduce). A second Ctrl-C stops at once; repeated
    SIGTERMs do not (SLURM signals torchrun and the workers, and torchrun forwards it once more)."""

    def __init__(self):
        self.name = None
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}

    def _note(self, signum, frame):
        if self.name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = self.name or signal.Signals(signum).name

    def agreed(self, world, device):
        return all_sum(self.name is not None, world, device) > 0

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def inject_fault(args, where, step, rank):
    """Tests only (--fault KIND:STEP[:RANK], rank 0 by default): fail from inside the run at a known
    point, so fault tests need no sleeps. where="step" (start of STEP): sigterm, or sigkill (only on
    torchrun's first attempt, so the restarted run gets past it). where="save": save-crash raises
    while step-STEP/ is half written (model and trainer state, no RNG files, no manifest)."""
    if not args.fault:
        return
    kind, at, *who = args.fault.split(":")
    if int(at) != step or int(who[0] if who else 0) != rank or (kind == "save-crash") != (where == "save"):
        return
    if kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif kind == "sigkill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "save-crash":
        raise RuntimeError(f"injected crash while writing the step-{step} checkpoint")


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
    of ranks change nothing but memory. phase(name), when given, is a context manager entered
    around "policy_fwd", "ref_fwd" and "backward" (bench.py times them, bench.py --plan follows
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
    next rollout; bench.py --plan). Grads are all-reduced, so a non-finite norm is seen by every rank alike; the
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

    resume_dir, state = resume_point(args, rank, world)
    start_step = state["step"] if resume_dir else 0
    policy, wrapped, processor, ref = build(args, device, world, resume_dir or args.model)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    if resume_dir:
        load_optimizer(opt, state, resume_dir, rank, args)

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
        restore_rng(resume_dir, rank)
    if rank == 0:
        cfg = dict(vars(args), world_size=world, device=device, data_path=data_path,
                   records=len(records), steps=total, start_step=start_step,
                   parameters=sum(p.numel() for p in policy.parameters()),
                   trainable=sum(p.numel() for p in params))
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        trim_logs(args.out, start_step)
        if resume_dir:
            print(f"resuming from {resume_dir} (step {start_step} of {total})")

    from tqdm import tqdm
    # rank 0 only, and only on a terminal (disable=None): a redirected log gets no bar lines
    bar = tqdm(range(start_step, total), initial=start_step, total=total,
               disable=True if rank else None, desc=f"{args.algo} x{world}", unit="step",
               dynamic_ncols=True)
    k = args.group_size if args.algo == "grpo" else 1
    stop, stopped = StopRequest(), False
    for step in bar:
        inject_fault(args, "step", step + 1, rank)
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
        if rank == 0:
            log_row(args.out, row)
            bar.set_postfix(stage=stage, R=f"{row['reward']:.2f}", fmt=f"{row['format']:.2f}",
                            acc=f"{row['accuracy']:.2f}")
        done = step + 1
        stopped = stop.agreed(world, device) and done < total    # every rank, every step
        if done < total and (stopped or args.save_every and done % args.save_every == 0):
            save_checkpoint(args.out, f"step-{done}", policy, processor, opt, done, args, rank, world)
        if stopped:
            break
    stop.restore()
    if not stopped:
        save_checkpoint(args.out, "final", policy, processor, opt, max(total, start_step), args, rank,
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
        print(f"done: {total - start_step} steps, final model in {os.path.join(args.out, 'final')}")
    del wrapped                      # DDP's reducer goes before the process group
    model_mod.close_distributed()
    if rank == 0:                    # after teardown: nothing here can leave other ranks waiting
        print(f"report: {report.write(os.path.join(args.out, 'report.html'), run=args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
