"""DEV only: helpers the _tests_<component>.py files share; folded into test_all.py at merge."""
import os
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REASONMAP = os.path.join(HERE, "..", "shared", "reasonmap")


def skip(reason):
    raise unittest.SkipTest(reason)


def need_reasonmap():
    if not os.path.isdir(os.path.join(REASONMAP, "stations")):
        skip("../shared/reasonmap is absent")
    return REASONMAP
