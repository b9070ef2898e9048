"""Perception pretraining of a small Qwen2.5-VL on legible maps (tools/legible.py): a base model
that can read stop letters before any RL (the paper starts from Qwen2.5-VL-Instruct, §5.1).

Supervised, on teacher-forced gold answers (train.teacher_rollout, the `--algo sft` path's
encoding), on perception tasks that are none of the six evaluated types (§3, App. A.2):
  stops   "Name its stops in alphabetical order."     every stop letter once, e.g. "ADMQW"
  lineset "Name the stops of Line k in alphabetical order."   e.g. "ADMQ"
  through "Which lines pass through stop X?"          the line numbers, e.g. "13"
  present 'Answer yes or no in one "\\boxed{}". ... Is there a stop X?'   "\\boxed{yes}" (the format)
  cell / token "Which letter is in row r, column c?" / "...in image token n?"   a letter or "."
  grid / line  "Read the grid row by row." (49 characters) / "Read the stops of Line k in order."
plus a dense loss (--dense): the LM head on every image position predicts that cell's letter
(image tokens are the merged 28x28 cells, row-major; --dense-lines: the cells between stops
predict their line's number). In our runs *stops* was learned (99.6 %), *lineset* in part, the
rest stayed at their majority answer (docs/experiments.md). Training cities only; every held-out
figure is measured on the test cities.

    python tools/pretrain.py --out runs/base --max-steps 1200 --threads 1   # = tools/base, ~9 min
    python tools/pretrain.py --out runs/base --max-steps 1600 --threads 1 --resume
    python eval.py --model tools/base --data runs/base/data/test.jsonl --out runs/base/eval.json \
        --max-new-tokens 32

OUT/data (tools/legible.py), OUT/pretrain.jsonl (the training examples), OUT/curve.jsonl (a line
per evaluation: seconds, steps, held-out accuracies), OUT/ckpt (latest state, --resume),
OUT/final (model + processor, what eval.py and train.py --model read). Same arguments -> same
weights, resumed or not (batches are a function of seed and step).
"""
import argparse
import json
import os
import random
import string
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model as model_mod  # noqa: E402
import train  # noqa: E402
from tools import legible  # noqa: E402

EMPTY = "."
TASKS = ("cell", "token", "grid", "line", "stops", "lineset", "through", "present")
STOPS_Q = "Read the map. Name its stops in alphabetical order."


def lineset_q(line):
    return f"Read the map. Name the stops of {line} in alphabetical order."


def through_q(stop):
    return f"Read the map. Which lines pass through stop {stop}?"


def present_q(letter):
    return f'Answer yes or no in one "\\boxed{{}}". Read the map. Is there a stop {letter}?'


def through(metro, stop):
    """The numbers of the lines through a stop, ascending: "13" for Line 1 and Line 3."""
    return "".join(line.split()[-1] for line in sorted(metro) if stop in metro[line])


def cells(layout):
    """Row-major letters of the map's GRID x GRID cells ("." where no stop)."""
    g = layout["grid"]
    out = [EMPTY] * (g * g)
    for s, (c, r) in layout["cell"].items():
        out[r * g + c] = s
    return out


def examples(metro, layout, rng, per_city=24):
    """Perception (question, answer, task) triples of one city: every stop cell asked by row and
    column and by token, as many empty cells, the whole grid, and each line's stops."""
    g, grid = layout["grid"], cells(layout)
    full = [i for i, x in enumerate(grid) if x != EMPTY]
    empty = [i for i, x in enumerate(grid) if x == EMPTY]
    picks = full + rng.sample(empty, min(len(empty), len(full)))
    out = []
    for i in picks:
        out.append((f"Read the map. Which letter is in row {i // g + 1}, column {i % g + 1}?",
                    grid[i], "cell"))
        out.append((f"Read the map. Which letter is in image token {i + 1}?", grid[i], "token"))
    out.append(("Read the map. Read the grid row by row.", "".join(grid), "grid"))
    for line, stops in metro.items():
        out.append((f"Read the map. Read the stops of {line} in order.", "".join(stops), "line"))
    rng.shuffle(out)
    out = out[:per_city] if per_city else out
    # Tasks whose answers need no place on the map: sets of letters (a sort, once seen) and line
    # numbers. Drawn apart from `rng`, so the tasks above keep their examples.
    own = random.Random("".join(sorted(layout["cell"])))
    out.append((STOPS_Q, "".join(sorted(layout["cell"])), "stops"))
    for line, stops in metro.items():
        out.append((lineset_q(line), "".join(sorted(stops)), "lineset"))
    for s in own.sample(sorted(layout["cell"]), 3):
        out.append((through_q(s), through(metro, s), "through"))
    absent = sorted(set(string.ascii_uppercase) - set(layout["cell"]))
    for x, yes in [(x, True) for x in own.sample(sorted(layout["cell"]), 2)] + \
            [(x, False) for x in own.sample(absent, 2)]:
        out.append((present_q(x), "\\boxed{yes}" if yes else "\\boxed{no}", "present"))
    return out


def load_split(data_dir, split):
    """[(city, metro, layout, image path)] of a legible dataset's split, in file order."""
    seen, out = set(), []
    for r in data.load_records(os.path.join(data_dir, f"{split}.jsonl")):
        if r["city"] not in seen:
            seen.add(r["city"])
            with open(os.path.join(data_dir, "layouts", r["city"] + ".json")) as f:
                layout = json.load(f)
            out.append((r["city"], r["metro"], layout, os.path.join(data_dir, r["figure"])))
    return out


class Images(dict):
    def __missing__(self, path):
        self[path] = Image.open(path).convert("RGB")
        return self[path]


def letter_ids(processor):
    tok = processor.tokenizer
    return {ch: tok.convert_tokens_to_ids(ch) for ch in
            list(string.ascii_uppercase) + list("0123456789") + [EMPTY]}


def dense_labels(layout, ids, metro, lines=False):
    """Token id per image token: the map's cells row-major, then the legend row (digits). With
    `lines`, a cell between two stops is labelled with the number of the line drawn through it
    (the lowest, where two cross) instead of "."."""
    g = layout["grid"]
    grid = cells(layout)
    if lines:
        for line in sorted(metro, reverse=True):
            cs = [layout["cell"][s] for s in metro[line]]
            for (c0, r0), (c1, r1) in zip(cs, cs[1:]):
                grid[(r0 + r1) // 2 * g + (c0 + c1) // 2] = line.split()[-1]
    lab = [ids[x] for x in grid]
    legend = [ids[EMPTY]] * g
    for k, line in enumerate(metro):   # as legible.draw writes the legend
        legend[2 * k + 1] = ids[line.split()[-1]]
    return lab + legend


def forward(net, processor, batch, images, ids, dense, dense_lines=False):
    """(loss, sft loss, dense loss) of a batch of (question, answer, city tuple) items. Each map
    goes through the vision tower once and its features serve all its questions (as
    model.token_logprobs shares them among a group's samples)."""
    ims = [images[c[3]] for _, _, c in batch]
    ro = train.teacher_rollout(processor, [q for q, _, _ in batch], ims, [a for _, a, _ in batch])
    uniq = list(dict.fromkeys(c[3] for _, _, c in batch))
    which = torch.tensor([uniq.index(c[3]) for _, _, c in batch])
    pi = processor.image_processor(images=[images[u] for u in uniq], return_tensors="pt")
    feats = net.model.get_image_features(pi["pixel_values"], pi["image_grid_thw"], return_dict=True)
    per_image = list(feats.pooler_output)
    feats.pooler_output = [per_image[int(i)] for i in which]
    out = net(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
              mm_token_type_ids=ro.mm_token_type_ids, mm_encoder_outputs={"image": feats},
              image_grid_thw=pi["image_grid_thw"][which], use_cache=False)
    logits = out.logits.float()
    P, mask = ro.prompt_len, ro.completion_mask > 0
    sft = F.cross_entropy(logits[:, P - 1:-1][mask], ro.completion_ids[mask])
    loss, dl = sft, torch.zeros(())
    if dense:
        img = ro.input_ids == net.config.image_token_id
        lab = torch.tensor([dense_labels(c[2], ids, c[1], dense_lines) for _, _, c in batch])
        dl = F.cross_entropy(logits[img], lab.flatten())
        loss = loss + dense * dl
    return loss, float(sft.detach()), float(dl.detach())


@torch.no_grad()
def evaluate(net, processor, cities, images, ids, tasks=TASKS, batch=8):
    """Held-out accuracies: grid (greedy, 49 characters) per stop and per cell, cell questions
    on every stop (first answer token), stops (greedy): share of a map's stops named (recall)
    and of named letters that are its stops (precision), maps read exactly; dense read-out per
    stop. Only the tasks trained are measured, and dense always."""
    net.eval()
    stats = {"dense_stops": [0, 0]}
    for k in ["grid_stops", "grid_cells"] * ("grid" in tasks) + ["cell_stops"] * ("cell" in tasks) \
            + ["stops_recall", "stops_precision", "stops_exact"] * ("stops" in tasks) \
            + ["lineset_recall", "lineset_precision", "lineset_exact"] * ("lineset" in tasks) \
            + ["through_exact"] * ("through" in tasks) + ["present_exact"] * ("present" in tasks):
        stats[k] = [0, 0]
    for i in range(0, len(cities), batch):
        part = cities[i:i + batch]
        ims = [images[c[3]] for c in part]
        sets = [(STOPS_Q, "".join(sorted(c[2]["cell"])), c, "stops") for c in part] * ("stops" in tasks)
        sets += [(lineset_q(k), "".join(sorted(v)), c, "lineset") for c in part
                 for k, v in sorted(c[1].items())] * ("lineset" in tasks)
        for j in range(0, len(sets), 32):
            sub = sets[j:j + 32]
            ro = model_mod.generate(net, processor, [q for q, _, _, _ in sub],
                                    [images[c[3]] for _, _, c, _ in sub], greedy=True,
                                    max_new_tokens=20)
            for text, (_, gold, _, task) in zip(ro.texts, sub):
                hit = len(set(gold) & set(text.strip()))
                stats[f"{task}_recall"][0] += hit
                stats[f"{task}_recall"][1] += len(gold)
                stats[f"{task}_precision"][0] += hit
                stats[f"{task}_precision"][1] += len(set(text.strip()))
                stats[f"{task}_exact"][0] += text.strip() == gold
                stats[f"{task}_exact"][1] += 1
        asks = [(through_q(x), through(c[1], x), c, "through") for c in part
                for x in sorted(c[2]["cell"])] * ("through" in tasks)
        asks += [(present_q(x), "\\boxed{%s}" % ("yes" if x in c[2]["cell"] else "no"), c, "present")
                 for c in part for x in string.ascii_uppercase[i % 2::2]] * ("present" in tasks)
        for j in range(0, len(asks), 32):
            sub = asks[j:j + 32]
            ro = model_mod.generate(net, processor, [q for q, _, _, _ in sub],
                                    [images[c[3]] for _, _, c, _ in sub], greedy=True, max_new_tokens=5)
            for text, (_, gold, _, task) in zip(ro.texts, sub):
                stats[f"{task}_exact"][0] += text.strip() == gold
                stats[f"{task}_exact"][1] += 1
        if "grid" in tasks:
            ro = model_mod.generate(net, processor, ["Read the map. Read the grid row by row."] * len(part),
                                    ims, greedy=True, max_new_tokens=50)
            for text, c in zip(ro.texts, part):
                gold = cells(c[2])
                for j, x in enumerate(gold):
                    ok = j < len(text) and text[j] == x
                    stats["grid_cells"][0] += ok
                    stats["grid_cells"][1] += 1
                    if x != EMPTY:
                        stats["grid_stops"][0] += ok
                        stats["grid_stops"][1] += 1
        qs = [] if "cell" not in tasks else [
            (f"Read the map. Which letter is in row {row + 1}, column {col + 1}?", s, c)
            for c in part for s, (col, row) in sorted(c[2]["cell"].items())]
        for j in range(0, len(qs), 32):
            sub = qs[j:j + 32]
            ro = train.teacher_rollout(processor, [q for q, _, _ in sub],
                                       [images[c[3]] for _, _, c in sub], [a for _, a, _ in sub])
            out = net(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                      mm_token_type_ids=ro.mm_token_type_ids, pixel_values=ro.pixel_values,
                      image_grid_thw=ro.image_grid_thw, use_cache=False)
            pred = out.logits[:, ro.prompt_len - 1].argmax(-1)
            gold = ro.completion_ids[:, 0]
            stats["cell_stops"][0] += int((pred == gold).sum())
            stats["cell_stops"][1] += len(sub)
        enc, _ = model_mod.encode(processor, ["Read the map."] * len(part), ims)
        out = net(**enc, use_cache=False)
        img = enc["input_ids"] == net.config.image_token_id
        pred = out.logits[img].argmax(-1).view(len(part), -1)
        for row, c in zip(pred.tolist(), part):
            lab = dense_labels(c[2], ids, c[1])
            for j, x in enumerate(cells(c[2])):
                if x != EMPTY:
                    stats["dense_stops"][0] += row[j] == lab[j]
                    stats["dense_stops"][1] += 1
    net.train()
    return {k: round(a / max(n, 1), 4) for k, (a, n) in stats.items()}


def save(out, name, net, processor, opt=None, state=None):
    """OUT/name atomically (written beside, then renamed)."""
    tmp, final = os.path.join(out, f".{name}.tmp"), os.path.join(out, name)
    if os.path.exists(tmp):
        import shutil
        shutil.rmtree(tmp)
    model_mod.save(net, processor, tmp)
    if opt is not None:
        torch.save({"optimizer": opt.state_dict(), **state}, os.path.join(tmp, "pretrain_state.pt"))
    if os.path.exists(final):
        import shutil
        shutil.rmtree(final)
    os.replace(tmp, final)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="perception pretraining on legible maps")
    p.add_argument("--out", required=True)
    p.add_argument("--cities", type=int, default=2000, help="legible cities (default 2,000)")
    p.add_argument("--test", type=int, default=40, help="held-out cities (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="stops", help=f"comma list of {TASKS} (default stops)")
    p.add_argument("--dense", type=float, default=1.0, help="dense-loss weight (0: off)")
    p.add_argument("--dense-lines", action="store_true",
                   help="dense targets also on the cells between stops: the line's number")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--maps", type=int, default=16, help="maps per step (default 16)")
    p.add_argument("--questions", type=int, default=1, help="questions per map (default 1)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: none)")
    p.add_argument("--minutes", type=float, default=0, help="stop after this much training time")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--eval-maps", type=int, default=32)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--init", default=None,
                   help="start from this model folder (e.g. another run's ckpt) instead of a fresh one")
    a = p.parse_args(argv)
    a.tasks = [t for t in a.tasks.split(",") if t]
    if not a.tasks or set(a.tasks) - set(TASKS):
        p.error(f"--tasks: a comma list of {TASKS}")
    if not (a.max_steps or a.minutes):
        p.error("give --max-steps or --minutes")
    return a


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    ddir = os.path.join(a.out, "data")
    if not os.path.exists(os.path.join(ddir, "test.jsonl")):
        legible.make(ddir, a.cities, a.seed, per_type=2, n_test=a.test)
    train_c, test_c = load_split(ddir, "train"), load_split(ddir, "test")
    rng = random.Random(f"pretrain-{a.seed}")
    per_city = [[(q, ans, c) for q, ans, t in examples(c[1], c[2], rng, 0) if t in a.tasks]
                for c in train_c]
    pool = [x for part in per_city for x in part]
    ppath = os.path.join(a.out, "pretrain.jsonl")
    if not os.path.exists(ppath):
        with open(ppath + ".tmp", "w") as f:
            for q, ans, c in pool:
                f.write(json.dumps({"city": c[0], "figure": os.path.relpath(c[3], a.out),
                                    "question": q, "answer": ans}) + "\n")
        os.replace(ppath + ".tmp", ppath)

    ck = os.path.join(a.out, "ckpt")
    if a.resume and os.path.exists(ck):
        net, processor = model_mod.load(ck, dtype=torch.float32)
        state = torch.load(os.path.join(ck, "pretrain_state.pt"), weights_only=False)
    else:
        if a.init:
            net, processor = model_mod.load(a.init, dtype=torch.float32)
        else:
            net, processor = model_mod.build_tiny(seed=a.seed)
        state = {"step": 0, "seconds": 0.0}
    model_mod.set_max_pixels(processor, legible.PIXELS)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.0)
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    sched = lambda s: min(1.0, (s + 1) / max(a.warmup, 1))
    ids, images = letter_ids(processor), Images()
    held = test_c[:a.eval_maps]
    curve = os.path.join(a.out, "curve.jsonl")
    step, secs = state["step"], state["seconds"]
    if step == 0:
        open(curve, "w").close()
    t_last = time.time()

    def log(extra):
        row = {"seconds": round(secs, 1), "steps": step, **extra,
               **evaluate(net, processor, held, images, ids, a.tasks)}
        with open(curve, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    while not (a.max_steps and step >= a.max_steps) and not (a.minutes and secs >= 60 * a.minutes):
        brng = random.Random(f"pretrain-{a.seed}-step-{step}")
        batch = [brng.choice(per_city[m]) for m in brng.sample(range(len(per_city)), a.maps)
                 for _ in range(a.questions)]
        torch.manual_seed(a.seed * 100003 + step)
        for g in opt.param_groups:
            g["lr"] = a.lr * sched(step)
        loss, sft, dl = forward(net, processor, batch, images, ids, a.dense, a.dense_lines)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        secs += now - t_last
        if step % a.eval_every == 0:
            log({"sft": round(sft, 4), "dense": round(dl, 4)})
        if a.save_every and step % a.save_every == 0:
            save(a.out, "ckpt", net, processor, opt, {"step": step, "seconds": secs})
        t_last = time.time()   # evaluation and saving are not training time
    if step % a.eval_every:
        log({"sft": round(sft, 4), "dense": round(dl, 4)} if step > state["step"] else {})
    save(a.out, "ckpt", net, processor, opt, {"step": step, "seconds": secs})
    save(a.out, "final", net, processor)
    print(f"done: {step} steps, {secs / 60:.1f} min; model in {os.path.join(a.out, 'final')}")


if __name__ == "__main__":
    main()
