"""GPU memory of a train.py command, per GPU and phase by phase, planned on a CPU with fake tensors
(no GPU, no weights). Method, validation against real runs, and what fits on 24-141 GB GPUs:
docs/memory.md.

    python tools/memplan.py --config 3b --gpus 8 --gpu-mem 80 --fsdp --bf16 --grad-checkpointing
    python tools/memplan.py --model /models/Qwen2.5-VL-7B-Instruct --gpus 8 --fsdp --bf16 \\
        --grad-checkpointing --data data_real/train.jsonl --max-pixels 12845056 --micro-batch 2
    python tools/memplan.py --config 7b --fsdp --bf16 --grad-checkpointing --table --micro-batch 16
    python tools/memplan.py --check-readme    # every GPU command of README.md and docs/*.md fits (CI)

Every flag this file does not know is train.py's (train.parse_args), so a command is planned
exactly as written, its defaults too (--config or --model PATH: the paper's §5.1 settings).

How (docs/memory.md, "How the plan works"): rank 0 of --gpus ranks runs in this process on torch's
fake process group; the policy and the reference are built from the real 3B/7B config (or --model's
config.json) as FakeTensors (shapes, no data); train.distribute shards or wraps them as train.build
does; a warm-up step creates AdamW's state; then one step of train.py's own functions is traced:
model.shared_prefill and HF generate's last decode step on a full-length KV cache, train.update
(two micro-batches: later ones repeat the second) and train.optimizer_step. MemoryTrace, a
TorchDispatchMode, counts every live tensor storage by category at each phase's peak.

Printed: each phase's peak per GPU and what is live then, whether it fits --gpu-mem less
--headroom, the largest --micro-batch and --max-new-tokens that fit under FSDP2 and DDP (search;
--no-search skips it), host memory per node (host_memory, computed), each map's prompt length at
--max-pixels (maps: --data's figures, else every image under --maps; traced at the largest, or
--image-tokens N); --json: one object. --table: the largest --max-new-tokens per micro-batch for
24-141 GB GPUs, with and without --offload (plan_table).
"""
import argparse
import collections
import dataclasses
import functools
import gc
import glob
import json
import math
import os
import random
import re
import shlex
import sys
import time
import weakref
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from PIL import Image
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, in_kernel_invocation_manager
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import data as data_mod
import model as model_mod
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPS = os.path.join(ROOT, "..", "shared", "reasonmap", "maps")


def parse_args(argv=None):
    """memplan's own options; every other flag is train.py's, parsed by train.parse_args (so a
    README training command is planned exactly as written): args.train."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the model planned (its settings: train.py's flags)
    p.add_argument("--config", choices=sorted(bench.QWEN_SHAPES), default=None,
                   help="the real 3B/7B architecture (instead of --model PATH's config.json)")
    # the GPUs
    p.add_argument("--gpus", type=int, default=8, help="GPUs (world size) to plan for")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU, GB (1e9 B)")
    p.add_argument("--headroom", type=float, default=0.15,
                   help="share of --gpu-mem kept free (allocator, CUDA context, NCCL)")
    # the maps
    p.add_argument("--maps", default=MAPS,
                   help="map images (a folder, searched recursively) when --data is absent")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="a map of N image tokens (w x h cells, as square as N allows) "
                        "instead of the largest map")
    # what is printed
    p.add_argument("--no-search", action="store_true",
                   help="trace the command only, skip the largest settings that fit")
    p.add_argument("--table", action="store_true",
                   help="the largest --max-new-tokens per micro-batch (up to --micro-batch) "
                        "for 24-141 GB GPUs, with and without --offload (traces at 1k-8k tokens)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--check-readme", nargs="?", const=ROOT, default=None, metavar="PATH",
                   help="plan every GPU training command of README.md and docs/*.md under the "
                        "folder PATH (default: this repo; or one markdown file) as written; exit 1 "
                        "if one does not fit --gpu-mem with --headroom")
    args, rest = p.parse_known_args(argv)
    args.train = bench.train_args(args.config, rest)
    if args.gpus < 1:
        p.error("--gpus must be >= 1")
    if args.check_readme:
        return args
    if not (args.config or os.path.isfile(os.path.join(args.train.model, "config.json"))):
        p.error("needs --config 3b|7b, or --model a local Qwen2.5-VL folder (its config.json)")
    if args.train.batch_size % args.gpus:
        p.error(f"--batch-size {args.train.batch_size} is not a multiple of --gpus {args.gpus}")
    return args


# ---------------------------------------------------------------------------------------------
# The trace: every live tensor storage, by category, at each phase's peak.

GB = 1e9
# In a fake trace, a tensor of more than SMALL_BYTES is fake: shape, dtype and strides, no data, no
# memory. Smaller ones made from real inputs stay real, so what the code reads from them (masks,
# token counts: model.select, train.update) is what train.py would read.
SMALL_BYTES = 1 << 24
EMPTY = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
         torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default)
PHASES = ("load", "rollout prefill", "rollout decode", "policy forward", "reference forward",
          "backward", "optimizer")
UPDATE_PHASES = {"policy_fwd": "policy forward", "ref_fwd": "reference forward", "backward": "backward"}
CATEGORIES = ("fp32 master", "weights", "grads", "optimizer", "FSDP all-gathers", "DDP buckets",
              "KV cache", "activations", "log-prob path", "inputs")
# What an allocation is, by the innermost frame of its call stack that matches (file, function);
# weights, grads, optimizer state and the KV cache are recognised by identity instead.
FRAME_CATEGORIES = (
    (os.sep + "distributed" + os.sep + "fsdp" + os.sep, None, "FSDP all-gathers"),
    (os.path.join("nn", "parallel", "distributed.py"), None, "DDP buckets"),
    ("cache_utils.py", None, "KV cache"),
    (os.sep + "optim" + os.sep, None, "optimizer"),
    (os.sep + "transformers" + os.sep, None, "activations"),
    (os.path.join("utils", "checkpoint.py"), None, "activations"),
    (os.sep + "model.py", "select", "inputs"),
    (os.sep + "model.py", None, "activations"),
    (os.sep + "grpo.py", None, "activations"),
    (os.sep + "train.py", None, "activations"),   # loss.backward(): gradients of activations
    (os.sep + "bench.py", None, "inputs"),
    (os.sep + "memplan.py", None, "inputs"),
)


def _storages(t):
    t = getattr(t, "_local_tensor", t)   # a DTensor's shard
    return [t.untyped_storage()] if isinstance(t, torch.Tensor) else []


class MemoryTrace(TorchDispatchMode):
    """Runs every op under it and keeps the bytes of every live tensor storage (a weak reference
    returns them when the storage is freed; FSDP2's storage resizes are followed too): the peak of
    each phase, and what was live at that peak by category (CATEGORIES).

    fake=True: tensors of weights, activations, logits and caches are FakeTensors (torch's
    FakeTensorMode: shapes, dtypes and strides, no data). Integer and small tensors (token ids,
    masks, image grids, positions, window indices) stay real, so the data-dependent index code of
    HF's Qwen2.5-VL (M-RoPE positions, vision windows, placeholder masks) runs as on a GPU; integers
    and booleans computed from fake data (a sampled token, a comparison) become real zeros; a
    Python number read from fake data (.item() of a loss statistic) is 0, counted in `reads`.
    fake=False: every tensor real, the same accounting (the fake trace's validation)."""

    def __init__(self, fake=True, vocab=None):
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        self.vocab = vocab
        self.identify = lambda: []          # -> [(category, tensors)], asked at each snapshot
        self.weight_storages = set()       # fp32 weights, whose autocast copies are "weights"
        self.live, self.refs = {}, {}      # id(storage) -> [bytes, category]; its weak reference
        self.now, self.stack, self.override = 0, [], []
        self.peaks, self.snaps, self.snap_at = {}, {}, {}
        self.by_category, self.max_by_category = collections.Counter(), collections.Counter()
        self.reads = collections.Counter()
        self.layouts, self.functional = {}, {}

    def reset(self):
        self.peaks, self.snaps, self.snap_at = {}, {}, {}
        self.max_by_category = collections.Counter(self.by_category)
        self.reads.clear()

    @contextmanager
    def phase(self, name, category=None):
        """Follow the peak of phase `name` while inside; new storages are `category` if given."""
        gc.collect()   # storages held only by reference cycles go now, not at a random later time
        self.stack.append(name)
        self.override.append(category)
        if self.now > self.peaks.get(name, -1):
            self._record(name)
        try:
            yield
        finally:
            self.stack.pop()
            self.override.pop()

    def snapshot(self):
        known = {}
        for category, tensors in self.identify():
            for t in tensors:
                for st in _storages(t):
                    known.setdefault(id(st), category)
        out = collections.Counter()
        for key, (n, category) in self.live.items():
            if category != "host":
                out[known.get(key, category)] += n
        return out

    def track(self, tensors, category="inputs"):
        for t in tensors:
            for st in _storages(t):
                self._new(st, category)

    # -- accounting --------------------------------------------------------------------------
    def _record(self, name):
        self.peaks[name] = self.now
        if self.now > self.snap_at.get(name, -1) * 1.002:   # what is live, to within 0.2 %
            self.snap_at[name] = self.now
            self.snaps[name] = self.snapshot()

    def _change(self, n, category):
        self.by_category[category] += n
        self.max_by_category[category] = max(self.max_by_category[category], self.by_category[category])
        if category == "host":   # host memory (FSDP2 loads there): not on the GPU
            return
        self.now += n
        for name in self.stack:
            if self.now > self.peaks[name]:
                self._record(name)

    def _new(self, st, category):
        key = id(st)
        if key not in self.live:
            self.refs[key] = weakref.ref(st, functools.partial(self._free, key))
            self.live[key] = [st.nbytes(), category]
            self._change(st.nbytes(), category)

    def _free(self, key, _ref):
        n, category = self.live.pop(key)
        del self.refs[key]
        self._change(-n, category)

    def _resized(self, st):
        entry = self.live.get(id(st))
        if entry is not None:
            n, entry[0] = entry[0], st.nbytes()
            self._change(entry[0] - n, entry[1])

    def _category(self, func, args, t):
        if self.override and self.override[-1]:
            return self.override[-1]
        if self.vocab and t.dim() >= 2 and t.shape[-1] == self.vocab:
            return "log-prob path"     # logits, log-softmax and their gradients
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) \
                and id(args[0].untyped_storage()) in self.weight_storages:
            return "weights"           # autocast's bf16 copy of an fp32 weight
        f = sys._getframe(2)
        while f is not None:
            for part, function, category in FRAME_CATEGORIES:
                if part in f.f_code.co_filename and function in (None, f.f_code.co_name):
                    return category
            f = f.f_back
        return "inputs"

    # -- dispatch ----------------------------------------------------------------------------
    def __enter__(self):
        resize, trace = torch.UntypedStorage.resize_, self
        self._resize = resize

        def resize_(st, size):   # FSDP2 frees and re-allocates gathered weights this way
            resize(st, size)
            trace._resized(st)
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented      # DTensor runs its local ops, which come back here
        if func is torch.ops.prim.device.default:   # asked of every fake tensor by C++
            return args[0].fake_device if isinstance(args[0], FakeTensor) else args[0].device
        if active_fake_mode() is not None:   # DTensor's own fake shape inference: not memory
            return func(*args, **kwargs)
        out = func(*args, **kwargs) if self.fake is None else self._run(func, args, kwargs)
        if func in EMPTY and not isinstance(out, FakeTensor):
            # zeros, not garbage: the fake process group leaves collective outputs unwritten, and
            # a NaN there would make train.optimizer_step skip its step in one trace, not another
            out.zero_()
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":   # DTensor's shape inference
                st = t.untyped_storage()
                if id(st) not in self.live:
                    self._new(st, self._category(func, args, t))
        return out

    def _run(self, func, args, kwargs):
        flat = pytree.arg_tree_leaves(*args, **kwargs)
        if not any(isinstance(t, FakeTensor) for t in flat):
            # real inputs: real compute, unless the result is big (then it is fake: shapes only)
            writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
            if not writes:
                try:
                    with self.fake:
                        probe = func(*args, **kwargs)
                    if any(t.numel() * t.element_size() > SMALL_BYTES
                           for t in pytree.tree_leaves(probe) if isinstance(t, torch.Tensor)):
                        return probe
                except Exception:   # no fake kernel (data-dependent output): real inputs run real
                    pass
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            f = sys._getframe(1)
            while f is not None and (os.sep + "torch" + os.sep in f.f_code.co_filename
                                     or f.f_code.co_filename == __file__):
                f = f.f_back
            self.reads[f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}" if f else "?"] += 1
            return 0.0 if args[0].is_floating_point() else 0
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                    torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default):
            # a real boolean mask indexes like its nonzero() positions, whose number is known
            args = (args[0], [j for i in args[1] for j in
                              (i.nonzero().unbind(1) if isinstance(i, torch.Tensor) and i.dtype == torch.bool
                               and not isinstance(i, FakeTensor) else [i])], *args[2:])
        out = self._fake(func, args, kwargs, flat)
        # a real tensor written from fake data (FSDP2 copying a fake all-gather into a small
        # weight) holds zeros, not the garbage of a storage that was only resized
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                value = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
                for t in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor):
                        t.zero_()
        if isinstance(out, torch.Tensor) and not out.is_floating_point() and not out.is_complex() \
                and not func._schema.returns[0].alias_info and out.numel() * out.element_size() <= SMALL_BYTES:
            return torch.zeros(out.shape, dtype=out.dtype)   # control flow on it can run
        return out

    def _fake(self, func, args, kwargs, flat):
        """func under FakeTensorMode. A functional op (writes and aliases nothing) gives outputs
        whose layout follows from its inputs' shapes, strides and dtypes: keyed on those, a repeat
        is answered with empty fake tensors of the recorded layout (FakeTensorMode's own cache
        misses on views at new offsets, e.g. the vision tower's per-window attention)."""
        if torch.Tag.view_copy not in func.tags and func.is_view and all(
                isinstance(t, FakeTensor) for t in flat if isinstance(t, torch.Tensor)):
            # a view of fake tensors: the meta kernel on them, wrapped as FakeTensorMode would
            with in_kernel_invocation_manager(self.fake):
                out = func(*args, **kwargs)
            device = next(t for t in flat if isinstance(t, FakeTensor)).fake_device
            wrap = self.fake.fake_tensor_converter.from_meta_and_device
            return pytree.tree_map_only(torch.Tensor, lambda t: wrap(self.fake, t, device), out)
        functional = self.functional.get(func)
        if functional is None:
            schema = func._schema
            # aten's schemas declare every alias; custom ops' (FSDP2's copy-in) may not
            functional = self.functional[func] = func.namespace == "aten" \
                and all(a.alias_info is None for a in [*schema.arguments, *schema.returns])
        key = None
        if functional:
            key = (func, *((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                           for a in flat))
            try:
                layout = self.layouts.get(key)
            except TypeError:   # an unhashable argument
                key = layout = None
            if layout is not None:
                spec, metas = layout
                make = self.fake.fake_tensor_converter.from_meta_and_device
                leaves = [make(self.fake, torch.empty_strided(m[0], m[1], dtype=m[2], device="meta"), m[3])
                          if isinstance(m, tuple) else m for m in metas]
                return pytree.tree_unflatten(leaves, spec)
        with self.fake:
            out = func(*args, **kwargs)
        if key is not None:
            leaves, spec = pytree.tree_flatten(out)
            self.layouts[key] = (spec, [(t.shape, t.stride(), t.dtype, t.device)
                                        if isinstance(t, torch.Tensor) else t for t in leaves])
        return out


# ---------------------------------------------------------------------------------------------
# The planned run: rank 0 of a train.py run, built on a fake process group.

def plan_shapes(args):
    """QWEN_SHAPES-like dict of --config, or of --model's config.json (no weights read)."""
    if args.config:
        return dict(bench.QWEN_SHAPES[args.config], name=f"Qwen2.5-VL-{args.config.upper()}")
    with open(os.path.join(args.train.model, "config.json")) as f:
        cfg = json.load(f)
    text, vision = cfg.get("text_config", cfg), cfg["vision_config"]
    shapes = {key: text[key] for key in ("vocab_size", "hidden_size", "intermediate_size",
                                         "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    return dict(shapes, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                vision_out=vision.get("out_hidden_size", shapes["hidden_size"]),
                vision={key: vision[key] for key in bench.QWEN_VISION if key in vision},
                name=os.path.basename(os.path.normpath(args.train.model)))


def _plan_question():
    """The longest question the data makes (a long-template route question), for the prompt."""
    metro, _ = data_mod.synth_city(random.Random("plan"), "hard")
    recs = data_mod.make_questions(metro, city="Plan", country="x", difficulty="hard",
                                   figure="map.png", rng=random.Random(0), per_type=4)
    return max((r["question"] for r in recs), key=len)


class PlannedRun:
    """Rank 0 of a `gpus`-GPU run of train.py, built in one process on a fake process group:
    train.distribute shards or wraps the models exactly as train.build does; a warm-up step
    (train.update + train.optimizer_step on a one-token batch) creates AdamW's state and lets DDP
    rebuild its buckets, as every later step finds them. trial() then traces one step."""

    def __init__(self, shapes, targs, gpus, fake=True):
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
        self.targs, self.gpus = targs, gpus
        self.trace = trace = MemoryTrace(fake=fake, vocab=shapes["vocab_size"])
        self.cache = self.policy = self.ref = self.opt = None
        self.params = []
        trace.identify = self._identify
        shapes = {key: v for key, v in shapes.items() if key != "name"}
        with trace, trace.phase("load"):
            # as train.build: the fp32 policy and the reference (bf16 under --bf16) go to the GPU
            # whole (model.load), or under FSDP2 stay on the host until sharded
            with trace.phase("load", category="host" if targs.fsdp else "weights"):
                self.policy, self.processor = bench.build_qwen_shaped(shapes, dtype=torch.float32)
                if targs.kl > 0 and targs.algo == "grpo":
                    dtype = torch.bfloat16 if targs.bf16 else torch.float32
                    self.ref = bench.build_qwen_shaped(shapes, dtype=dtype)[0]
            # FSDP2 moves a unit's whole weights to the GPU, then shards them: the largest unit's
            # visit (computed; on one CPU device there is no move to trace)
            self.unit_bytes = max(_own_bytes(train.fsdp_units(self.policy))) if targs.fsdp else 0
            model_mod.set_max_pixels(self.processor, targs.max_pixels)
            self.wrapped = train.distribute(self.policy, self.ref, self.processor, targs, "cpu", gpus)
        snap = trace.snaps["load"] + collections.Counter({"fp32 master": self.unit_bytes})
        self.loaded = (trace.peaks["load"] + self.unit_bytes, snap)
        if hasattr(self.wrapped, "register_comm_hook"):
            # the fake process group's all-reduce leaves DDP no result: complete it in place
            self.wrapped.register_comm_hook(None, _done_in_place)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=targs.lr, weight_decay=targs.weight_decay,
                                     betas=(0.9, 0.999))
        trace.weight_storages = {id(st) for p in self.params for st in _storages(p)}
        self.question = _plan_question()
        warm_up = self._rollout_for_update(self._encode((56, 56)), 1, targs.group_size)
        with trace:
            self._update(*warm_up)
        trace.reset()

    def _identify(self):
        params = self.params or (list(self.policy.parameters()) if self.policy is not None else [])
        out = [("fp32 master", params), ("grads", [p.grad for p in params]),
               ("optimizer", [v for s in self.opt.state.values() for v in s.values()] if self.opt else [])]
        if self.ref is not None:
            out.append(("weights", list(self.ref.parameters())))
        if self.cache is not None:
            out.append(("KV cache", [t for layer in self.cache.layers for t in (layer.keys, layer.values)]))
        return [(category, [t for t in ts if isinstance(t, torch.Tensor)]) for category, ts in out]

    def _encode(self, image_size):
        """model.encode of this rank's questions, each with a blank map of image_size (w, h)."""
        n = self.targs.batch_size // self.gpus
        enc, has_image = model_mod.encode(self.processor, [self.question] * n,
                                          [Image.new("RGB", image_size, "white")] * n)
        return enc, has_image

    def _rollout_for_update(self, encoded, T, rows):
        """The Rollout train.update gets: `rows` samples that run to T tokens (the worst case:
        no end-of-turn), but one that ends a token early, so the batch is padded as a real one.
        Built outside the trace, so its ids and masks are real whatever their size (inside it, a
        large float tensor would come out fake, and the reads of it that train.update makes, as
        train.py does, in model.select and for the token count, would answer 0); _update makes
        the pixels fake and counts the rest as inputs."""
        (enc, has_image), k = encoded, self.targs.group_size
        pixels = torch.empty(enc["pixel_values"].shape, device="meta")   # the shape only
        rep = lambda t: t.repeat_interleave(k, dim=0)[:rows]
        completion = torch.full((rows, T), 100, dtype=torch.long)   # an ordinary token
        mask = torch.ones(rows, T)
        mask[-1, -1] = 0.0
        ro = model_mod.Rollout(
            texts=[""] * rows, truncated=[True] * rows, lengths=[T] * rows, num_samples=k,
            input_ids=torch.cat([rep(enc["input_ids"]), completion], 1),
            attention_mask=torch.cat([rep(enc["attention_mask"]), mask.long()], 1),
            mm_token_type_ids=torch.cat([rep(enc["mm_token_type_ids"]), torch.zeros_like(completion)], 1),
            completion_mask=mask, prompt_len=enc["input_ids"].shape[1], pixel_values=pixels,
            image_grid_thw=enc["image_grid_thw"], has_image=has_image,
            suppress_ids=model_mod._special_ids(self.processor, model_mod.VISION_TOKENS))
        return ro, torch.zeros(rows)

    def _update(self, rollout, advantages):
        """train.update and train.optimizer_step, inside the trace (see _rollout_for_update)."""
        rollout = dataclasses.replace(rollout, pixel_values=torch.zeros(rollout.pixel_values.shape))
        self.trace.track([rollout.input_ids, rollout.attention_mask, rollout.mm_token_type_ids,
                          rollout.completion_mask, rollout.pixel_values])
        phase = lambda name: self.trace.phase(UPDATE_PHASES[name])
        loss, _ = train.update(self.wrapped, self.policy, self.ref, rollout, advantages, self.targs,
                               self.gpus, "cpu", phase=phase)
        with self.trace.phase("optimizer"):
            train.optimizer_step(self.opt, self.params, loss, self.targs, self.gpus, "cpu")

    def rollout(self, encoded, T):
        """train.py's rollout, traced where its memory peaks: model.shared_prefill (the vision
        tower and the prompt prefill, the KV cache repeated K times) and HF generate's last decode
        step, run by net.generate itself on a KV cache grown to P+T-2 tokens by DynamicCache.update
        (what each earlier decode step adds). Not traced: the T-1 decode steps before the last,
        which hold less (a shorter cache, the same [B*K, 1] activations)."""
        (enc, _), k, targs = encoded, self.targs.group_size, self.targs
        net = self.policy
        with train.gathered(self.policy, targs), train.autocast(targs, "cpu"), torch.no_grad():
            enc = dict(enc, pixel_values=torch.zeros(enc["pixel_values"].shape))
            self.trace.track(enc.values())
            net.eval()
            try:
                with self.trace.phase("rollout prefill"):
                    self.cache, rows = model_mod.shared_prefill(net, enc, k)
                with self.trace.phase("rollout decode"):
                    for i, layer in enumerate(self.cache.layers):
                        shape = (*layer.keys.shape[:2], T - 1, layer.keys.shape[3])
                        self.cache.update(torch.zeros(shape, dtype=layer.keys.dtype),
                                          torch.zeros(shape, dtype=layer.values.dtype), i)
                    grown = torch.full((rows["input_ids"].shape[0], T - 1), 100, dtype=torch.long)
                    rows = {"input_ids": torch.cat([rows["input_ids"], grown], 1),
                            "attention_mask": torch.cat([rows["attention_mask"], torch.ones_like(grown)], 1),
                            "mm_token_type_ids": torch.cat([rows["mm_token_type_ids"],
                                                            torch.zeros_like(grown)], 1)}
                    gen = model_mod.sampling_config(self.processor, num_samples=1, max_new_tokens=1,
                                                    temperature=targs.temperature)
                    net.generate(**rows, cache=self.cache, generation_config=gen)
            finally:
                self.cache = None
                net.train()

    def trial(self, T, micro_batch, image_size, rollout=True):
        """Trace one step at T new tokens and micro-batch `micro_batch`, every question with a
        map of image_size: {phase: (peak bytes, bytes by category at that peak)}. The update runs
        two micro-batches when there are more: every later one repeats the second's shapes and
        allocations (the gradients exist from the first on)."""
        self.targs.micro_batch = micro_batch
        self.trace.reset()
        encoded = self._encode(image_size)
        n = self.targs.batch_size // self.gpus * self.targs.group_size
        for_update = self._rollout_for_update(encoded, T, min(n, 2 * micro_batch))
        with self.trace:
            if rollout:
                self.rollout(encoded, T)
            self._update(*for_update)
        peaks = dict(self.trace.peaks, load=self.loaded[0])
        snaps = dict(self.trace.snaps, load=self.loaded[1])
        return {name: (peaks[name], snaps[name]) for name in PHASES if name in peaks}

    def close(self):
        dist.destroy_process_group()


def _own_bytes(units):
    """Bytes of each unit's parameters that no earlier unit holds."""
    seen = set()
    for unit in units:
        own = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        yield sum(p.numel() * p.element_size() for p in own)


def _done_in_place(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def plan_maps(args, processor):
    """[(path, (w, h) of the file, image tokens)] of the maps the run admits: the figures of --data
    when that file exists, else every image under --maps. Tokens follow data.load_image
    (scaled_size at --max-pixels) and the processor's own count."""
    targs, ip = args.train, processor.image_processor
    if targs.data and os.path.isfile(targs.data):
        paths = sorted({data_mod.figure_path(r, targs.data) for r in data_mod.load_records(targs.data)
                        if r.get("figure")})
    else:
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(args.maps) for f in files
                       if f.lower().endswith((".png", ".jpg", ".jpeg")))
    out = []
    for path in paths:
        w, h = data_mod.image_size(path)
        sw, sh = data_mod.scaled_size(w, h, targs.max_pixels) if targs.max_pixels else (w, h)
        out.append((path, (w, h), (sw, sh), ip.get_number_of_image_patches(sh, sw, {}) // ip.merge_size ** 2))
    return out


def _peak(result, phases=PHASES):
    return max(result[name][0] for name in phases if name in result)


def _fit_quadratic(points):
    """Coefficients (a, b, c) of a*T^2 + b*T + c through three (T, bytes) points."""
    (x1, y1), (x2, y2), (x3, y3) = points
    a = ((y3 - y1) / (x3 - x1) - (y2 - y1) / (x2 - x1)) / (x3 - x2)
    b = (y2 - y1) / (x2 - x1) - a * (x1 + x2)
    return a, b, y1 - a * x1 * x1 - b * x1


def search(run, result, T, micro_batch, image_size, budget, offload, step=256, cap=32768):
    """Largest --micro-batch at T, and largest --max-new-tokens at micro_batch, that fit budget.
    Micro-batches: divisors and multiples of K, each traced (update only: the rollout does not
    depend on it). New tokens: every phase's peak is a quadratic in T (sizes grow with the
    sequence, the attention mask with its square), fitted through three traces and then checked
    by a trace at the predicted value, stepping down until one fits."""
    targs, k = run.targs, run.targs.group_size
    peak = lambda r, phases=PHASES: _peak(_gpu(r, offload), phases)
    rows = targs.batch_size // run.gpus * k
    floor = peak(result, ("optimizer",))
    out = {"micro_batch": None, "max_new_tokens": None}
    if floor > budget:   # weights, gradients and AdamW state alone do not fit
        return out
    rollout_peak = peak(result, ("rollout prefill", "rollout decode"))
    candidates = sorted({m for m in range(1, rows + 1) if m % k == 0 or k % m == 0}, reverse=True)
    if rollout_peak <= budget:
        for m in candidates:
            r = result if m == micro_batch else run.trial(T, m, image_size, rollout=False)
            if peak(r) <= budget:
                out["micro_batch"] = m
                break
    points = {T: result}
    for t in (max(64, T // 2), max(32, T // 4)):
        if t not in points:
            points[t] = run.trial(t, micro_batch, image_size)
    fits = [t for t, r in points.items() if peak(r) <= budget]
    best = max(fits) if fits else None
    for _ in range(4):
        xs = sorted(points, key=lambda t: abs(t - (best or 0)))[:3]
        if len(xs) < 3:
            break
        fitted = {name: _fit_quadratic([(t, _gpu(points[t], offload)[name][0]) for t in xs])
                  for name in points[xs[0]]}
        guess = next((t for t in range(cap, step - 1, -step)
                      if all(a * t * t + b * t + c <= budget for a, b, c in fitted.values())), None)
        if guess is None or (best is not None and guess <= best):
            break
        points[guess] = run.trial(guess, micro_batch, image_size)
        if peak(points[guess]) <= budget:
            best = guess
            break
    out["max_new_tokens"] = best
    return out


def _gpu(result, offload):
    """Phase peaks on the GPU: with --offload, the fp32 shards, their gradients and AdamW state
    live in host memory, so they come off each phase's peak (an estimate: the trace runs without
    FSDP2's offload policy, whose pinned host memory needs CUDA)."""
    if not offload:
        return result
    host = ("fp32 master", "grads", "optimizer")
    return {name: (n - sum(snap[c] for c in host), collections.Counter(
        {c: v for c, v in snap.items() if c not in host})) for name, (n, snap) in result.items()}


def host_memory(shapes_params, args):
    """Host RAM per node (computed, not traced), in bytes: at load every rank holds its fp32 policy
    on the host before moving it to its GPU (model.load); a checkpoint gathers the fp32 model on
    rank 0 and every rank saves its AdamW shard; --offload keeps fp32 shards, gradients
    and AdamW state in host memory for good."""
    per_node = min(args.gpus, 8)
    p4 = shapes_params * 4
    out = {"load": per_node * p4, "checkpoint": p4 + 2 * p4 * per_node / args.gpus}
    if args.train.offload:
        out["offload"] = 4 * p4 * per_node / args.gpus
    return out


GPU_SIZES = (24, 40, 48, 80, 141)
TABLE_T = (1024, 2048, 4096, 8192)


def plan_table(run, image_size, headroom, step=256):
    """{micro-batch up to --micro-batch: {"offload"|"no offload": {GB: the largest --max-new-tokens
    that fits, TABLE_T[-1] meaning at least that, None: not even `step`}}}. Traced at TABLE_T
    (the rollout once per T: it does not depend on the micro-batch); between those points each
    phase's peak is the quadratic through the three nearest traced ones (sizes grow with the
    sequence, the attention mask with its square)."""
    k, rows = run.targs.group_size, run.targs.batch_size // run.gpus * run.targs.group_size
    table, rollout = {}, {}
    for m in sorted(m for m in range(1, min(rows, run.targs.micro_batch) + 1) if m % k == 0 or k % m == 0):
        traced = {}
        for t in TABLE_T:
            traced[t] = run.trial(t, m, image_size, rollout=t not in rollout)
            rollout.setdefault(t, {n: v for n, v in traced[t].items() if n.startswith("rollout")})
            traced[t].update(rollout[t])
        table[m] = {}
        for offload in (False, True):
            gpu = {t: _gpu(r, offload) for t, r in traced.items()}

            def peak(t):
                near = sorted(gpu, key=lambda x: abs(x - t))[:3]
                return max(a * t * t + b * t + c for a, b, c in (
                    _fit_quadratic([(x, gpu[x][name][0]) for x in near]) for name in gpu[near[0]]))
            table[m]["offload" if offload else "no offload"] = {
                size: next((t for t in range(TABLE_T[-1], step - 1, -step)
                            if peak(t) <= size * (1 - headroom) * GB), None) for size in GPU_SIZES}
    return table


# ---------------------------------------------------------------------------------------------
# The plan of a command, as printed; the commands of the README and docs/.

def plan_main(args):
    """python tools/memplan.py ...: trace train.py's step for the command, print the table (or
    --json) and the largest settings that fit."""
    targs, shapes = args.train, plan_shapes(args)
    if not targs.grad_checkpointing or not targs.bf16:
        print("note: the README's GPU commands use --bf16 --grad-checkpointing", file=sys.stderr)
    start = time.time()
    budget = args.gpu_mem * (1 - args.headroom) * GB
    _, processor = model_mod.build_tiny()
    model_mod.set_max_pixels(processor, targs.max_pixels)
    maps = plan_maps(args, processor)
    if args.image_tokens:   # w x h cells of 28x28 px, w*h = N and as square as N allows
        n = args.image_tokens
        w = max((d for d in range(1, math.isqrt(n) + 1) if n % d == 0 and n // d <= 4 * d), default=0)
        w, h = (w, n // w) if w else (math.isqrt(n), math.isqrt(n))
        image_size, where = (w * 28, h * 28), f"a {w * 28}x{h * 28} px map"
        targs.max_pixels = max(targs.max_pixels or 0, w * h * 28 * 28)
    elif maps:
        path, _, image_size, _ = max(maps, key=lambda m: m[3])
        where = f"the largest map, {os.path.relpath(path)}"
    else:   # no maps at hand: the most image tokens the budget admits (sides within 1:2)
        cells = (targs.max_pixels or data_mod.PAPER_MAX_PIXELS) // (28 * 28)
        w = max(range(max(1, math.isqrt(cells // 2)), math.isqrt(cells) + 1), key=lambda w: w * (cells // w))
        image_size = (w * 28, cells // w * 28)
        where = f"a {image_size[0]}x{image_size[1]} px map (no maps under {args.maps})"
    mode = "fsdp" if targs.fsdp else ("ddp" if args.gpus > 1 else "single")
    report = {"config": shapes["name"], "gpus": args.gpus, "mode": mode, "gpu_mem_gb": args.gpu_mem,
              "budget_gb": round(budget / GB, 2), "planned_at": where,
              "settings": {key: getattr(targs, key) for key in (
                  "batch_size", "group_size", "micro_batch", "max_new_tokens", "max_pixels", "kl",
                  "bf16", "fsdp", "offload", "grad_checkpointing", "freeze_vision")}}
    modes = [mode] if args.no_search or args.table else \
        [mode] + [m for m in ("fsdp", "ddp") if m != mode and args.gpus > 1]
    for m in modes:
        # --offload is traced without FSDP2's offload policy (pinned host memory needs CUDA) and
        # taken off each phase's peak by _gpu
        margs = argparse.Namespace(**vars(targs))
        margs.fsdp, margs.offload, offload = m == "fsdp", False, targs.offload and m == "fsdp"
        run = PlannedRun(shapes, margs, args.gpus)
        try:
            if m == mode:
                result = run.trial(targs.max_new_tokens, targs.micro_batch, image_size)
                enc, _ = run._encode(image_size)
                gpu = _gpu(result, offload)
                report.update(
                    peak_gb=round(_peak(gpu) / GB, 2),
                    phases={name: round(n / GB, 2) for name, (n, _) in gpu.items()},
                    breakdown={name: {c: round(snap[c] / GB, 2) for c in CATEGORIES if snap[c]}
                               for name, (_, snap) in gpu.items()},
                    logprob_path_gb=round(run.trace.max_by_category["log-prob path"] / GB, 2),
                    prompt_tokens=int(enc["input_ids"].shape[1]),
                    image_tokens=int(enc["image_grid_thw"][0].prod()) // 4,
                    data_dependent_reads=dict(run.trace.reads),
                    parameters=sum(p.numel() for p in run.policy.parameters()))
                report["fits"] = report["peak_gb"] * GB <= budget
                text_tokens = report["prompt_tokens"] - report["image_tokens"]
            if args.table and m == mode:
                report["table"] = plan_table(run, image_size, args.headroom)
            elif not args.no_search:
                report.setdefault("largest_that_fit", {})[m] = search(
                    run, result if m == mode else run.trial(targs.max_new_tokens, targs.micro_batch, image_size),
                    targs.max_new_tokens, targs.micro_batch, image_size, budget, offload)
        finally:
            run.close()
    report["host_gb_per_node"] = {key: round(v / GB, 1) for key, v in host_memory(report["parameters"], args).items()}
    report["maps"] = [{"map": os.path.relpath(p), "size": list(size), "read_at": list(read),
                       "image_tokens": tokens, "prompt_tokens": tokens + text_tokens}
                      for p, size, read, tokens in maps]
    report["seconds"] = round(time.time() - start, 1)
    if args.json:
        print(json.dumps(report))
    else:
        print(plan_text(report))
    return report


def plan_text(r):
    """The plan as a reader wants it: settings, phases, verdict, what fits, host memory, maps."""
    s, gb = r["settings"], lambda n: f"{n:.1f}"
    mode = {"fsdp": "FSDP2", "ddp": "DDP", "single": "one process"}[r["mode"]]
    per_gpu = s["batch_size"] // r["gpus"]
    tokens = sorted(m["image_tokens"] for m in r["maps"])
    lines = [
        f"Memory plan for {r['config']}, {mode} on {r['gpus']} GPUs of {r['gpu_mem_gb']:g} GB "
        f"(train.py's step traced with fake tensors; no GPU involved)",
        f"  per GPU: {per_gpu} questions x K={s['group_size']} samples, micro-batch {s['micro_batch']} "
        f"samples, {s['max_new_tokens']:,} new tokens, KL {'on' if s['kl'] else 'off'}"
        f"{', bf16' if s['bf16'] else ''}{', grad checkpointing' if s['grad_checkpointing'] else ''}"
        f"{', optimizer offload' if s['offload'] else ''}",
        f"  planned at {r['planned_at']}: prompt {r['prompt_tokens']:,} tokens "
        f"({r['image_tokens']:,} image tokens), --max-pixels {s['max_pixels'] or 0:,}",
    ]
    if tokens:
        lines.append(f"  the {len(tokens)} maps at this budget: {tokens[0]:,}-{tokens[-1]:,} image tokens, "
                     f"median {tokens[len(tokens) // 2]:,}")
    lines.append(f"\n{'phase':18s} {'GB':>6s}   live at the phase's peak, GB")
    for name, n in r["phases"].items():
        parts = sorted(r["breakdown"][name].items(), key=lambda kv: -kv[1])
        lines.append(f"{name:18s} {n:6.1f}   " + ", ".join(f"{c} {gb(v)}" for c, v in parts if v >= 0.05))
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines += [
        f"\npeak per GPU {r['peak_gb']:.1f} GB: {verdict} in {r['budget_gb']:.1f} GB "
        f"({r['gpu_mem_gb']:g} GB less {1 - r['budget_gb'] / r['gpu_mem_gb']:.0%} headroom)",
        f"log-prob path (logits and log-softmax, [rows, T, vocab] tensors) at most {r['logprob_path_gb']:.2f} GB",
    ]
    for mode_name, found in r.get("largest_that_fit", {}).items():
        label = {"fsdp": "FSDP2", "ddp": "DDP", "single": "one process"}[mode_name]
        if found["micro_batch"] is None and found["max_new_tokens"] is None:
            lines.append(f"largest that fit, {label}: nothing (not even 32 new tokens at micro-batch "
                         f"{s['micro_batch']})")
            continue
        mb = found["micro_batch"]
        mt = found["max_new_tokens"]
        lines.append(f"largest that fit, {label}: --micro-batch {mb if mb else 'none'} at "
                     f"{s['max_new_tokens']:,} new tokens; --max-new-tokens "
                     f"{f'{mt:,}' if mt else 'none'} at micro-batch {s['micro_batch']}")
    if "table" in r:
        lines.append(f"\nlargest --max-new-tokens that fit with {1 - r['budget_gb'] / r['gpu_mem_gb']:.0%} "
                     f"headroom (traced at {', '.join(f'{t:,}' for t in TABLE_T)}; '-': none):")
        lines.append(f"{'micro-batch':>12s} {'':10s}" + "".join(f"{size:>8d} GB" for size in GPU_SIZES))
        for m, by in r["table"].items():
            for label, row in by.items():
                lines.append(f"{m:>12} {label:10s}" + "".join(
                    f"{'-' if row[size] is None else ('>=' if row[size] == TABLE_T[-1] else '') + f'{row[size]:,}':>11}"
                    for size in GPU_SIZES))
    lines.append("host memory per node (computed, not traced): " + ", ".join(
        f"{key} {v:,.0f} GB" for key, v in r["host_gb_per_node"].items()))
    if r["data_dependent_reads"]:
        lines.append("values read from fake tensors (answered 0; statistics, not control flow): " +
                     ", ".join(f"{k} x{v}" for k, v in r["data_dependent_reads"].items()))
    if r["maps"]:
        lines.append("\nmaps (file size -> size read at --max-pixels): image tokens, prompt tokens")
        for m in r["maps"]:
            lines.append(f"  {m['map']:50s} {m['size'][0]}x{m['size'][1]} -> {m['read_at'][0]}x"
                         f"{m['read_at'][1]}: {m['image_tokens']:,}, {m['prompt_tokens']:,}")
    lines.append(f"({r['seconds']:.0f} s)")
    return "\n".join(lines)


READMEOUT = ("--out", "--save-every", "--resume", "--log-samples", "--seed")


def readme_commands(path):
    """(gpus, config, train.py argv) of every `torchrun ... train.py --model .../Qwen2.5-VL-<N>B...`
    command in a markdown file (continuation lines joined, comments dropped). A command is a line
    whose first word is torchrun (after VAR=value assignments): prose and tables that name
    torchrun and train.py are not commands."""
    with open(path, encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        try:
            words = shlex.split(line.split("#")[0]) if "torchrun" in line and "train.py" in line else []
        except ValueError:   # unbalanced quotes: prose, not a command
            continue
        start = words.index("torchrun") if "torchrun" in words else -1
        if start < 0 or not all(re.match(r"\w+=", w) for w in words[:start]) \
                or "train.py" not in words or "--model" not in words:
            continue
        words = words[start:]
        size = re.search(r"(\d+)B", words[words.index("--model") + 1])
        launcher = words[:words.index("train.py")]
        gpus = _torchrun_int(launcher, "--nproc_per_node") * _torchrun_int(launcher, "--nnodes")
        if size:
            out.append((gpus, f"{size.group(1)}b".lower(), words[words.index("train.py") + 1:]))
    return out


def _torchrun_int(words, flag):
    """torchrun's `flag N` or `flag=N` (an elastic `MIN:MAX` counts as MAX), else 1."""
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return int(words[i + 1].split(":")[-1])
        if w.startswith(flag + "="):
            return int(w.split("=", 1)[1].split(":")[-1])
    return 1


def doc_commands(path):
    """[(gpus, config, train.py argv, [files])]: every GPU training command of README.md and
    docs/*.md under the folder `path` (or of the one file `path`), each once, in the order found,
    with the files it appears in. Output, checkpoint and log flags (READMEOUT) change nothing in
    memory, nor does a --data file that is not there (the maps under --maps are planned, as for
    every such command): commands that differ only in those are one."""
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files = [path] if os.path.isfile(path) else \
        [os.path.join(path, "README.md")] + sorted(glob.glob(os.path.join(path, "docs", "*.md")))
    found = {}
    for f in files:
        if not os.path.isfile(f):
            continue
        for gpus, config, argv in readme_commands(f):
            key = [w for i, w in enumerate(argv) if not (argv[i - 1:i] and argv[i - 1] in READMEOUT)
                   and w not in READMEOUT]
            if "--data" in key and not os.path.isfile(key[key.index("--data") + 1]):
                del key[key.index("--data"):key.index("--data") + 2]
            entry = found.setdefault((gpus, config, *key), (gpus, config, argv, []))
            name = os.path.relpath(f, root)
            if name not in entry[3]:
                entry[3].append(name)
    return list(found.values())


def check_readme(args):
    """python tools/memplan.py --check-readme: every GPU training command of README.md and
    docs/*.md, planned as written; exit 1 if one does not fit."""
    commands = doc_commands(args.check_readme)
    if not commands:
        raise SystemExit(f"{args.check_readme}: no `torchrun ... train.py --model ...<N>B` command "
                         "in README.md or docs/*.md")
    verdicts = []
    for gpus, config, argv, files in commands:
        print(f"== {', '.join(files)}: train.py {' '.join(argv)} ({gpus} GPUs)", flush=True)
        plan_args = parse_args(["--no-search", "--config", config, "--gpus", str(gpus),
                                "--gpu-mem", str(args.gpu_mem), "--headroom", str(args.headroom),
                                "--maps", args.maps] + argv)
        report = plan_main(plan_args)
        verdicts.append((report["fits"], f"{report['peak_gb']:5.1f} GB of {report['budget_gb']:.1f} "
                                         f"({config}, {gpus} GPUs) {', '.join(files)}: "
                                         f"train.py {' '.join(argv)}"))
        print()
    for fits, line in verdicts:
        print(("fits      " if fits else "TOO LARGE ") + line)
    if not all(fits for fits, _ in verdicts):
        raise SystemExit(1)
    return verdicts


def main(argv=None):
    args = parse_args(argv)
    return check_readme(args) if args.check_readme else plan_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
