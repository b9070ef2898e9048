"""Checkpoints of a train.py run: save, manifest, find, resume, RNG state, log trimming, and the
stop request (SIGTERM / Ctrl-C finish the step and save), in the manner of nanochat's
checkpoint_manager.py. train.py and bench.py call it; it imports no train.

    python train.py --out runs/x --save-every 20            # OUT/step-20/, step-40/, ..., final/
    python train.py --out runs/x --resume auto              # newest complete checkpoint, else fresh
    python train.py --out runs/x --resume runs/x/step-20    # a checkpoint, or a run folder
    torchrun --max-restarts 3 ... train.py ... --save-every 20 --resume auto   # crashes, preemption

A checkpoint OUT/step-N/ or OUT/final/ holds the model and processor (save_pretrained),
trainer_state.pt (step, settings, and the optimizer under DDP), rng_rank{R}.pt for every rank, under
FSDP2 optimizer_rank{R}.pt for every rank, and manifest.json, written last: a checkpoint is complete
when its manifest lists every file it needs and each has the size written there. It is written to
OUT/.name.tmp and renamed, so a crash at any point leaves a whole checkpoint on disk. Every .pt file
holds only tensors, numbers, strings, lists, tuples and dicts and is read with
torch.load(weights_only=True): a checkpoint folder is what people share and download, and a crafted
pickle would otherwise run whatever it likes at load time. A resumed run trims metrics.jsonl and
samples.jsonl back to its step, so each step is logged once (docs/long-runs.md).
"""
import json
import os
import pickle
import random
import shutil
import signal
import warnings

import torch
import torch.distributed as dist

import model as model_mod

MANIFEST = "manifest.json"
LOGS = ("metrics.jsonl", "samples.jsonl")         # a line per step, each with a "step" field
# Settings that may change between a run and its resumption without a warning.
RUN_CONTROL = {"resume", "out", "max_steps", "epochs", "save_every", "fault", "inject_nan_at"}


# ---------------------------------------------------------------------------------------------
# Collectives (train.py's step uses them too).


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



def fsdp_reshard(policy):
    """Register the sharded parameters again: FSDP2's root keeps its gathered copies after a forward,
    and the optimizer and state_dict must see the sharded DTensors."""
    from torch.distributed.fsdp import FSDPModule
    for m in policy.modules():
        if isinstance(m, FSDPModule):
            m.reshard()



# ---------------------------------------------------------------------------------------------
# Save, find, resume.



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
