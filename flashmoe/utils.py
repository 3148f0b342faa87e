"""Small helpers shared by the CLI and the runtime: sizes, memory readings, JSON files, atomic writes."""

from __future__ import annotations

import json
import os
import re
import reprlib
import resource
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = 1 << 60  # 1 EiB: past any machine's memory or disk, and well inside a 64-bit count


def parse_size(text: str) -> int:
    """'512M', '1.5G', '2GiB', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write it like 512M, 8G or 1.5GB")
    size = float(m[1]) * _UNITS[m[2]]  # a long digit string reads as inf: the bound below catches it
    if not size <= MAX_SIZE:
        raise ValueError(f"{text!r} is larger than any memory ({format_bytes(MAX_SIZE)}); write it like 512M, 8G or 1.5GB")
    return int(size)


def is_int(value: Any) -> bool:
    """An integer read from JSON, not a boolean (JSON true is a Python int too)."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_json(path: Path, error: type[ValueError] = ValueError, fix: str = "") -> Any:
    """The JSON document in `path`; one that is not JSON raises `error` naming the file and where reading
    stopped, then `fix` (what to do about it, e.g. "; download it again")."""
    return parse_json(path.read_bytes(), str(path), error, fix)


def parse_json(data: bytes, source: str, error: type[ValueError] = ValueError, fix: str = "") -> Any:
    """The JSON document in `data`, read from `source` (named in the error, as in read_json)."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise error(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{fix}") from None
    except UnicodeDecodeError as e:
        raise error(f"{source} is not valid JSON: not UTF-8 text (byte {e.start}){fix}") from None
    except RecursionError:
        raise error(f"{source} is not valid JSON: its values nest too deeply to read{fix}") from None
    except ValueError:  # the one other way json fails: an integer literal longer than Python converts
        raise error(f"{source} is not valid JSON: it holds a number with thousands of digits{fix}") from None


def _short_reprs() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxlong, r.maxother = 2, 6, 4, 40, 40, 40
    return r


short_repr = _short_reprs().repr  # a value from a file, cut short (and nested lists cut shallow) for a one-line error


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` so that it holds the old text or the new, never a part: a file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping), or 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def total_memory_bytes() -> int:
    """MemTotal from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")
