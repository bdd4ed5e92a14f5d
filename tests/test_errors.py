from instdisc.errors import InstdiscError


def test_is_value_error_with_message():
    e = InstdiscError("bad --nce-t: -1")
    assert isinstance(e, ValueError) and str(e) == "bad --nce-t: -1"
