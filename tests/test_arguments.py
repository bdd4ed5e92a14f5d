"""instdisc.arguments: one-line refusals naming the option and the value."""
import math

import pytest

from instdisc.arguments import check_choice, check_int, check_non_negative, check_positive
from instdisc.errors import InstdiscError


def test_check_int():
    check_int(1, "--k", 1)
    check_int(0, "--workers", 0)
    check_int(None, "--limit", 1, optional=True)
    for bad in (0, -3, 1.5, True, None, "2"):
        with pytest.raises(InstdiscError, match=r"^--k must be an integer >= 1, got "):
            check_int(bad, "--k", 1)


def test_check_positive_and_non_negative():
    check_positive(0.07, "--tau")
    check_positive(None, "--lr", optional=True)
    check_non_negative(0, "--weight-decay")
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(InstdiscError, match="^--tau must be a finite number > 0, got"):
            check_positive(bad, "--tau")
    for bad in (-1e-9, math.nan, math.inf):
        with pytest.raises(InstdiscError, match="^--weight-decay must be a finite number >= 0, got"):
            check_non_negative(bad, "--weight-decay")


def test_check_choice():
    check_choice("flat", "--index", ("flat", "ivf"))
    with pytest.raises(InstdiscError, match="^--index must be one of flat, ivf, got 'x'$"):
        check_choice("x", "--index", ("flat", "ivf"))
