"""Where the model's files come from: a local directory, the local Hugging Face cache, or the hub.

Decided before anything is loaded, in seconds: left alone, transformers retries an unreachable hub
2 x 5 times (about 50 s, 46 log lines) before saying it cannot find the files. One short probe
tells "the hub is unreachable" apart at once; with every file already cached, loading then goes
on from the cache alone (as with HF_HUB_OFFLINE), and without them the error names the ways out.

Nothing here reads the environment: the caller says whether the hub is off limits (HF_HUB_OFFLINE)
and which endpoint to probe, and names each source by its setting for the messages.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 4.0

# The file that shows a directory or cached repository holds each kind of thing.
MARKERS: dict[str, str] = {
    "model": "config.json",
    "adapter": "adapter_config.json",
    "tokenizer": "tokenizer_config.json",
}
Kind = Literal["model", "adapter", "tokenizer"]

ALTERNATIVES = (
    "use local model directories (BASE_MODEL=/path/to/base ADAPTER=/path/to/adapter), "
    "fill the Hugging Face cache on a machine with access and set HF_HUB_OFFLINE=1, "
    "or try finbot without a model: ENGINE=fake"
)


class ModelFilesError(OSError):
    """A model, adapter or tokenizer cannot be found; the message is one line naming the setting."""


@dataclass(frozen=True)
class ModelSource:
    """One thing to load: `setting` names it in messages (e.g. "BASE_MODEL"), `name` is its value."""

    setting: str
    name: str
    kind: Kind = "model"


@dataclass(frozen=True)
class SourceStatus:
    source: ModelSource
    # local: a directory; cached: a hub id complete in the local cache; remote: a hub id to download
    where: Literal["local", "cached", "remote", "missing"]
    path: Path | None = None
    size_bytes: int | None = None
    problem: str | None = None


def looks_like_path(name: str) -> bool:
    """A directory the user meant, rather than a hub id ("org/name", or a bare legacy "name")."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _weights_present(directory: Path) -> bool:
    index = next(iter(sorted(directory.glob("*.safetensors.index.json"))), None) or next(
        iter(sorted(directory.glob("*.bin.index.json"))), None
    )
    if index is not None:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all((directory / shard).exists() for shard in shards)
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))


def directory_size(directory: Path) -> int:
    """Bytes of the files under `directory`, following the cache's symlinks to their blobs."""
    total = 0
    for path in directory.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            continue
    return total


def _complete(directory: Path, kind: Kind) -> str | None:
    """What is missing from a model/adapter/tokenizer directory, or None when it looks complete."""
    if not (directory / MARKERS[kind]).exists():
        if kind == "tokenizer" and (directory / "tokenizer.model").exists():
            return None
        return f"no {MARKERS[kind]} in it"
    if kind in ("model", "adapter") and not _weights_present(directory):
        return "its weight files (*.safetensors) are missing or incomplete"
    return None


def cached_snapshot(repo_id: str, kind: Kind, cache_dir: str | None = None) -> Path | None:
    """The cached snapshot directory of hub repository `repo_id` when it holds what `kind` needs."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, MARKERS[kind], cache_dir=cache_dir)
    except ValueError:  # not a valid repository id
        return None
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    return snapshot if _complete(snapshot, kind) is None else None


def locate(source: ModelSource, cache_dir: str | None = None) -> SourceStatus:
    """Where `source` would be loaded from, looking only at the disk."""
    name = source.name
    path = Path(name).expanduser()
    if path.is_dir():
        problem = _complete(path, source.kind)
        if problem is not None:
            return SourceStatus(source, "missing", path, problem=f"{source.setting}={name}: {problem}")
        return SourceStatus(source, "local", path, directory_size(path))
    if path.exists() or looks_like_path(name):
        what = "is not a directory" if path.exists() else "no such directory"
        return SourceStatus(source, "missing", path, problem=f"{source.setting}={name}: {what}")
    snapshot = cached_snapshot(name, source.kind, cache_dir)
    if snapshot is not None:
        return SourceStatus(source, "cached", snapshot, directory_size(snapshot))
    return SourceStatus(source, "remote")


def hub_unreachable_reason(endpoint: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub at `endpoint` answers at all; else why not (one line)."""
    request = urllib.request.Request(endpoint.rstrip("/") + "/api/whoami-v2", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as error:
        # Any HTTP answer (401 without a token, even 404) means the hub is there; a 5xx does not.
        return None if error.code < 500 else f"it answered HTTP {error.code}"
    except urllib.error.URLError as error:
        return str(error.reason)
    except (TimeoutError, OSError) as error:
        return str(error) or type(error).__name__


@dataclass(frozen=True)
class Preparation:
    statuses: list[SourceStatus]
    # True: every hub id is cached and the hub is off limits or unreachable; load from the cache only.
    cache_only: bool


def prepare_sources(
    sources: list[ModelSource],
    *,
    offline: bool,
    endpoint: str,
    cache_dir: str | None = None,
    probe_timeout_s: float = HUB_PROBE_TIMEOUT_S,
) -> Preparation:
    """Check that every source can be loaded, and whether it must come from the cache alone.

    Raises `ModelFilesError` (one line: the setting, its value, why, and the alternatives) when a
    local directory is missing or incomplete, or a hub id is not cached while the hub is off
    limits (`offline`) or does not answer within `probe_timeout_s`.
    """
    statuses = [locate(source, cache_dir) for source in sources]
    for status in statuses:
        if status.problem is not None:
            raise ModelFilesError(status.problem)
    hub = [status for status in statuses if status.where in ("cached", "remote")]
    if not hub:
        return Preparation(statuses, cache_only=False)
    remote = [status.source for status in hub if status.where == "remote"]
    names = ", ".join(f"{source.setting}={source.name}" for source in remote)
    if offline:
        if remote:
            raise ModelFilesError(
                f"{names} not in the local Hugging Face cache and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; {ALTERNATIVES}"
            )
        return Preparation(statuses, cache_only=True)
    reason = hub_unreachable_reason(endpoint, probe_timeout_s)
    if reason is None:
        return Preparation(statuses, cache_only=False)
    if remote:
        raise ModelFilesError(
            f"cannot download {names}: the Hugging Face hub ({endpoint}) is unreachable ({reason}) "
            f"and the files are not in the local cache; {ALTERNATIVES}"
        )
    logger.info("Hugging Face hub (%s) unreachable (%s); loading from the local cache", endpoint, reason)
    return Preparation(statuses, cache_only=True)


def describe_sources(statuses: list[SourceStatus]) -> str:
    """E.g. "BASE_MODEL org/name (local cache, 14.5 GB), ADAPTER /models/lora (local directory, 0.2 GB)"."""
    where = {"local": "local directory", "cached": "local cache", "remote": "download from the hub"}
    parts = []
    for status in statuses:
        size = f", {human_size(status.size_bytes)}" if status.size_bytes is not None else ""
        parts.append(f"{status.source.setting} {status.source.name} ({where.get(status.where, status.where)}{size})")
    return ", ".join(parts)


def use_cache_only() -> None:
    """Make every later hub access of this process use the local cache (as HF_HUB_OFFLINE=1 does)."""
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


@dataclass(frozen=True)
class HubSize:
    download_bytes: int | None
    problem: str | None = None


def hub_download_size(repo_id: str, endpoint: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> HubSize:
    """Bytes a first download of `repo_id` fetches (safetensors weights preferred, as transformers does)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, files_metadata=True, timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - any failure only means "size unknown", said in one line
        return HubSize(None, str(error).splitlines()[0] if str(error) else type(error).__name__)
    files = [(sibling.rfilename, sibling.size or 0) for sibling in info.siblings or []]
    has_safetensors = any(name.endswith(".safetensors") for name, _ in files)
    total = 0
    for name, size in files:
        if name.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf")) and (
            has_safetensors or not name.endswith(".bin")
        ):
            continue
        total += size
    return HubSize(total)


def free_disk_bytes(directory: str | Path) -> int | None:
    """Free bytes on the file system that holds `directory` (or its nearest existing parent)."""
    path = Path(directory).expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_size(size: int | None) -> str:
    if size is None:
        return "unknown size"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
