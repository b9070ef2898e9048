"""Every test of the project, in one file.

    python test_all.py            # the whole suite; last line "N passed, N failed[, N skipped]"
    python test_all.py reward     # only tests whose name contains "reward"
    python -m pytest test_all.py  # the same tests under pytest

Tests assert values worked out by hand or re-derived independently; none asserts a timing.
Tests that need ../shared/reasonmap skip cleanly when it is absent.
"""
import os
import sys
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REASONMAP = os.path.join(HERE, "..", "shared", "reasonmap")


def skip(reason):
    """Skip the running test (unittest.SkipTest is understood by pytest too)."""
    raise unittest.SkipTest(reason)


def need_reasonmap():
    if not os.path.isdir(os.path.join(REASONMAP, "stations")):
        skip("../shared/reasonmap is absent")
    return REASONMAP


# ---------------------------------------------------------------------------------------------
# DEV (removed at merge): while components are built in parallel, each keeps its tests in
# _tests_<component>.py; they are folded into this file before release.
import importlib
for _name in ("_tests_data", "_tests_reward", "_tests_grpo", "_tests_train", "_tests_eval"):
    if os.path.exists(os.path.join(HERE, _name + ".py")):
        _mod = importlib.import_module(_name)
        globals().update({k: v for k, v in vars(_mod).items() if k.startswith("test_")})


# ---------------------------------------------------------------------------------------------
# The runner: discover test_* functions in this module, run them in file order.

def main(argv):
    pattern = argv[1] if len(argv) > 1 else ""
    module = sys.modules[__name__]
    tests = [(name, fn) for name, fn in vars(module).items()
             if name.startswith("test_") and callable(fn) and pattern in name]
    tests.sort(key=lambda t: t[1].__code__.co_firstlineno if t[1].__module__ == __name__ else 10**9)
    passed = failed = skipped = 0
    for name, fn in tests:
        try:
            fn()
        except unittest.SkipTest as e:
            skipped += 1
            print(f"SKIP {name}: {e}")
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
        else:
            passed += 1
            print(f"ok   {name}", flush=True)
    summary = f"{passed} passed, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped"
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
