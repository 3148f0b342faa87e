import re

import pytest

from flashmoe.utils import atomic_write_text, parse_size, read_json


def test_sizes_read_binary_units_and_refuse_what_is_not_a_size():
    assert parse_size("512M") == 512 << 20 and parse_size("1.5G") == 3 << 29 and parse_size("2GiB") == 2 << 30
    for text in ("-1G", "abc", "", "1e3G"):
        with pytest.raises(ValueError, match=f"cannot read {text!r} as a size; write it like 512M"):
            parse_size(text)
    with pytest.raises(ValueError, match="larger than any memory"):
        parse_size("9" * 400 + "T")  # was an OverflowError from int(inf)


def test_a_file_that_is_not_json_is_named_with_the_position(tmp_path):
    path = tmp_path / "x.json"
    cases = {b'{"a": [1,\n 2,': "Expecting value at line 2 column 4", b"\xff": "not UTF-8 text (byte 0)",
             b"[" * 100_000: "its values nest too deeply to read", b"1" * 5000: "it holds a number with thousands of digits"}
    for data, message in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{path} is not valid JSON: {message}; fetch it")):
            read_json(path, fix="; fetch it")


def test_an_atomic_write_that_fails_leaves_the_old_text_and_no_temporary_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
