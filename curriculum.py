"""Multi-stage curriculum (RewardMap §4.3): which questions train first, and how one epoch is cut
into global batches and shared among DDP ranks. Standard library only (no torch;
the type names come from reward.py, which imports none either).

Used by train.py (`torchrun --nproc_per_node=N train.py ... --curriculum MODE`) through
epoch_batches(); to print the plan a data file gives:

    python curriculum.py DIR/train.jsonl [--mode rewardmap] [--batch-size 16] [--seed 0]

§4.3 orders the RL data from easy, dense-reward tasks to the sparse-reward route planning:
global stages in a fixed order, and a random order inside each stage ("local stochasticity").
The modes (`fine` and `coarse` are the ablations of §5, Table 5; `none` the RL baseline):

    rewardmap  [TorF1, TorF2] -> [Counting2, Counting3] -> [Counting1] -> [planning]   (release order)
    fine       TorF1 -> TorF2 -> Counting3 -> Counting2 -> Counting1 -> planning
    coarse     [all five ReasonMap-Plus types] -> [planning]
    none       one stage holding everything, shuffled
    reverse    rewardmap backwards: planning first

Beyond the paper (docs/deviations.md, "Curriculum"): each stage shuffles with its own seeded RNG,
so every rank computes the same order without communication; epoch e uses seed + e; global
batches are consecutive slices of the order and may straddle a stage boundary (as the release's);
the last partial batch is kept and split among the ranks.
"""
import json
import random
import sys

from reward import PLUS_TYPES, TYPES   # the six question types (§3); reward imports no torch

_REWARDMAP = [["TorF1", "TorF2"], ["Counting2", "Counting3"], ["Counting1"], ["planning"]]
MODES = {
    "rewardmap": _REWARDMAP,
    "fine": [["TorF1"], ["TorF2"], ["Counting3"], ["Counting2"], ["Counting1"], ["planning"]],
    "coarse": [list(PLUS_TYPES), ["planning"]],
    "none": [list(TYPES)],
    "reverse": _REWARDMAP[::-1],
}


def stages(mode):
    """The global stage order of a mode: a list of stages, each a list of question types."""
    if mode not in MODES:
        raise ValueError(f"unknown curriculum mode {mode!r}; expected one of {', '.join(MODES)}")
    return [list(s) for s in MODES[mode]]


def stage_of(record_type, mode):
    """Index (0-based) in stages(mode) of the stage that holds record_type."""
    for k, types in enumerate(stages(mode)):
        if record_type in types:
            return k
    raise ValueError(f"unknown question type {record_type!r}; expected one of {', '.join(TYPES)}")


def stage_label(k, mode):
    """Name of stage k for logs, e.g. '1:TorF1+TorF2' (1-based, numbered over all of the mode's
    stages, so a stage keeps its number when the data lack an earlier one)."""
    return f"{k + 1}:" + "+".join(stages(mode)[k])


def schedule(records, mode="rewardmap", seed=0):
    """The curriculum order of one pass: the records stage by stage, shuffled inside each stage
    with a seeded RNG (never sorted). Types absent from the data are skipped. Returns a new list
    of the same dict objects; a record with no or an unknown `type` raises ValueError."""
    by_stage = [[] for _ in stages(mode)]
    for i, rec in enumerate(records):
        t = rec.get("type") if isinstance(rec, dict) else None
        if t not in TYPES:
            rid = rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
            raise ValueError(f"record {rid}: unknown question type {t!r}; expected one of {', '.join(TYPES)}")
        by_stage[stage_of(t, mode)].append(rec)
    order = []
    for k, group in enumerate(by_stage):
        # A string seed is hashed with SHA-512 by `random`: stable across processes and
        # PYTHONHASHSEED, and independent per stage, so one stage's size never shifts another's.
        random.Random(f"curriculum/{seed}/{k}").shuffle(group)
        order.extend(group)
    return order


def _split_for_ranks(batch, world_size):
    # rank r takes batch[r::W]: a batch that straddles a stage boundary mixes stages on each rank.
    return [batch[r::world_size] for r in range(world_size)]


def epoch_batches(records, *, mode="rewardmap", seed=0, epoch=0, batch_size=16, rank=0, world_size=1):
    """This rank's steps for one epoch: [(stage label, [record, ...]), ...], one entry per global
    step. Every rank gets the same number of steps and the same labels, and at least one question
    per step. batch_size is the global batch (16 questions in §5.1), split across world_size
    ranks; it must be a multiple of world_size. See module notes 2–4."""
    for name, v in (("batch_size", batch_size), ("world_size", world_size), ("epoch", epoch), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if world_size < 1 or batch_size < 1 or epoch < 0:
        raise ValueError(f"need world_size >= 1, batch_size >= 1, epoch >= 0; got {world_size}, {batch_size}, {epoch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} is not a multiple of world_size {world_size}: "
                         f"ranks would get different numbers of questions")
    order = schedule(records, mode, seed + epoch)
    if not order:
        raise ValueError("no records to schedule")
    steps = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < world_size:  # pad so no rank is left without a question (docs/deviations.md)
            batch = batch + [order[i % len(order)] for i in range(world_size - len(batch))]
        ks = [stage_of(r["type"], mode) for r in batch]
        label = stage_label(max(sorted(set(ks)), key=ks.count), mode)  # majority, ties -> earlier
        steps.append((label, _split_for_ranks(batch, world_size)[rank]))
    return steps


def main(argv):
    import argparse
    p = argparse.ArgumentParser(description="print the curriculum plan of a JSONL question file")
    p.add_argument("data")
    p.add_argument("--mode", default="rewardmap", choices=list(MODES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    with open(a.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    plan = epoch_batches(records, mode=a.mode, seed=a.seed, batch_size=a.batch_size)
    print(f"{len(records)} questions, {len(plan)} steps of {a.batch_size} ({a.mode})")
    for k, types in enumerate(stages(a.mode)):
        n_q = sum(r["type"] in types for r in records)
        n_steps = sum(label == stage_label(k, a.mode) for label, _ in plan)
        print(f"  stage {stage_label(k, a.mode):28s} {n_q:6d} questions {n_steps:5d} steps")


if __name__ == "__main__":
    main(sys.argv[1:])
