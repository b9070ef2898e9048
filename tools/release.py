"""The authors' released datasets -> our JSONL records (RewardMap App. A; ReasonMap RM §3).

    python tools/release.py data/ReasonMap-Plus data/ReasonMap-Train data/ReasonMap \\
        --maps RewardMap/maps --stations ReasonMap/stations --out data/release

Reads, and writes OUT/<name>.jsonl per released file and split, loadable by data.load_records:
- ReasonMap-Plus (FSCCS/ReasonMap-Plus, data/{train,test}.parquet) and ReasonMap-Train
  (FSCCS/ReasonMap-Train; the authors' utils/download_dataset.py keeps it as datasets'
  save_to_disk folder: dataset_dict.json, <split>/state.json listing data-*.arrow shards in Arrow
  IPC stream format): one row per question; `answer` an int (TorF 1/0, Counting1 0-3, counts;
  planning rows carry a placeholder); `figure` a path such as ./maps/<country>/<city>.png.
- ReasonMap (FSCCS/ReasonMap, data/reasonmap-1008-{train,validation}.parquet): one row per route
  question, asked twice (question_short, question_long; RM App. A.1), reference `routes` from map
  services, and the whole map as base64 PNG in `figure`, repeated in every row (read a few rows at
  a time; each city's map is decoded once and written to OUT/maps/<country>/<city>.png).
Both readings are accepted wherever the authors' code does not settle the stored form (answers
as ints or as "yes"/"B"; `json` as a dict, JSON text or a path; `routes` as an object of plans, a
list or JSON text; `figure` as a path, base64 text or image bytes).

Map services name lines their own way (RM §3: Gaode in China, Google elsewhere); service_line()
turns those names into Metro Data lines. ReasonMap-Plus's totals by type, map difficulty and split
are printed and checked against App. A.1 (a warning on stderr names each count that differs).
Needs pyarrow (an optional extra: pip install pyarrow).
Where this departs from the release: docs/deviations.md, "Released-dataset importer".
"""
import argparse
import base64
import collections
import dataclasses
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import (ambiguous_stops, best_routes, check_metro, check_record, clean_name,  # noqa: E402
                  load_metro_raw, make_record, progress, ride, write_jsonl)
from reward import (DIFFICULTIES, MAX_NAME, TEMPLATE_NAMES, TYPES, fold_name,  # noqa: E402
                    normalize_line, normalize_stop)


# ---------------------------------------------------------------------------------------------
# Line names as the map services write them -> Metro Data lines

# ReasonMap's reference routes name lines as the map services do (RM §3: Gaode in China, Google
# elsewhere). Its evaluator (main.py) maps them per city with a chain of regexes; here one set of
# rules does it for every city, plus the names no rule can derive (from that evaluator).
SERVICE_LINE_ALIASES = {
    "beijing": {"八通线": "Line 1", "大兴线": "Line 4"},     # through-running extensions
    "kl": {"KTM Batu Caves - Pulau Sebang/Tampin": "Line 1",
           "KTM Tanjung Malim - Pelabuhan Klang": "Line 2", "Ampang Line": "Line 3",
           "LRT Sri Petaling Line": "Line 4", "LRT Kelana Jaya Line": "Line 5",
           "MRT Kajang Line": "Line 9", "MRT Putrajaya Line": "Line 12"},
}
# "-es"/"-as" end Budapest's "M1-es metróvonal"; fold_name has already split them off.
_SERVICE_WORDS = {"metro", "metrorail", "subway", "linea", "line", "route", "train", "mrt", "lrt",
                  "ktm", "metróvonal", "es", "as"}
_SERVICE_CJK = re.compile(r"^(?:地铁|轨道交通)|(?:号线|线)$")
_TRAILING_NUMBER = re.compile(r"(?<=[^\W\d_])\d+$")


def _service_key(name):
    return _SERVICE_CJK.sub("", "".join(w for w in fold_name(name).split() if w not in _SERVICE_WORDS))


def _abbreviates(short, word):
    """'sth' -> 'southern', 'grn' -> 'green': same first letter, the rest in order."""
    if len(short) < 2 or short == word or short[0] != word[:1]:
        return False
    rest = iter(word)
    return all(ch in rest for ch in short)


def service_line(name, lines, city=None):
    """The Metro Data line (one of `lines`) that a map service's route name means, or None.

    '地铁5号线(后关--虎滩新区)' -> 'Line 5', '地铁昌平线(…)' -> '昌平线', 'Metro A Line' /
    'Metro B-Line' -> 'Line A' / 'Line B', 'Linea C' -> 'Line C', 'B1' (Rome) -> 'Line B',
    'M1-es metróvonal' -> 'Line 1' (Budapest) but 'M1' -> 'Line M1' (Sydney), 'MRed2' -> 'Red Line',
    'MGrn' -> 'Green Line', 'Sth' -> 'Southern Line', '5 Train' -> '5', '12' -> 'Line 12'.
    Rules are tried in that order of boldness; a rule counts only if exactly one line fits."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        return None
    key = _service_key(name)
    for alias, line in SERVICE_LINE_ALIASES.get(city, {}).items():
        if line in lines and _service_key(alias) == key:
            return line
    keys = {line: {normalize_line(line), _service_key(line)} for line in lines}
    tries = [normalize_line(name), key]
    if key[:1] == "m":
        tries.append(key[1:])                             # M1 (Budapest), MRed2 (Dubai)
    tries += [_TRAILING_NUMBER.sub("", t) for t in tries]   # B1 (Rome's branch), Red2
    for fits in (lambda t, k: t == k, _abbreviates):
        for t in tries:
            hits = [line for line in lines if t and any(fits(t, k) for k in keys[line])]
            if len(hits) == 1:
                return hits[0]
    return None


# ---------------------------------------------------------------------------------------------
# The released files -> our records

RELEASE_MAX_LOST = 0.01          # a file's import fails if more of its records cannot be mapped
RELEASE_BATCH_BYTES = 64 << 20   # Arrow data per batch read; a ReasonMap row carries a whole map
_RELEASE_COLUMNS = {  # format: (needed, optional)
    "ReasonMap-Plus/Train": (
        ("question", "answer", "type", "figure", "country", "city", "difficulty_city"),
        ("station_1", "station_2", "json", "question_transfer_count", "city_line_count",
         "city_transfer_count", "routes")),
    "ReasonMap": (
        ("question_short", "question_long", "station_1", "station_2", "figure", "country", "city",
         "difficulty_city", "routes"),
        ("json", "question_transfer_count", "city_line_count", "city_transfer_count",
         "difficulty_question")),
}
_NUMBER = ("int", "float", "string")
_COLUMN_KINDS = {"answer": ("int", "float", "string", "bool"), "question_transfer_count": _NUMBER,
                 "city_line_count": _NUMBER, "city_transfer_count": _NUMBER,
                 "figure": ("string", "binary", "struct"), "json": ("string", "struct", "map"),
                 "routes": ("string", "list", "struct", "map")}
_RELEASE_TYPES = {t.lower(): t for t in TYPES}
_SHARD = re.compile(r"(.+?)-\d{5}-of-\d{5}")
_OPTION = re.compile(r"(?<![A-Za-z0-9])([A-D])\s*[).:：]\s*(-?\d+)")
# "Line 2", "line12", "Route 3", "A Line", "5 Train", "4号线": codes in capitals, so "a line" is not one
_LINE_MENTION = re.compile(r"(?<!\w)(?:[Ll]inea?|[Rr]oute)\s*[A-Z0-9]{1,3}(?!\w)"
                           r"|(?<!\w)[A-Z0-9]{1,3}[ -](?:[Ll]ine|[Tt]rain)(?!\w)|[0-9A-Z]{1,3}号线")
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))


def _arrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("reading the released datasets (Parquet / Arrow files) needs pyarrow, "
                          "an optional extra: pip install pyarrow") from None
    return pyarrow


class _Lost(Exception):
    """A row that cannot become a record: reason (counted) and detail (shown for the first)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class _Source:
    where: str       # shown in messages
    dataset: str     # record ids: dataset/split/row
    split: str
    name: str        # OUT/<name>.jsonl
    files: list
    arrow: bool      # save_to_disk shards (Arrow IPC) rather than Parquet


def _dataset_name(folder):
    """ReasonMap-Plus/data/test.parquet -> 'ReasonMap-Plus' (a 'data' folder is skipped)."""
    folder = os.path.abspath(folder)
    while os.path.basename(folder) == "data" and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return os.path.basename(folder) or "dataset"


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _saved_sources(folder):
    """A datasets save_to_disk folder: a DatasetDict (dataset_dict.json + one folder per split)
    or a single Dataset (state.json at the top). Shards are listed in each split's state.json."""
    name = os.path.basename(os.path.abspath(folder))
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = _read_json(os.path.join(folder, "dataset_dict.json")).get("splits")
        if not isinstance(splits, list) or not splits:
            raise ValueError(f"{os.path.join(folder, 'dataset_dict.json')}: no 'splits' list")
        parts = [(str(s), os.path.join(folder, str(s))) for s in splits]
    else:
        parts = [(None, folder)]
    out = []
    for split, sdir in parts:
        state_path = os.path.join(sdir, "state.json")
        state = _read_json(state_path)
        files = [os.path.join(sdir, f.get("filename", "")) for f in state.get("_data_files") or []
                 if isinstance(f, dict)]
        if not files:
            raise ValueError(f"{state_path}: no '_data_files' listed")
        split = split or state.get("_split") or "train"
        out.append(_Source(sdir, name, split, f"{name}-{split}", files, arrow=True))
    return out


def _release_sources(path):
    """The files behind PATH: a .parquet file, a save_to_disk folder, or a folder holding either
    (hub shards such as train-00000-of-00002.parquet form one split, named 'train')."""
    saved, groups = [], {}
    if os.path.isfile(path) and path.endswith(".parquet"):
        groups[(os.path.dirname(path), os.path.basename(path)[:-8])] = [path]
    elif os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if any(os.path.isfile(os.path.join(root, f)) for f in ("dataset_dict.json", "state.json")):
                saved += _saved_sources(root)
                dirs[:] = []
                continue
            for f in sorted(files):
                if f.endswith(".parquet"):
                    shard = _SHARD.fullmatch(f[:-8])
                    key = (root, shard.group(1) if shard else f[:-8])
                    groups.setdefault(key, []).append(os.path.join(root, f))
    else:
        raise ValueError(f"{path}: not a .parquet file, a save_to_disk folder, or a folder of them")
    if not saved and not groups:
        raise ValueError(f"{path}: holds no .parquet file and no save_to_disk folder")
    return saved + [_Source(files[0] if len(files) == 1 else os.path.join(root, stem + "-*.parquet"),
                            _dataset_name(root), stem, stem, files, arrow=False)
                    for (root, stem), files in sorted(groups.items())]


def _open_source(src):
    """(schema, batches, number of batches or 0 if unknown) of a source's files, read lazily."""
    pa = _arrow()
    if src.arrow:   # datasets writes (and reads) its shards as memory-mapped IPC streams
        readers = []
        for f in src.files:
            try:
                readers.append(pa.ipc.open_stream(pa.memory_map(f)))
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{f}: not an Arrow IPC stream ({e})") from None

        def batches():
            for reader in readers:
                yield from reader
        schemas = [r.schema for r in readers]
        count = 0
    else:
        # Memory: Parquet decodes a whole data page at a time, so a file written with all of
        # its base64 maps in one page is held once, whatever the batch size.
        try:
            files = [pa.parquet.ParquetFile(f, buffer_size=1 << 20) for f in src.files]
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{src.where}: not a readable Parquet file ({e})") from None
        sizes = []
        for pf in files:    # rows per batch from the mean row size: a few for ReasonMap's maps
            meta = pf.metadata
            size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            rows = max(1, min(1024, RELEASE_BATCH_BYTES * max(1, meta.num_rows) // max(1, size)))
            sizes.append(rows)

        def batches():
            for pf, rows in zip(files, sizes):
                yield from pf.iter_batches(batch_size=rows)
        schemas = [pf.schema_arrow for pf in files]
        count = sum(-(-pf.metadata.num_rows // rows) for pf, rows in zip(files, sizes))
    for f, schema in zip(src.files, schemas):
        if not schema.equals(schemas[0], check_metadata=False):
            raise ValueError(f"{f}: its columns differ from those of {src.files[0]}")
    return schemas[0], batches(), count


def _arrow_kind(pa, t):
    if pa.types.is_dictionary(t):
        t = t.value_type
    for kind, test in (("string", lambda: pa.types.is_string(t) or pa.types.is_large_string(t)),
                       ("binary", lambda: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
                       ("int", lambda: pa.types.is_integer(t)), ("float", lambda: pa.types.is_floating(t)),
                       ("bool", lambda: pa.types.is_boolean(t)), ("struct", lambda: pa.types.is_struct(t)),
                       ("map", lambda: pa.types.is_map(t)), ("null", lambda: pa.types.is_null(t)),
                       ("list", lambda: pa.types.is_list(t) or pa.types.is_large_list(t))):
        if test():
            return kind
    return str(t)


def _release_format(schema, where):
    """('ReasonMap-Plus/Train' | 'ReasonMap', unused columns); ValueError naming the file and the
    column for a missing column or one whose Arrow type cannot hold what it should."""
    pa = _arrow()
    names = list(schema.names)
    if "question_short" in names or "question_long" in names:
        fmt = "ReasonMap"
    elif "question" in names:
        fmt = "ReasonMap-Plus/Train"
    else:
        raise ValueError(f"{where}: neither a column 'question' (ReasonMap-Plus, ReasonMap-Train) "
                         f"nor 'question_short'/'question_long' (ReasonMap); columns: {names}")
    needed, optional = _RELEASE_COLUMNS[fmt]
    unused = [c for c in names if c not in needed + optional]
    for column in needed:
        if column not in names:
            raise ValueError(f"{where}: no column {column!r} ({fmt} needs {', '.join(needed)})"
                             + (f"; columns not understood: {unused}" if unused else ""))
    for column in names:
        if column in unused:
            continue
        allowed = _COLUMN_KINDS.get(column, ("string",)) + (("null",) if column in optional else ())
        kind = _arrow_kind(pa, schema.field(column).type)
        if kind not in allowed:
            raise ValueError(f"{where}: column {column!r} has Arrow type "
                             f"{schema.field(column).type}, expected {' or '.join(allowed)}")
    return fmt, unused


def _release_int(value):
    """An int from 3, 3.0 or '3' (pandas stores an int column with gaps as floats); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return value if isinstance(value, int) else None


def _release_answer(kind, value):
    """The int answer in our encoding (data.py's records): TorF 1/0 -> 'yes'/'no', Counting1 0-3 ->
    'A'-'D', counts as ints, planning None. 'yes'/'no' and letters already decoded pass as they are."""
    if kind == "planning":
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    number = _release_int(value)
    if kind in ("TorF1", "TorF2"):
        if value is True or number == 1 or text in ("yes", "true"):
            return "yes"
        if value is False or number == 0 or text in ("no", "false"):
            return "no"
        raise _Lost(f"{kind} answer is not 1/0", repr(value))
    if kind == "Counting1":
        if text in ("a", "b", "c", "d"):
            return text.upper()
        if number in (0, 1, 2, 3):
            return "ABCD"[number]
        raise _Lost("Counting1 answer is not 0-3", repr(value))
    if number is None or number < 0:
        raise _Lost(f"{kind} answer is not a count", repr(value))
    return number


def _release_options(question):
    """Counting1's four numbers from the question text ('A) 8 \\nB) 1 \\nC) 25 \\nD) 12');
    the last mention of each letter wins (the options close the question)."""
    found = {letter: int(n) for letter, n in _OPTION.findall(question)}
    if sorted(found) != ["A", "B", "C", "D"]:
        raise _Lost("Counting1 options A-D not found in the question", question[-80:])
    return [found[c] for c in "ABCD"]


def _release_line(question, metro, city, s1):
    """TorF2's line: the one Metro Data line the question names ('Line 12' is not 'Line 1')."""
    lines, found = list(metro), set()
    text = re.sub(re.escape(s1), " ", question, flags=re.I) if s1 else question
    for line in sorted(lines, key=len, reverse=True):     # whole names first, longest first
        if len(line) >= 3:
            whole = re.compile(r"(?<!\w)" + re.escape(line) + r"(?!\w)", re.I)
            if whole.search(text):
                found.add(line)
                text = whole.sub(" ", text)
    found.update(filter(None, (service_line(m.group(), lines, city)
                               for m in _LINE_MENTION.finditer(text))))
    if len(found) != 1:
        raise _Lost("TorF2: no single Metro Data line named in the question",
                    f"{sorted(found)} in {question[:120]!r}")
    return found.pop()


def _release_template(question):
    """Which planning template a question uses (RM App. A.1; the release marks none):
    'Number of Via Stops' -> long1, 'Via Stops' -> long2, else short."""
    text = question.lower()
    return "long1" if "number of via stops" in text else "long2" if "via stops" in text else "short"


def _release_plans(value):
    """Reference plans as lists of segment dicts, whatever Arrow made of them: an object of plans
    (main.py iterates routes.items(); a struct column fills absent plans with null), a map (pairs),
    a list of plans, one plan, or JSON text of any of these."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Lost("routes is not JSON", value[:80]) from None
    if isinstance(value, dict):
        plans = list(value.values())
    elif isinstance(value, list) and value and all(isinstance(x, tuple) for x in value):
        plans = [v for _, v in value]
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        plans = [value]
    elif isinstance(value, list):
        plans = value
    else:
        raise _Lost("routes is not a list or an object of plans", repr(value)[:80])
    plans = [p for p in plans if p]
    if not plans or not all(isinstance(p, list) and all(isinstance(s, dict) for s in p) for p in plans):
        raise _Lost("no reference route (each a list of segments)", repr(value)[:80])
    return plans


def _release_segment(seg, metro, city, note):
    """A map service's segment in Metro Data names: the line via reward.service_line, stops as the
    line writes them, via stops from the service or else the line's own ride. What cannot be
    matched is kept as written (it scores like a wrong name, as in ReasonMap's evaluator)."""
    name, dep, arr = (seg.get(k) for k in ("route_name", "departure_stop", "arrival_stop"))
    if not all(isinstance(x, str) and x.strip() for x in (name, dep, arr)):
        raise _Lost("a reference segment lacks route_name, departure_stop or arrival_stop", repr(seg)[:80])
    via = [clean_name(v) for v in seg.get("via_stops") or () if isinstance(v, str) and v.strip()]
    dep, arr, line = clean_name(dep), clean_name(arr), service_line(name, list(metro), city)
    if line is None:
        note("reference route name matches no Metro Data line (kept as written)", name)
        return {"route_name": name.strip(), "departure_stop": dep, "arrival_stop": arr, "via_stops": via}
    on_line = {normalize_stop(s): s for s in metro[line]}
    if normalize_stop(dep) not in on_line or normalize_stop(arr) not in on_line:
        note("reference stop not on its Metro Data line (kept as written)", f"{dep} / {arr} on {line}")
    dep, arr = on_line.get(normalize_stop(dep), dep), on_line.get(normalize_stop(arr), arr)
    if via:
        via = [on_line.get(normalize_stop(v), v) for v in via]
    elif dep in metro[line] and arr in metro[line] and normalize_stop(dep) != normalize_stop(arr):
        via = ride(metro, line, dep, arr)
        given = _release_int(seg.get("num_via_stops"))
        if given is not None and given != len(via):
            note("num_via_stops differs from the Metro Data ride (ride kept)", f"{given} vs {len(via)}")
    return {"route_name": line, "departure_stop": dep, "arrival_stop": arr, "via_stops": via}


def _release_routes(value, metro, city, note):
    plans = _release_plans(value)
    if len(plans) > 3:     # our records keep at most 3 reference routes
        note("more than 3 reference routes: the first 3 kept", str(len(plans)))
    return [[_release_segment(seg, metro, city, note) for seg in plan] for plan in plans[:3]]


def _release_difficulty(value):
    level = {"medium": "middle"}.get(str(value).strip().lower(), str(value).strip().lower())
    if level not in DIFFICULTIES:
        raise _Lost("difficulty_city is not easy/middle/hard", repr(value))
    return level


def _release_station(value):
    return clean_name(value) if isinstance(value, str) and value.strip() else None


class _Release:
    """One `tools/release.py` run: a city's Metro Data and map, found or decoded once."""

    def __init__(self, maps_dir, stations_dir, out_dir):
        self.maps, self.stations, self.out = maps_dir, stations_dir, out_dir
        self.cities, self.decoded, self.found = {}, {}, {}

    def city(self, row, base):
        """(country, city, metro, names not to transfer at) from --stations, else the row's json."""
        country, city = (str(row.get(k) or "").strip() for k in ("country", "city"))
        if not all(re.fullmatch(r"\w[\w.-]*", name) for name in (country, city)):
            raise _Lost("country/city is not a folder-style name", f"{country!r}/{city!r}")
        key = (country, city)
        if key not in self.cities:
            try:
                path = os.path.join(self.stations, country, city + ".json")
                raw = load_metro_raw(path) if os.path.isfile(path) else \
                    self._metro_from(row.get("json"), base, path)
                metro = {line: [clean_name(s) for s in stops] for line, stops in raw.items()}
                self.cities[key] = (metro, ambiguous_stops(raw))
            except (ValueError, OSError) as e:
                self.cities[key] = str(e)
        if isinstance(self.cities[key], str):
            raise _Lost("no Metro Data for the city", self.cities[key])
        return (country, city) + self.cities[key]

    def _metro_from(self, value, base, looked):
        where = f"not at {looked}; the row's 'json'"
        if isinstance(value, list):                    # an Arrow map: (line, stops) pairs
            value = dict(value)
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e})") from None
        elif isinstance(value, str) and value.strip():   # a path, e.g. ./stations/china/beijing.json
            text = value.strip()
            tail = text.replace("\\", "/").split("stations/")[-1]
            for path in (text, os.path.join(base, text), os.path.join(self.stations, tail)):
                if os.path.isfile(path):
                    return load_metro_raw(path)
            raise ValueError(f"{where} path {text!r} is not a file")
        if not isinstance(value, dict):
            raise ValueError(f"{where} is {type(value).__name__}, not Metro Data")
        # an Arrow struct holds every city's line names, null where the city has no such line
        raw = {line: stops for line, stops in value.items() if stops is not None}
        check_metro(raw, where)
        return raw

    def figure(self, country, city, value_of, base, note):
        """Absolute path of the row's map. value_of() is only called when the city's map was not
        decoded yet: ReasonMap repeats its map in every row, base64 PNG text without a `data:`
        prefix, ~6-7 MB a row."""
        key = (country, city)
        if key in self.decoded:
            return self.decoded[key]
        value = value_of()
        if isinstance(value, dict):                      # datasets' Image feature
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return self._save(key, bytes(value))
        text = value.strip() if isinstance(value, str) else ""
        if not text:
            raise _Lost("no figure")
        if len(text) < 4096 and re.search(r"\.(png|jpe?g)$", text, re.I):
            return self._find(text, key, base, note)
        try:
            data = base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text)
        except ValueError:                               # binascii.Error
            raise _Lost("figure is neither a map path nor base64 image data", text[:60]) from None
        return self._save(key, data)

    def _find(self, text, key, base, note):
        """./maps/<country>/<city>.png under --maps (or beside the input file); failing that,
        --maps/<country>/<city>.<ext> with a note, for paths written on the authors' machines."""
        if (text, key) not in self.found:
            rel = text[2:] if text.startswith("./") else text
            places = [rel] if os.path.isabs(rel) else []
            if rel.replace("\\", "/").startswith("maps/"):
                places.append(os.path.join(self.maps, rel[5:]))
            places += [os.path.join(self.maps, rel), os.path.join(base, rel)]
            path = next((p for p in places if os.path.isfile(p)), None)
            by_city = os.path.join(self.maps, *key[:1], key[1] + os.path.splitext(rel)[1])
            if path is None and os.path.isfile(by_city):
                path = by_city
            self.found[(text, key)] = (path and os.path.abspath(path), path == by_city)
        path, by_city = self.found[(text, key)]
        if path is None:
            raise _Lost("map file not found (--maps)", text)
        if by_city:
            note("map found by country/city, not at its figure path", text)
        return path

    def _save(self, key, data):
        ext = next((e for magic, e in _IMAGE_MAGIC if data.startswith(magic)), None)
        if ext is None:
            raise _Lost("figure data is not a PNG or JPEG image", repr(data[:16]))
        path = os.path.abspath(os.path.join(self.out, "maps", key[0], key[1] + ext))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
        self.decoded[key] = path
        return path


def _release_record(kind, rid, question, answer, row, run, place, **kw):
    """A record (data.make_record) for one question of a row; place = (country, city, metro, map)."""
    country, city, metro, map_path = place
    counts = (_release_int(row.get("city_line_count")), _release_int(row.get("city_transfer_count")))
    rec = make_record(kind, 0, question, answer, city=city, country=country,
                  difficulty=_release_difficulty(row["difficulty_city"]),
                  figure=os.path.relpath(map_path, run.out).replace(os.sep, "/"), metro=metro,
                  counts=counts, **kw)
    rec["id"] = rid
    if row.get("difficulty_question") is not None:
        rec["difficulty_question"] = row["difficulty_question"]
    return rec


def _plus_records(row, figure, rid, run, note, base):
    """A ReasonMap-Plus / ReasonMap-Train row -> [record]."""
    kind = _RELEASE_TYPES.get(str(row["type"]).strip().lower())
    if kind is None:
        raise _Lost("unknown type", repr(row["type"]))
    question = row["question"] if isinstance(row["question"], str) else ""
    if not question.strip():
        raise _Lost("empty question")
    country, city, metro, avoid = run.city(row, base)
    place = (country, city, metro, run.figure(country, city, figure, base, note))
    s1, s2 = _release_station(row.get("station_1")), _release_station(row.get("station_2"))
    answer = _release_answer(kind, row["answer"])
    qtc = _release_int(row.get("question_transfer_count"))
    qtc = qtc if qtc is not None and qtc >= 0 else None
    kw = dict(s1=s1, s2=s2, qtc=qtc)
    if kind == "Counting1":
        kw["options"] = _release_options(question)
    elif kind == "TorF2":     # the line is in station_2 (if that names no stop) or in the text
        stops = {normalize_stop(s) for line_stops in metro.values() for s in line_stops}
        line = service_line(s2, list(metro), city) if s2 and normalize_stop(s2) not in stops else None
        kw["s2"] = None if line else s2
        kw["line"] = line or _release_line(question, metro, city, s1)
    elif kind == "planning":
        if not (s1 and s2):
            raise _Lost("planning row without station_1 and station_2")
        if row.get("routes") is not None:
            kw["routes"] = _release_routes(row["routes"], metro, city, note)
        else:
            kw["routes"] = best_routes(metro, s1, s2, limit=3, no_transfer_at=avoid) or \
                best_routes(metro, s1, s2, limit=3)
            note("reference routes from the route oracle (the row has none)")
            if not kw["routes"]:
                raise _Lost("no route between station_1 and station_2 in the Metro Data")
        if qtc is None:
            kw["qtc"] = min(len(route) for route in kw["routes"]) - 1
        kw["template"] = _release_template(question)
    return [_release_record(kind, rid, question, answer, row, run, place, **kw)]


def _reasonmap_records(row, figure, rid, run, note, base):
    """A ReasonMap row -> [short record, long record] (RM App. A.1: each question asked twice)."""
    texts = [row[k] if isinstance(row[k], str) else "" for k in ("question_short", "question_long")]
    if not all(t.strip() for t in texts):
        raise _Lost("empty question_short or question_long")
    s1, s2 = _release_station(row["station_1"]), _release_station(row["station_2"])
    if not (s1 and s2):
        raise _Lost("empty station_1 or station_2")
    country, city, metro, _ = run.city(row, base)
    place = (country, city, metro, run.figure(country, city, figure, base, note))
    routes = _release_routes(row["routes"], metro, city, note)
    qtc = _release_int(row.get("question_transfer_count"))
    if qtc is None or qtc < 0:
        qtc = min(len(route) for route in routes) - 1
        note("question_transfer_count missing: fewest transfers of the reference routes")
    # main.py: a long question asks "Number of Via Stops" (long1) or else "Via Stops" (long2)
    long = "long1" if "number of via stops" in texts[1].lower() else "long2"
    return [_release_record("planning", f"{rid}/{part}", text, None, row, run, place, s1=s1, s2=s2,
                            qtc=qtc, routes=routes, template=template)
            for part, text, template in (("short", texts[0], "short"), ("long", texts[1], long))]


def _tally(table, reason, example, n=1):
    entry = table.setdefault(reason, [0, example])
    entry[0] += n


def _release_file(src, run, max_lost):
    """Import one source; returns its summary dict. Nothing is written when too much is lost."""
    schema, batches, count = _open_source(src)
    fmt, unused = _release_format(schema, src.where)
    convert, per_row = (_reasonmap_records, 2) if fmt == "ReasonMap" else (_plus_records, 1)
    base = os.path.dirname(os.path.abspath(src.files[0]))
    out_base = os.path.abspath(run.out)
    records, lost, notes, figure_ok, n_rows = [], {}, {}, {}, 0
    for batch in progress(batches, f"import {src.name}", count):
        figures = batch.column("figure")   # read per row, only when a city's map is still needed
        columns = {c: batch.column(c).to_pylist() for c in batch.schema.names if c != "figure"}
        for i in range(batch.num_rows):
            rid = f"{src.dataset}/{src.split}/{n_rows}"
            n_rows += 1
            row = {c: values[i] for c, values in columns.items()}

            def note(reason, detail="", rid=rid):
                _tally(notes, reason, f"{rid}: {detail}" if detail else rid)
            try:
                made = convert(row, lambda i=i: figures[i].as_py(), rid, run, note, base)
            except _Lost as e:
                _tally(lost, e.reason, f"{rid}: {e.detail}" if e.detail else rid, per_row)
                continue
            for rec in made:
                problem = check_record(rec, out_base, figure_ok)
                if problem:    # our mapping made something load_records would refuse
                    _tally(lost, f"record check: {problem}", rec["id"])
                else:
                    records.append(rec)
    if n_rows == 0:
        raise ValueError(f"{src.where}: no rows")
    expected = n_rows * per_row
    summary = {"source": src.where, "dataset": src.dataset, "format": fmt, "rows": n_rows,
               "records": records, "lost": lost, "notes": notes, "unused_columns": unused,
               "path": os.path.join(run.out, src.name + ".jsonl")}
    n_lost = expected - len(records)
    if n_lost > max_lost * expected:
        raise ValueError(f"{src.where}: {n_lost} of {expected} records could not be mapped, more "
                         f"than the {max_lost:.1%} allowed (--max-lost); nothing written for it\n"
                         + _release_lines(summary, "lost"))
    write_jsonl(summary["path"] + ".part", records)
    os.replace(summary["path"] + ".part", summary["path"])
    return summary


def _release_lines(summary, key):
    label = {"lost": "lost", "notes": "note"}[key]
    return "\n".join(f"  {label}: {n} x {reason} (first: {example})"
                     for reason, (n, example) in sorted(summary[key].items(), key=lambda kv: -kv[1][0]))


def release_report(summary):
    """What `tools/release.py` prints for one file: rows, records per type (and template), every
    loss and note by reason with its count and first example, and the columns not used."""
    recs = summary["records"]
    by_type = collections.Counter(r["type"] for r in recs)
    templates = collections.Counter(r["template"] for r in recs if r["type"] == "planning")
    lines = [f"{summary['source']} ({summary['format']}) -> {summary['path']}: "
             f"{summary['rows']} rows, {len(recs)} records",
             "  " + "  ".join(f"{t}={by_type[t]}" for t in TYPES if by_type[t])
             + (" (" + " ".join(f"{t}={templates[t]}" for t in TEMPLATE_NAMES if templates[t])
                + ")" if templates else "")]
    lines += [x for x in (_release_lines(summary, "lost"), _release_lines(summary, "notes")) if x]
    if summary["unused_columns"]:
        lines.append(f"  columns not used: {', '.join(summary['unused_columns'])}")
    return "\n".join(lines)


def release(paths, maps_dir, stations_dir, out_dir, max_lost=RELEASE_MAX_LOST, report=None):
    """The authors' released files -> OUT/<name>.jsonl, one per file and split (name: the file's
    stem, or <folder>-<split> for a save_to_disk folder), each loadable by load_records.

    Record ids are <dataset>/<split>/<row>[/short|/long]; metro comes from --stations (else the
    row's `json`); figures point at maps under --maps, or at maps decoded into OUT/maps/.
    Returns one summary per file (release_report prints it; `report` is called with each as it
    is done). ValueError naming the file (and the column) when a file cannot be read, or when more
    than max_lost of its records cannot be mapped; files imported before it stay written."""
    _arrow()
    sources = [src for path in paths for src in _release_sources(path)]
    names = {}
    for src in sources:
        if src.name in names:
            raise ValueError(f"{names[src.name]} and {src.where} would both be written to "
                             f"{src.name}.jsonl: import them into different --out folders")
        names[src.name] = src.where
    os.makedirs(out_dir, exist_ok=True)
    run = _Release(maps_dir, stations_dir, out_dir)
    summaries = []
    for src in sources:
        summaries.append(_release_file(src, run, max_lost))
        if report:
            report(summaries[-1])
    return summaries


# ---------------------------------------------------------------------------------------------
# ReasonMap-Plus against the paper's totals

# App. A.1: ReasonMap-Plus holds 4,018 questions, by type, by map difficulty and by split (the 11
# test cities of ReasonMap make the test split).
APP_A1_COUNTS = {
    "type": {"Counting1": 1050, "Counting2": 970, "Counting3": 30, "TorF1": 1039, "TorF2": 929},
    "difficulty_city": {"easy": 1259, "middle": 1342, "hard": 1417},
    "split": {"test": 1448, "train": 2570},
}


def app_a1_totals(records):
    """{"type" | "difficulty_city" | "split": Counter} of records (ids: dataset/split/row)."""
    return {"type": collections.Counter(r["type"] for r in records),
            "difficulty_city": collections.Counter(r["difficulty_city"] for r in records),
            "split": collections.Counter(r["id"].split("/")[1] for r in records)}


def check_app_a1(records):
    """One message per count that differs from App. A.1 (APP_A1_COUNTS), naming expected and found;
    [] when every count matches."""
    found, out = app_a1_totals(records), []
    for key, want in APP_A1_COUNTS.items():
        for name in list(want) + sorted(set(found[key]) - set(want)):
            if found[key][name] != want.get(name, 0):
                out.append(f"{key} {name}: App. A.1 has {want.get(name, 0):,}, "
                           f"found {found[key][name]:,}")
    return out


def app_a1_report(records):
    """The totals check_app_a1 compares, each with App. A.1's figure in brackets."""
    found = app_a1_totals(records)
    lines = [f"ReasonMap-Plus totals (App. A.1 in brackets): {len(records):,} questions (4,018)"]
    for key, want in APP_A1_COUNTS.items():
        names = list(want) + sorted(set(found[key]) - set(want))
        lines.append(f"  {key}: " + "  ".join(f"{n}={found[key][n]:,} ({want.get(n, 0):,})"
                                             for n in names))
    return "\n".join(lines)


def is_reasonmap_plus(summary):
    """Whether an imported file is ReasonMap-Plus (its folder's name, as the authors' download
    script saves FSCCS/ReasonMap-Plus) rather than ReasonMap-Train or ReasonMap."""
    return summary["dataset"].lower() == "reasonmap-plus" and summary["format"] != "ReasonMap"


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description="the authors' released datasets (ReasonMap-Plus, "
                                "ReasonMap-Train, ReasonMap) -> OUT/<name>.jsonl; needs pyarrow")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a .parquet file, a save_to_disk folder, or a folder of either")
    p.add_argument("--maps", required=True, help="the RewardMap repository's maps/ folder")
    p.add_argument("--stations", required=True, help="the ReasonMap repository's stations/ folder")
    p.add_argument("--out", required=True)
    p.add_argument("--max-lost", type=float, default=RELEASE_MAX_LOST,
                   help="fail a file if more than this share of its records cannot be mapped")
    a = p.parse_args(argv)
    try:
        summaries = release(a.paths, a.maps, a.stations, a.out, max_lost=a.max_lost,
                            report=lambda summary: print(release_report(summary), flush=True))
    except (ValueError, ImportError) as e:
        sys.exit(f"tools/release.py: {e}")
    plus = [r for s in summaries if is_reasonmap_plus(s) for r in s["records"]]
    if plus:
        print(app_a1_report(plus), flush=True)
        for problem in check_app_a1(plus):
            print(f"tools/release.py: warning: ReasonMap-Plus differs from App. A.1: {problem}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
