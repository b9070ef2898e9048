"""RewardMap's reward (§4.2, Alg. 1 in App. B.1) and ReasonMap's scoring (RM §B.1-B.3).

    R = W · (R_format + R_correctness + α·R_detail)                                  (§4.2)
    W = γ[map difficulty] (+ β for a planning question whose best route transfers)
    R_format ∈ {0, 1}, R_correctness ∈ {0, 10}, R_detail: Alg. 1 (planning only), at most 10

Shared by train.py (rewards for GRPO) and eval.py (accuracy, map score): one parser, one scorer.
The file reads in that order: constants and weights, the reward, Alg. 1, then parsing the
answers, matching names, and ReasonMap's map score (RM Alg. 2, evaluation only). No torch, no
model code, never evaluates model text; everything that reads model text takes any string of any
size (or even a non-string) and never raises; only a malformed *record* raises, with a ValueError
naming the field. Where this departs from the paper or the release: docs/deviations.md, "Reward".

    from reward import compute_reward, explain, map_score
    compute_reward(response, record)   # {"format", "correctness", "detail", "weight", "total"}
    explain(response, record)          # the same, plus "trace": the Alg. 1 lines that fired
    python test_all.py reward          # its tests
"""
import functools
import re
import unicodedata


# ---------------------------------------------------------------------------------------------
# Constants of the paper (§4.2; App. C.1; RM §B.3)

PLUS_TYPES = ("TorF1", "TorF2", "Counting1", "Counting2", "Counting3")
TYPES = PLUS_TYPES + ("planning",)
DIFFICULTIES = ("easy", "middle", "hard")  # map difficulty (difficulty_city)
TEMPLATE_NAMES = ("short", "long1", "long2")  # long1 asks "Number of Via Stops: N", long2 "Via Stops: ..."
GAMMA = {"easy": 1.0, "middle": 1.2, "hard": 1.5}       # §4.2 map difficulty γ
BETA_TRANSFER = 0.5                                     # §4.2 β for routes with a transfer
PLUS_EVAL_WEIGHT = {"easy": 1.0, "middle": 1.5, "hard": 2.0}   # App. C.1, ReasonMap-Plus
LEVEL = {"easy": 0, "middle": 1, "hard": 2}             # RM §B.3, m
CORRECT = 10.0                                          # the released code's scale


# ---------------------------------------------------------------------------------------------
# Weights: the training weight W of §4.2 and the two evaluation weights of RM §B.3 / App. C.1.

def difficulty_weight(record):
    """W = γ[map difficulty] (+ β = 0.5 for a planning question whose best route transfers)."""
    weight = GAMMA[_difficulty(record)]
    if _type(record) == "planning" and _transfers(record) > 0:
        weight += BETA_TRANSFER
    return weight


def plus_weight(record):
    """ReasonMap-Plus evaluation weight: 1.0 / 1.5 / 2.0 for easy / middle / hard maps."""
    return PLUS_EVAL_WEIGHT[_difficulty(record)]


def reasonmap_weight(record):
    """RM §B.3: 1 + 0.5·q + 0.5·m, q = 0/1/2 for 0/1/>=2 transfers, m = 0/1/2 for map level."""
    return 1.0 + 0.5 * min(_transfers(record), 2) + 0.5 * LEVEL[_difficulty(record)]


# ---------------------------------------------------------------------------------------------
# The reward (§4.2): R = W · (R_format + R_correctness + α·R_detail).

def compute_reward(response, record, *, alpha=0.5, difficulty_aware=True, detail=True):
    """Reward parts for one response. format ∈ {0,1}, correctness ∈ {0,10}, detail (planning,
    Alg. 1, <= 10, may be negative; 0 when detail=False), weight (1 when difficulty_aware=False),
    total = weight * (format + correctness + alpha * detail).
    Deviation: R_format kept, as in the paper, not dropped as released (docs/deviations.md)."""
    return _reward(response, record, alpha, difficulty_aware, detail, None)


def explain(response, record, *, alpha=0.5, difficulty_aware=True, detail=True):
    """compute_reward's dict plus "trace": [(points, reason), ...]. Planning: every line of Alg. 1
    that fired, in order (the cap included), so the points sum to "detail" exactly. Other types:
    one line, the parsed answer against the gold one (0 points: they have no detail term)."""
    trace = []
    out = _reward(response, record, alpha, difficulty_aware, detail, trace)
    out["trace"] = trace
    return out


def _reward(response, record, alpha, difficulty_aware, detail, trace):
    kind = _type(record)
    weight = difficulty_weight(record) if difficulty_aware else 1.0
    if kind == "planning":
        sections = _sections(response)
        correct, det = _planning(record, sections, trace if detail else None)
        fmt = 1.0 if sections else 0.0
        if trace is not None and not detail:
            trace.append((0.0, "detail reward off (the --no-detail ablation)"))
    else:
        expected = _plus_expected(record, kind)
        box = parse_boxed(response)
        fmt = 1.0 if box is not None and box.strip() else 0.0
        answer = _plus_answer(kind, box)
        correct, det = answer == expected, 0.0
        if trace is not None:
            trace.append((0.0, _plus_reason(box, answer, expected)))
    det = det if detail else 0.0
    cor = CORRECT if correct else 0.0
    return {"format": fmt, "correctness": cor, "detail": det, "weight": weight,
            "total": weight * (fmt + cor + alpha * det)}


def _plus_reason(box, answer, expected):
    if box is None:
        got = "no \\boxed{} answer"
    elif answer is None:
        got = f"boxed {_quote(box)} does not parse as an answer of this type"
    else:
        got = f"answer {answer!r}"
    return f"{got}; gold {expected!r}: " + ("right" if answer == expected else "wrong")


# ---------------------------------------------------------------------------------------------
# Alg. 1 (§4.2, App. B.1): the detail reward of a planning answer, with ReasonMap's own check of
# a correct route (RM §B.1).

def _planning(record, sections, trace=None):
    """(correct, detail) for parsed sections; the official check (RM §B.1) and Alg. 1.
    Lines and stops match after normalisation, so "1号线" and "Line 1" are one line (Deviation:
    the release looks names up verbatim; docs/deviations.md). Optimality is not checked (nor there).
    trace: a list that receives each Alg. 1 line that fires as (points, reason), for explain();
    compute_reward passes None, and then only a fired line pays one `is not None` test."""
    lookup = _metro_lookup(record.get("metro"))
    s1 = _stop_key(_need(record, "station_1", str, "a stop name"))
    s2 = _stop_key(_need(record, "station_2", str, "a stop name"))
    transfers = _transfers(record)
    if not sections:
        if trace is not None:
            trace.append((0.0, "no section parses (Route Name, Departure Stop, Arrival Stop)"))
        return False, 0.0
    keys = _keyed(sections)
    n = len(keys)
    ok = [_route_ok(lookup, line, dep, arr) for line, dep, arr in keys]
    linked = [keys[i][2] == keys[i + 1][1] for i in range(n - 1)]
    first, last = keys[0][1] == s1, keys[-1][2] == s2
    correct = first and last and all(ok) and all(linked)

    # Deviation: Alg. 1 as printed, not as released (docs/deviations.md).
    score = 2.0 if first or last else 0.0
    if score and trace is not None:
        trace.append((2.0, _endpoint_reason(record, first, last)))
    for i in range(n):                     # i = transfers made before segment i
        if i > transfers:
            score -= 5.0
            if trace is not None:
                trace.append((-5.0, f"segment {i + 1} follows transfer {i}, more than the "
                                    f"question's fewest ({transfers})"))
        if i == 0 and ok[0]:
            score += 4.0
            if trace is not None:
                trace.append((4.0, f"segment 1: route name {_quote(sections[0][0])} exists and "
                                   "serves both its stops"))
        if ok[i] and i < n - 1 and linked[i]:
            score += 1.0
            if trace is not None:
                trace.append((1.0, f"segment {i + 1} is on its line and arrives where segment "
                                   f"{i + 2} departs ({_quote(sections[i][2])})"))
    if score > 10.0 and trace is not None:
        trace.append((10.0 - score, "cap at 10"))
    return correct, min(score, 10.0)      # no lower bound, as printed


def _quote(text, limit=60):
    """Model text inside a trace line: quoted, at most `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _endpoint_reason(record, first, last):
    departure = f"departure matches station_1 ({record['station_1']!r})"
    arrival = f"arrival matches station_2 ({record['station_2']!r})"
    return f"{departure} and {arrival}" if first and last else departure if first else arrival


# ---------------------------------------------------------------------------------------------
# ReasonMap-Plus answers: the last \boxed{...}.

# One pass over "\boxed{", "{" and "}" with a stack, so 20k nested braces or 100k unclosed boxes
# stay linear. "boxed{" without the backslash counts too, as in the released code ('oxed{').
_BOX_TOKENS = re.compile(r"(\\?boxed[ \t]*\{|[{}])")


def parse_boxed(response):
    """Content of the last complete \\boxed{...} (the one opened last), braces balanced; or None."""
    if not isinstance(response, str):
        return None
    start = response.find("boxed")
    if start < 0:
        return None
    parts = _BOX_TOKENS.split(response[max(start - 1, 0):])   # text, token, text, token, ...
    stack, best = [], None
    for k in range(1, len(parts), 2):
        token = parts[k]
        if token == "}":
            if stack:
                opened = stack.pop()
                if opened > 0 and (best is None or opened > best[0]):
                    best = (opened, k)
        else:
            stack.append(k if token != "{" else -k)
    if best is None:
        return None
    return "".join(parts[best[0] + 1:best[1]])


_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_YES_NO = re.compile(r"[^\w]*(yes|no)(?!\w)", re.I)
_LETTER = re.compile(r"[^\w]*(?:option[ \t]*)?\(?([A-Da-d])(?![\w])", re.I)
_INTEGER = re.compile(r"[+]?(\d{1,9})(?:[ \t]*[^\W\d_][^\d]*)?")


def _clean_box(text):
    # \text{B}, \mathbf{12}, $12$ -> B, 12 (no LaTeX is interpreted, only stripped)
    text = _LATEX_CMD.sub(" ", text).replace("{", " ").replace("}", " ").replace("$", " ")
    return text.strip().rstrip(".").strip()


def _plus_answer(kind, box):
    # "(B)", "B)", "Option B", "3 lines", "Yes, they are" count too; nothing else is interpreted.
    # Deviation: decorations accepted, the release's exact match is not (docs/deviations.md).
    if box is None:
        return None
    text = _clean_box(box)
    if kind in ("TorF1", "TorF2"):
        m = _YES_NO.match(text)
        return m.group(1).lower() if m else None
    if kind == "Counting1":
        m = _LETTER.match(text)          # "B", "(B)", "B)", "B. 12", "Option B"
        return m.group(1).upper() if m else None
    m = _INTEGER.fullmatch(text.replace(",", ""))   # "12", "12 lines", "1,024"
    return int(m.group(1)) if m else None


def _plus_expected(record, kind):
    answer = record.get("answer")
    if kind in ("TorF1", "TorF2"):
        if isinstance(answer, str) and answer.strip().lower() in ("yes", "no"):
            return answer.strip().lower()
    elif kind == "Counting1":
        if isinstance(answer, str) and answer.strip().upper() in ("A", "B", "C", "D"):
            return answer.strip().upper()
    elif isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    elif isinstance(answer, str) and answer.strip().isdigit():
        return int(answer.strip())
    raise ValueError(f"record {record.get('id', '?')!r}: answer {answer!r:.80} is not valid "
                     f"for type {kind}")


# ---------------------------------------------------------------------------------------------
# Planning answers (RM App. A.1): sections split on "--", each with labelled fields:
#     Route Name: Line 1
#     Departure Stop: A
#     Arrival Stop: B
#     [Number of Via Stops: 3 | Via Stops: X, Y, Z]      (long templates)
# A field's value runs to the next label or the end of the line, whichever comes first (Deviation:
# fields may share a line, as in the paper's examples; docs/deviations.md). Labels match
# ASCII-case-insensitively, markdown bold around them allowed.
# If a label repeats inside one section the first one counts. A section counts iff Route Name,
# Departure Stop and Arrival Stop all appear with non-empty values.

_LABEL = re.compile(
    r"(route[ \t]*name|departure[ \t]*stop|arrival[ \t]*stop|number[ \t]+of[ \t]+via[ \t]+stops"
    r"|via[ \t]+stops)[ \t]*+(?:\*++[ \t]*+)?[:：]", re.I | re.A)   # possessive: linear
_FIELD = {"r": 0, "d": 1, "a": 2, "n": 4, "v": 3}     # by first letter of the label
_VALUE_STRIP = " \t\r\f\v*`"
_VIA_SPLIT = re.compile(r"[,，、;；]")
_NO_VIA = {"none", "n/a", "na", "-", "—", "nil"}
_NUMBER = re.compile(r"[-−+]?\d+(?:[.,]\d+)*")   # "3", "-3", "3.5", "1,024": one number each


def _sections(response):
    """[(route, dep, arr, via_text|None, num_text|None), ...] as raw stripped strings."""
    if not isinstance(response, str):
        return []
    out = []
    for section in response.split("--"):
        if ":" not in section and "：" not in section:
            continue
        fields = [None] * 5
        parts = _LABEL.split(section)          # text, label, value, label, value, ...
        for k in range(1, len(parts), 2):
            slot = _FIELD[parts[k][0].lower()]
            if fields[slot] is None:
                value = parts[k + 1].lstrip()
                cut = value.find("\n")
                fields[slot] = (value if cut < 0 else value[:cut]).strip(_VALUE_STRIP)
        if fields[0] and fields[1] and fields[2]:
            out.append(tuple(fields))
    return out


def _via_list(text):
    """Via stop names, [] for "None"; None when the field is missing (map_score: no via credit)."""
    if text is None:
        return None
    items = [s.strip(_VALUE_STRIP + ".") for s in _VIA_SPLIT.split(text)]
    return [s for s in items if s and s.lower() not in _NO_VIA]


def _via_count(text):
    """The count in "Number of Via Stops: 3" ("about 3 stops", "3 (A, B, C)", "**3**" too), or
    None when it does not parse: missing, no digits ("three"), negative, not an integer ("3.5"),
    two numbers ("2 or 3"), over 9 digits. Unicode decimal digits count ("３", "٣" = 3).
    Deviation: the release takes the first digit run, no digits as 0 (docs/deviations.md)."""
    if text is None or len(text) > MAX_NAME:
        return None
    numbers = _NUMBER.findall(_PARENS.sub(" ", text))
    if len(numbers) != 1 or not numbers[0].isdigit() or len(numbers[0]) > 9:
        return None
    return int(numbers[0])


def parse_route(response):
    """Planning sections as dicts: route_name, departure_stop, arrival_stop, via_stops, num_via_stops."""
    return [{"route_name": r, "departure_stop": d, "arrival_stop": a,
             "via_stops": _via_list(v), "num_via_stops": _via_count(n)}
            for r, d, a, v, n in _sections(response)]


def parse_answer(response, record):
    """The parsed answer, JSON-able, for eval's answer files: 'yes'/'no', 'A'..'D', int, a list of
    segment dicts (planning), or None when nothing parses."""
    kind = _type(record)
    if kind == "planning":
        return parse_route(response) or None
    return _plus_answer(kind, parse_boxed(response))


# ---------------------------------------------------------------------------------------------
# Names: a stop or a line is "the same" after normalisation, both when data.py generates questions
# and when answers are scored (data.py imports normalize_stop).

_PARENS = re.compile(r"\([^()]*\)|（[^（）]*）|\[[^\[\]]*\]")
_NOT_WORD = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")
_STOP_SUFFIX = re.compile(r"(?:\s+station|\s*站)$")
_LINE_PREFIX = re.compile(r"^(?:line|route)")
_LINE_SUFFIX = re.compile(r"(?:line|号线|线)$")
_DIGIT_GAP = re.compile(r"(?<=\d) (?=\d)")


def fold_name(name):
    """Case, width, parentheses and punctuation folded away: what stops and lines share."""
    text = unicodedata.normalize("NFKC", str(name)).casefold()
    text = _PARENS.sub(" ", text)
    text = _NOT_WORD.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


@functools.lru_cache(maxsize=1 << 16)
def normalize_stop(name):
    """'Palmetto Station ' -> 'palmetto'; '西单站（换乘站）' -> '西单'; 'Dr. King' -> 'dr king'."""
    text = fold_name(name)
    stripped = _STOP_SUFFIX.sub("", text).strip()
    return stripped or text


@functools.lru_cache(maxsize=1 << 16)
def normalize_line(name):
    """'Line 1' = 'line1' = '1' = 'Route 1' = '1号线' -> '1'; 'Red Line' -> 'red'. Digits that
    punctuation or spaces separate stay apart: 'Line 1.0' -> '1.0', not Line 10's '10'."""
    text = _DIGIT_GAP.sub(".", fold_name(name)).replace(" ", "")
    text = _LINE_PREFIX.sub("", text) or text
    return _LINE_SUFFIX.sub("", text) or text


# Model text can put megabytes into one field. No stop or line name is this long, so such a field
# matches nothing (except the very same text elsewhere in the answer), and it never reaches the
# lru caches above. "\0" cannot occur in a normalised name (_NOT_WORD turns it into a space).
MAX_NAME = 200


def _stop_key(text):
    return normalize_stop(text) if len(text) <= MAX_NAME else "\0" + text


def _line_key(text):
    return normalize_line(text) if len(text) <= MAX_NAME else "\0" + text


# ---------------------------------------------------------------------------------------------
# Metro Data, normalised once per dict. The same metro dict is shared by every record of a city,
# so the first cache is keyed on id(metro); the entry keeps a reference to the dict itself, so that
# id cannot be reused by another dict while the entry lives (dicts take no weakrefs), and a size
# check catches a dict edited in place. Records read from JSONL each carry their own copy of the
# city's dict, so on an id miss a second cache keyed on the content (lines and stops as tuples:
# hashing them costs a fraction of normalising every stop again) finds the lookup. Both bounded.

_METRO_BY_ID = {}
_METRO_BY_CONTENT = {}
_METRO_CACHE_SIZE = 256


def _remember(cache, key, value):
    if len(cache) >= _METRO_CACHE_SIZE:
        cache.pop(next(iter(cache)))          # oldest first (dicts keep insertion order)
    cache[key] = value


def _metro_lookup(metro):
    """{normalised line: [frozenset of normalised stops, ...]} (a list: two raw line names may
    normalise alike; a segment is fine if any one of them serves both its stops)."""
    if not isinstance(metro, dict) or not metro or not all(
            isinstance(stops, (list, tuple)) for stops in metro.values()):
        raise ValueError("record field 'metro' must be a non-empty dict of line -> [stop, ...], "
                         f"got {str(metro):.80}")
    size = sum(len(stops) for stops in metro.values())
    hit = _METRO_BY_ID.get(id(metro))
    if hit is not None and hit[0] is metro and hit[1] == size:
        return hit[2]
    try:
        content = tuple((line, tuple(stops)) for line, stops in metro.items())
        lookup = _METRO_BY_CONTENT.get(content)
    except TypeError:                         # an unhashable stop: not a name
        raise ValueError("record field 'metro': stops must be strings") from None
    if lookup is None:
        lookup = {}
        for line, stops in metro.items():
            lookup.setdefault(normalize_line(line), []).append(
                frozenset(normalize_stop(s) for s in stops))
        _remember(_METRO_BY_CONTENT, content, lookup)
    _remember(_METRO_BY_ID, id(metro), (metro, size, lookup))
    return lookup


def _keyed(sections):
    return [(_line_key(r), _stop_key(d), _stop_key(a)) for r, d, a, _, _ in sections]


def _route_ok(lookup, line, dep, arr):
    for stops in lookup.get(line, ()):
        if dep in stops and arr in stops:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Map score (RM Alg. 2, evaluation only), after the released ReasonMap main.py:
#   against each reference route, if both endpoints are right: +1, then per aligned segment
#   (zip with the reference) +2 route name, +1 departure, +1 arrival; the long templates add
#     long1 "Number of Via Stops": per segment 4 if exact else max(0, 4 - 4·|err|/ref) (0 when
#       ref = 0), capped at 10; a count that does not parse (_via_count) earns 0;
#     long2 "Via Stops": (10·IoU + min(10, hits)) / 2, where hits counts answered via stops in the
#       aligned reference segment and IoU pools the via stops of segments whose line is right;
#   cap 10 (short) / 20 (long); +10 / +20 when the route is correct; best over reference routes.
# Template comes from record["template"] (None -> short).
# Deviation: names normalised, via stops in every city, no repeats (docs/deviations.md).

def map_score_max(record):
    """Best possible map score: 20 for the short template, 40 for the long ones."""
    return 40.0 if _template(record) != "short" else 20.0


def _template(record):
    template = record.get("template") if isinstance(record, dict) else None
    template = template or "short"
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"record {record.get('id', '?')!r}: template {template!r} is not one of "
                         f"{TEMPLATE_NAMES}")
    return template


def _reference(record):
    routes = record.get("routes")
    if not isinstance(routes, list) or not routes or not all(
            isinstance(route, list) and route and all(isinstance(s, dict) for s in route)
            for route in routes):
        raise ValueError(f"record {record.get('id', '?')!r}: field 'routes' must be a non-empty "
                         "list of routes, each a non-empty list of segment dicts")
    try:
        return [[(normalize_line(s["route_name"]), normalize_stop(s["departure_stop"]),
                  normalize_stop(s["arrival_stop"]),
                  frozenset(normalize_stop(v) for v in s.get("via_stops") or ()),
                  len(s.get("via_stops") or ()))
                 for s in route] for route in routes]
    except KeyError as e:
        raise ValueError(f"record {record.get('id', '?')!r}: a reference segment lacks {e}") from None


def _count_points(count, want):
    """long1, one segment: 4 if the count is exact, else max(0, 4 − 4·|err|/want), 0 when want = 0.
    A count that did not parse (None) earns 0 whatever the reference, never the points of a 0."""
    if count is None:
        return 0.0
    err = abs(count - want)
    if err == 0:
        return 4.0
    return max(0.0, 4.0 - 4.0 * err / want) if want else 0.0


def map_score(response, record):
    """RM Alg. 2 map score of a planning response (0 .. map_score_max(record))."""
    if _type(record) != "planning":
        raise ValueError(f"record {record.get('id', '?')!r}: map score is for planning records")
    template = _template(record)
    references = _reference(record)
    sections = _sections(response)
    correct, _ = _planning(record, sections)
    if not sections:
        return 0.0
    keys = _keyed(sections)
    s1, s2 = _stop_key(record["station_1"]), _stop_key(record["station_2"])
    endpoints = keys[0][1] == s1 and keys[-1][2] == s2
    if template == "long2":
        vias = [frozenset(_stop_key(v) for v in _via_list(sec[3]) or ()) for sec in sections]
    elif template == "long1":
        counts = [_via_count(sec[4]) for sec in sections]
    cap, bonus = (10.0, 10.0) if template == "short" else (20.0, 20.0)
    best = 0.0
    for reference in references:
        score = 0.0
        if endpoints:
            score += 1.0
            count_score, hits, union, inter = 0.0, 0, set(), set()
            for i, ((line, dep, arr), ref) in enumerate(zip(keys, reference)):
                score += 2.0 * (line == ref[0]) + (dep == ref[1]) + (arr == ref[2])
                if template == "long1":
                    count_score += _count_points(counts[i], ref[4])
                elif template == "long2":
                    hits += len(vias[i] & ref[3])
                    if line == ref[0]:
                        union |= vias[i] | ref[3]
                        inter |= vias[i] & ref[3]
            if template == "long1":
                score += min(10.0, count_score)
            elif template == "long2":
                iou = len(inter) / len(union) if union else 0.0
                score += (10.0 * iou + min(10, hits)) / 2.0
        score = min(score, cap) + (bonus if correct else 0.0)
        best = max(best, score)
    return best


# ---------------------------------------------------------------------------------------------
# Record checks: a bad record is a bug upstream, so it raises, naming the field.

def _need(record, key, kind, what):
    if not isinstance(record, dict):
        raise ValueError(f"record must be a dict, got {type(record).__name__}")
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"record {record.get('id', '?')!r}: field {key!r} must be {what}, "
                         f"got {value!r:.80}")
    return value


def _type(record):
    kind = _need(record, "type", str, "one of " + "/".join(TYPES))
    if kind not in TYPES:
        raise ValueError(f"record {record.get('id', '?')!r}: unknown type {kind!r}")
    return kind


def _difficulty(record):
    level = _need(record, "difficulty_city", str, "easy/middle/hard")
    if level not in GAMMA:
        raise ValueError(f"record {record.get('id', '?')!r}: difficulty_city {level!r} "
                         "is not easy/middle/hard")
    return level


def _transfers(record):
    count = _need(record, "question_transfer_count", int, "an int >= 0")
    if count < 0:
        raise ValueError(f"record {record.get('id', '?')!r}: question_transfer_count {count} < 0")
    return count
