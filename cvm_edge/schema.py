"""Small schema checks for JSON read back from disk (checkpoint ``meta.json``, bundle ``manifest.json``).

Each failure names the file and the field and says the file was altered or damaged. numpy-free and
torch-free: the server's bundle loader uses it too.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cvm_edge.errors import CvmError
from cvm_edge.preprocess import Preprocessing

# Input sizes a device model is trained at (32 to 512 in practice); above this one image alone is
# hundreds of MB and a replay buffer of them does not fit an edge box.
MAX_IMAGE_SIZE = 1024
MAX_CLASSES = 100_000


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


class Checker:
    """Collects the first problem of one file as ``<file>: <field> <problem>``."""

    def __init__(self, where: str, error: type[CvmError]) -> None:
        self.where = where
        self.error = error

    def fail(self, field: str, problem: str) -> CvmError:
        return self.error(f"{self.where}: {field} {problem}; the file was altered or damaged, refusing to use it")

    def int_in(self, d: dict[str, Any], key: str, lo: int, hi: int, field: str | None = None) -> int:
        v: Any = d.get(key)
        if not is_int(v) or not lo <= v <= hi:
            raise self.fail(field or key, f"must be an integer in [{lo}, {hi}], got {show(v)}")
        return int(v)

    def of_type(self, d: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
        v = d.get(key)
        if not isinstance(v, kind):
            raise self.fail(key, f"must be {name}, got {show(v)}")
        return v

    def str_list(self, d: dict[str, Any], key: str, limit: int = MAX_CLASSES) -> list[str]:
        v = self.of_type(d, key, list, "a list")
        if len(v) > limit or not all(isinstance(s, str) and len(s) <= 1000 for s in v):
            raise self.fail(key, f"must be a list of at most {limit} strings")
        return v

    def int_list(self, d: dict[str, Any], key: str, limit: int = MAX_CLASSES) -> list[int]:
        v = self.of_type(d, key, list, "a list")
        if len(v) > limit or not all(is_int(i) and 0 <= i < MAX_CLASSES for i in v):
            raise self.fail(key, f"must be a list of at most {limit} class rows (integers >= 0)")
        return v


def show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_preprocessing(c: Checker, d: Any, field: str = "preprocessing") -> Preprocessing:
    """A recorded preprocessing dict (also a bundle manifest's), refused unless every value is sane."""
    if not isinstance(d, dict):
        raise c.fail(field, f"must be an object, got {show(d)}")
    c.int_in(d, "image_size", 8, MAX_IMAGE_SIZE, f"{field}.image_size")
    for key in ("mean", "std"):
        v = d.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(is_number(x) for x in v):
            raise c.fail(f"{field}.{key}", f"must be a list of 3 finite numbers, got {show(v)}")
    if not all(x > 0 for x in d["std"]):
        raise c.fail(f"{field}.std", "must be > 0")
    for key, kind in (("interpolation", str), ("crop_pct", (int, float)), ("jpeg_draft", bool)):
        if key in d and (not isinstance(d[key], kind) or (key == "crop_pct" and not is_number(d[key]))):
            raise c.fail(f"{field}.{key}", f"has the wrong type: {show(d[key])}")
    try:
        return Preprocessing.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise c.fail(field, f"is invalid ({exc})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_json(raw: bytes) -> Any:
    """Parse JSON text that must be UTF-8 and hold only finite numbers (``NaN`` and ``Infinity``,
    which Python's parser accepts, cannot be sent back in a JSON response)."""
    return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
