"""A legible synthetic map style: one stop = one image token of Qwen2.5-VL.

data.py's synthetic maps are drawn at 448-784 px and read by the tiny model at 112 px, where no
stop name survives. Here the drawing is built on the model's own grid: Qwen2.5-VL cuts an image
into 14 px patches and merges 2x2 of them into one image token (28x28 px, row-major). The map is
GRID x GRID such cells plus one legend row; stops sit on every other cell (a (GRID+1)/2 square
lattice), each a white disk filling its cell with a single capital letter, so the cells between
stops carry only the thick coloured lines. The legend row gives each line a colour swatch cell
and its number ("Line 2" -> "2"). Letters, lines and layout are drawn from a seeded rng per city,
so cities do not repeat. The Metro Data, the six question types (§3, App. A.2), rewards and the
record format are data.py's own (make_questions, the stations JSON, write_jsonl).

    python tools/legible.py --out data/legible --cities 300 --seed 0

writes OUT/{train,test}.jsonl, OUT/maps/*.png, OUT/stations/*.json and OUT/layouts/*.json (cell
of every stop, line colours: the drawing's geometry, what tools/pretrain.py builds its perception
targets from). The last --test cities form the test split; a city whose network repeats an
earlier one is redrawn, so no test map is a training map. Read at max_pixels >= W*H (PIXELS
below); a smaller budget shrinks every cell under one token.
"""
import argparse
import json
import math
import os
import random
import string
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

CELL = 28           # Qwen2.5-VL patch 14 x spatial merge 2: one merged cell = one image token
GRID = 7            # map cells per side (stop lattice (GRID + 1) // 2 = 4 per side)
LINES = (2, 3)      # lines per city
STOPS = (3, 5)      # stops per line
WIDTH = 6           # line thickness, px
RADIUS = 14         # stop disk: fills its cell
FONT = 20           # letter size, px (a capital is ~15 px tall, inside its 28 px disk)
SIZE = (GRID * CELL, (GRID + 1) * CELL)   # W x H: 196 x 224, 7 x 8 = 56 image tokens
PIXELS = SIZE[0] * SIZE[1]                 # the budget that reads it unscaled


def city(rng, grid=GRID):
    """(metro {"Line k": [letter, ...]}, layout {"cell": {letter: [col, row]}, "colors", "grid"})."""
    side = (grid + 1) // 2
    for _ in range(200):
        paths, used, nodes = [], set(), set()
        n = rng.randint(*LINES)
        for _ in range(n):
            path, edges = data._walk(rng, side, rng.randint(*STOPS), used, nodes if paths else None)
            if path is None:
                break
            paths.append(path)
            used |= edges
            nodes |= set(path)
        if len(paths) < n or len(nodes) > 26:
            continue
        order = sorted(nodes, key=lambda p: (p[1], p[0]))
        names = dict(zip(order, rng.sample(string.ascii_uppercase, len(order))))
        metro = {f"Line {i + 1}": [names[p] for p in path] for i, path in enumerate(paths)}
        layout = {"grid": grid, "cell": {names[p]: [2 * p[0], 2 * p[1]] for p in order},
                  "colors": {line: data.PALETTE[i] for i, line in enumerate(metro)}}
        return metro, layout
    raise RuntimeError("could not draw a legible city")


def _centre(c, r):
    return c * CELL + CELL / 2, r * CELL + CELL / 2


def draw(metro, layout):
    """(PIL image, geometry). geometry: "labels" {name: box} (stop disks and legend numbers,
    x0 y0 x1 y1 in px, x1/y1 exclusive), "glyphs" {name: ink box of the letter},
    "segments" [(line, (x0, y0), (x1, y1))], "width", "size"."""
    grid = layout["grid"]
    size = (grid * CELL, (grid + 1) * CELL)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = data._font(FONT)
    cell = layout["cell"]
    segments = []
    for line, stops in metro.items():
        pts = [_centre(*cell[s]) for s in stops]
        d.line(pts, fill=layout["colors"][line], width=WIDTH, joint="curve")
        segments += [(line, a, b) for a, b in zip(pts, pts[1:])]
    n_lines = {s: sum(s in st for st in metro.values()) for s in cell}
    labels, glyphs = {}, {}
    for s in sorted(cell, key=lambda s: (cell[s][1], cell[s][0])):
        c, r = cell[s]
        x0, y0 = c * CELL, r * CELL
        own = next(line for line, st in metro.items() if s in st)
        outline = "black" if n_lines[s] > 1 else layout["colors"][own]
        d.ellipse((x0, y0, x0 + CELL - 1, y0 + CELL - 1), fill="white", outline=outline,
                  width=3 if n_lines[s] > 1 else 2)
        x, y = _centre(c, r)
        d.text((x, y), s, fill="black", font=font, anchor="mm")
        labels[s] = (x0, y0, x0 + CELL, y0 + CELL)
        glyphs[s] = d.textbbox((x, y), s, font=font, anchor="mm")
    y0 = grid * CELL
    for i, line in enumerate(metro):
        x0 = 2 * i * CELL
        d.rectangle((x0 + 3, y0 + 7, x0 + CELL - 4, y0 + CELL - 8), fill=layout["colors"][line])
        num = line.split()[-1]
        x, y = _centre(2 * i + 1, grid)
        d.text((x, y), num, fill="black", font=font, anchor="mm")
        labels[f"legend:{line}"] = (x0 + CELL, y0, x0 + 2 * CELL, y0 + CELL)
        glyphs[f"legend:{line}"] = d.textbbox((x, y), num, font=font, anchor="mm")
    return img, {"labels": labels, "glyphs": glyphs, "segments": segments, "width": WIDTH,
                 "size": size}


def seg_distance(p, a, b):
    """Distance from point p to segment ab (px)."""
    (px, py), (ax, ay), (bx, by) = p, a, b
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-9)))
    return math.hypot(px - ax - t * dx, py - ay - t * dy)


def make(out_dir, cities=300, seed=0, per_type=4, n_test=None):
    """Write the dataset (see the module docstring); returns (train.jsonl, test.jsonl)."""
    cities = int(cities)
    n_test = max(1, cities // 5) if n_test is None else int(n_test)
    if not 0 < n_test < cities:
        raise ValueError(f"--test must be between 1 and {cities - 1}")
    for sub in ("maps", "stations", "layouts"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    train, test, seen = [], [], set()
    for i in range(cities):
        name = f"legible{i:05d}"
        rng = random.Random(f"rewardmap-legible-{seed}-{i}")
        while True:
            metro, layout = city(rng)
            key = json.dumps([sorted(metro.items()), sorted(layout["cell"].items())])
            if key not in seen:
                seen.add(key)
                break
        img, _ = draw(metro, layout)
        img.save(os.path.join(out_dir, "maps", name + ".png"), optimize=False)
        with open(os.path.join(out_dir, "layouts", name + ".json"), "w") as f:
            json.dump(layout, f, sort_keys=True)
        st = os.path.join(out_dir, "stations", name + ".json")
        data._write_stations(st, metro)
        metro = data.load_metro(st)  # the path every city takes
        recs = data.make_questions(metro, city=name, country="legibleland",
                                   difficulty=data.city_difficulty(metro),
                                   figure=f"maps/{name}.png", rng=rng, per_type=per_type)
        (test if i >= cities - n_test else train).extend(recs)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "test.jsonl")
    data.write_jsonl(paths[0], train)
    data.write_jsonl(paths[1], test)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description="legible synthetic maps: one stop per image token")
    p.add_argument("--out", required=True)
    p.add_argument("--cities", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-type", type=int, default=4)
    p.add_argument("--test", type=int, default=None, help="test cities (default a fifth)")
    a = p.parse_args(argv)
    for path in make(a.out, a.cities, a.seed, a.per_type, a.test):
        recs = data.load_records(path)
        print(f"{path}: {len(recs)} records, {len({r['city'] for r in recs})} cities")


if __name__ == "__main__":
    main()
