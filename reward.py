"""RewardMap's reward (§4.2, Alg. 1) and ReasonMap's scoring (RM §B.1-B.3).

Shared by train.py (rewards for GRPO) and eval.py (accuracy, map score): one parser, one scorer.
No torch, no model code, never evaluates model text.
"""
import functools
import re
import unicodedata

# ---------------------------------------------------------------------------------------------
# Name normalisation (DESIGN.md §3). Used by data.py too, so that "the same stop" means the same
# thing when questions are generated and when answers are scored.

_PARENS = re.compile(r"\([^()]*\)|（[^（）]*）|\[[^\[\]]*\]")
_NOT_WORD = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")
_STOP_SUFFIX = re.compile(r"(?:\s+station|\s*站)$")
_LINE_PREFIX = re.compile(r"^(?:line|route)")
_LINE_SUFFIX = re.compile(r"(?:line|号线|线)$")


def _base(name):
    text = unicodedata.normalize("NFKC", str(name)).casefold()
    text = _PARENS.sub(" ", text)
    text = _NOT_WORD.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


@functools.lru_cache(maxsize=1 << 16)
def normalize_stop(name):
    """'Palmetto Station ' -> 'palmetto'; '西单站（换乘站）' -> '西单'; 'Dr. King' -> 'dr king'."""
    text = _base(name)
    stripped = _STOP_SUFFIX.sub("", text).strip()
    return stripped or text


@functools.lru_cache(maxsize=1 << 16)
def normalize_line(name):
    """'Line 1' = 'line1' = '1' = 'Route 1' = '1号线' -> '1'; 'Red Line' -> 'red'."""
    text = _base(name).replace(" ", "")
    text = _LINE_PREFIX.sub("", text) or text
    return _LINE_SUFFIX.sub("", text) or text
