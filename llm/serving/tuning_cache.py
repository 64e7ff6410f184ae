"""The `nf4` tuner's choices on disk, so that a restart serves them without timing every layout again.

The tuner compiles and times ~120 kernel layouts at start-up (24-26 s of a 52 s start on a fresh
H200, run 29). Its choice depends only on the GPU, the software, the kernels' source and the weight
shapes, so a restart of the same deployment would time the same layouts to the same result. This file
keeps one plan per such key (the newest few). A stored plan is only a suggestion: the tuner checks
every layout it names against the reference path before serving it, and times everything again
when one is missing or wrong.

Plain JSON, written atomically (a temporary file renamed over the old one), so that two instances
sharing a volume never read half a file. No torch here: the key's facts come from the caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEPT_PLANS = 8  # a few GPU kinds or model shapes side by side; the oldest go first


def plan_key(facts: Mapping[str, object]) -> str:
    """A stable digest of everything the tuner's choice depends on (JSON-serialisable values)."""
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def source_digest(paths: list[Path]) -> str:
    """The kernels' source text: any edit to it means the stored timings no longer apply."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def _read_all(path: Path) -> dict[str, dict]:
    """The stored plans by key; {} for a missing file. Raises ValueError for one that is not ours."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    data = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("plans"), dict):
        raise ValueError(f"not a finbot tuning cache of version {FORMAT_VERSION}")
    return {key: plan for key, plan in data["plans"].items() if isinstance(plan, dict)}


def load_plan(path: Path, key: str) -> dict | None:
    """The plan stored under `key`, or None (no file, another key, or a file that cannot be read,
    which gets one WARNING line: the tuner then times everything and writes the file anew)."""
    try:
        return _read_all(path).get(key)
    except (OSError, ValueError) as error:
        logger.warning("nf4 tuning cache %s cannot be read (%s); timing the kernels again and rewriting it",
                       path, _one_line(error))
        return None


def store_plan(path: Path, key: str, plan: Mapping[str, object]) -> bool:
    """Keep `plan` under `key` (with the time it was saved), beside the newest other plans. A file
    that cannot be written costs one WARNING line and the next start's tuning, nothing more."""
    try:
        try:
            plans = _read_all(path)
        except ValueError:
            plans = {}  # unreadable: replaced (load_plan said so)
        plans.pop(key, None)
        plans[key] = {**plan, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        kept = dict(list(plans.items())[-KEPT_PLANS:])
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump({"version": FORMAT_VERSION, "plans": kept}, file, indent=1)  # in age order
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        logger.warning("nf4 tuning cache %s cannot be written (%s); the next start times the kernels again",
                       path, _one_line(error))
        return False
    return True


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
