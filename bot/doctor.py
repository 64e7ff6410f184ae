"""`finbot doctor`: check a deployment in one command and say how to fix what is wrong.

Each check is one row: ✔ (fine), ✘ (will not work: the fix follows) or – (does not apply to these
settings). The checks only look: nothing is migrated, posted, joined or downloaded. They ask
Slack, the hub and the inference server with short timeouts, so the whole table takes seconds,
and a check that fails in an unexpected way is a ✘ row, never a traceback. The exit status is 1
when any row is ✘.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bot.errors import describe_database_error, describe_settings_error, first_line, redact_url
from bot.settings import FinbotSettings

if TYPE_CHECKING:
    from slack_sdk import WebClient

logger = logging.getLogger(__name__)

MARKS = {True: "✔", False: "✘", None: "–"}

# What slack-app-manifest.yaml asks for, used when the manifest file is not next to the package
# (an installed copy); tests/test_doctor_units.py keeps the two in step.
MANIFEST_BOT_SCOPES = (
    "app_mentions:read", "chat:write", "channels:history", "groups:history",
    "im:history", "mpim:history", "assistant:write", "commands",
)
MANIFEST_PATH = Path(__file__).resolve().parents[1] / "slack-app-manifest.yaml"

# GPU memory each engine needs for Mistral-7B, in GB (peaks measured on an H100 and, for nf4, an
# H200 in bench/NOTES.md run 25).
GPU_MEMORY_GB = {"fast": 16.0, "fast-static": 19.2, "low-memory": 5.4, "nf4": 6.4, "reference": 6.0}
GPU_ENGINES = ("fast", "low-memory", "nf4")
NO_GPU_FIX = (
    "ENGINE=fake (try finbot without a model) or ENGINE=openai with a vLLM server on a GPU machine "
    "(README: Scale-out inference with vLLM); or install a CUDA build of torch on a machine with an NVIDIA GPU"
)
OPENAI_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: does not apply to these settings
    found: str
    fix: str = ""


def manifest_bot_scopes(path: Path = MANIFEST_PATH) -> tuple[str, ...]:
    """The bot scopes the Slack app manifest asks for (the shipped list when the file is absent)."""
    try:
        import yaml

        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
        scopes = manifest["oauth_config"]["scopes"]["bot"]
        return tuple(str(scope) for scope in scopes)
    except (OSError, ImportError, KeyError, TypeError, ValueError):
        return MANIFEST_BOT_SCOPES


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Libraries that print banners or warnings while imported (bitsandbytes) stay out of the table."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


# ---------------------------------------------------------------------------------- checks


def _can_create_in(folder: Path) -> bool:
    """Whether files and folders can be made in `folder`: tried (and removed at once), since
    permissions alone do not tell (root, read-only mounts, /proc)."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".finbot-doctor-"):
            return True
    except OSError:
        return False


def check_database(settings: FinbotSettings) -> list[Check]:
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    from storage.db import alembic_config

    url = settings.database_url
    shown = redact_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database).expanduser()
        if not path.exists():
            # A fresh install: `finbot run` creates the file, if it may write there.
            folder = next((parent for parent in path.parents if parent.exists()), Path("."))
            if _can_create_in(folder):
                return [Check("database", True, f"{shown}: no database yet; finbot run creates it")]
            return [Check("database", False, f"{shown}: no database yet, and {folder} is not writable",
                          "point DATABASE_URL at a writable folder (or create it with the right owner)")]
    scripts = ScriptDirectory.from_config(alembic_config(url))
    head = scripts.get_current_head()
    known = {script.revision for script in scripts.walk_revisions()}
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except (SQLAlchemyError, OSError) as error:
        return [Check("database", False, describe_database_error(url, error),
                      "check DATABASE_URL, and that the server is running and reachable from here")]
    finally:
        engine.dispose()
    if current == head:
        return [Check("database", True, f"{shown}: reachable, at the latest revision {head}")]
    if current is None:
        return [Check("database", True, f"{shown}: reachable and empty; finbot run creates the tables")]
    if current not in known:
        return [Check("database", False, f"{shown}: at revision {current}, unknown to this finbot",
                      "a newer finbot migrated it: run that version (or restore a matching backup)")]
    return [Check("database", False, f"{shown}: at revision {current}, the latest is {head}",
                  "finbot db upgrade (finbot run also migrates at start)")]


def check_slack(settings: FinbotSettings) -> list[Check]:
    """The bot token and its scopes, then how Slack reaches finbot (Socket Mode or HTTP); the first
    row is always the bot token's."""
    rows = _check_bot_token(settings)
    return rows + _check_connection(settings)


def _check_bot_token(settings: FinbotSettings) -> list[Check]:
    from slack_sdk.errors import SlackApiError

    from bot.slack_check import auth_test, error_code, token_fix, transient_reason, web_client

    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    if token is None:
        return [Check("Slack bot token", False, "SLACK_BOT_TOKEN is not set", token_fix("SLACK_BOT_TOKEN", None, None))]
    try:
        identity = auth_test(web_client(token, settings))
    except SlackApiError as error:
        reason = transient_reason(error)
        if reason is not None:
            return [Check("Slack bot token", False, f"Slack at {settings.slack_api_url} answered {reason}",
                          "try again in a minute (https://status.slack.com)")]
        code = error_code(error)
        return [Check("Slack bot token", False, f"refused by Slack ({code})", token_fix("SLACK_BOT_TOKEN", code, token))]
    except OSError as error:
        return [Check("Slack bot token", False,
                      f"Slack unreachable at SLACK_API_URL={settings.slack_api_url}: {transient_reason(error)}",
                      "check the network or proxy (HTTPS_PROXY) and SLACK_API_URL")]
    rows = [Check("Slack bot token", True, f"valid: @{identity.user} in {identity.team} ({identity.team_id})")]
    needed = manifest_bot_scopes()
    if identity.scopes is None:
        rows.append(Check("Slack scopes", None, "Slack did not report the granted scopes"))
    elif missing := [scope for scope in needed if scope not in identity.scopes]:
        rows.append(Check("Slack scopes", False, f"missing {', '.join(missing)}",
                          "add them under OAuth & Permissions → Bot Token Scopes (as in slack-app-manifest.yaml) "
                          "and reinstall the app"))
    else:
        rows.append(Check("Slack scopes", True, f"all {len(needed)} scopes of slack-app-manifest.yaml granted"))
    return rows


def _check_connection(settings: FinbotSettings) -> list[Check]:
    from slack_sdk.errors import SlackApiError

    from bot.slack_check import error_code, token_fix, transient_reason, web_client

    rows: list[Check] = []
    if settings.slack_mode == "http":
        if settings.slack_signing_secret:
            rows.append(Check("Slack requests", True, "HTTP mode: SLACK_SIGNING_SECRET is set"))
        else:
            rows.append(Check("Slack requests", False, "HTTP mode without SLACK_SIGNING_SECRET",
                              "copy the Signing Secret from the app's Basic Information page"))
        return rows
    app_token = settings.slack_app_token.get_secret_value() if settings.slack_app_token else None
    if app_token is None:
        rows.append(Check("Socket Mode", False, "SLACK_APP_TOKEN is not set", token_fix("SLACK_APP_TOKEN", None, None)))
        return rows
    try:
        web_client(app_token, settings).apps_connections_open(app_token=app_token)
    except SlackApiError as error:
        code = error_code(error)
        rows.append(Check("Socket Mode", False, f"SLACK_APP_TOKEN refused by Slack ({code})",
                          token_fix("SLACK_APP_TOKEN", code, app_token)))
        return rows
    except OSError as error:
        rows.append(Check("Socket Mode", False, f"Slack unreachable: {transient_reason(error)}",
                          "check the network or proxy (HTTPS_PROXY)"))
        return rows
    rows.append(Check("Socket Mode", True, "SLACK_APP_TOKEN can open a Socket Mode connection"))
    return rows


def check_channels(settings: FinbotSettings) -> list[Check]:
    from slack_sdk.errors import SlackApiError

    from bot.slack_check import error_code, web_client

    wanted = [(channel, "TERM_OF_DAY_CHANNELS") for channel in settings.term_of_day_channel_ids()]
    wanted += [(channel, "QA_CHANNELS") for channel in sorted(settings.qa_channel_ids())]
    if not wanted:
        return [Check("channels", None, "no TERM_OF_DAY_CHANNELS or QA_CHANNELS set")]
    client = web_client(settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None, settings)
    rows = []
    for channel, setting in wanted:
        name = f"channel {channel}"
        try:
            info = client.conversations_info(channel=channel)["channel"]
        except SlackApiError as error:
            code = error_code(error)
            if code == "channel_not_found":
                rows.append(Check(name, False, f"{setting}: no such channel, or a private one finbot is not in",
                                  "check the ID (bottom of the channel's details); invite finbot to a private channel"))
            elif code == "missing_scope":
                rows.append(_membership_from_history(client, channel, name, setting))
            else:
                rows.append(Check(name, False, f"{setting}: Slack answered {code}", "see https://api.slack.com/methods/conversations.info"))
            continue
        except OSError as error:
            rows.append(Check(name, False, f"Slack unreachable: {first_line(error)}", "check the network"))
            continue
        label = f"#{info.get('name')}" if info.get("name") else channel
        if info.get("is_archived"):
            rows.append(Check(name, False, f"{setting}: {label} is archived", f"unarchive it or remove {channel} from {setting}"))
        elif not info.get("is_member"):
            rows.append(Check(name, False, f"{setting}: {label} exists, finbot is not a member",
                              f"in {label}: /invite @finbot"))
        else:
            rows.append(Check(name, True, f"{setting}: {label}, finbot is a member"))
    return rows


def _membership_from_history(client: WebClient, channel: str, name: str, setting: str) -> Check:
    """Without channels:read, reading one message (channels:history, granted) tells membership apart."""
    from slack_sdk.errors import SlackApiError

    from bot.slack_check import error_code

    try:
        client.conversations_history(channel=channel, limit=1)
    except SlackApiError as error:
        code = error_code(error)
        if code == "not_in_channel":
            return Check(name, False, f"{setting}: finbot is not a member", "in that channel: /invite @finbot")
        return Check(name, False, f"{setting}: {code}", "check the ID (bottom of the channel's details)")
    return Check(name, True, f"{setting}: finbot can read it (a member)")


def gpu_memory_need(engine: str, paged_kv: bool) -> str:
    """The `GPU_MEMORY_GB` key of a mode (as `auto` resolved) with this KV-cache setting."""
    return "fast-static" if engine == "fast" and not paged_kv else engine


def gpu_memory_advice(need: str) -> str:
    """What to do when the GPU cannot hold what `need` (a `gpu_memory_need` key) needs."""
    if need == "fast":
        return f"free the GPU, or ENGINE=nf4 (about {GPU_MEMORY_GB['nf4']:.1f} GB), or a smaller ENGINE_KV_CACHE_TOKENS"
    if need == "fast-static":
        return (f"free the GPU, or ENGINE_PAGED_KV=true (about {GPU_MEMORY_GB['fast']:.1f} GB), "
                f"or ENGINE=nf4 (about {GPU_MEMORY_GB['nf4']:.1f} GB)")
    if need == "nf4":
        return "free the GPU, or a smaller ENGINE_KV_CACHE_TOKENS"
    if need == "low-memory":
        return f"free the GPU, or a smaller ENGINE_MAX_BATCH, or ENGINE=nf4 (about {GPU_MEMORY_GB['nf4']:.1f} GB)"
    return "free the GPU"


def check_gpu(settings: FinbotSettings) -> list[Check]:
    if settings.engine in ("fake", "openai"):
        return [Check("GPU", None, f"not needed for ENGINE={settings.engine}")]
    with _quiet():
        import torch
    cuda = torch.cuda.is_available()
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
    device = settings.device
    if not cuda or device == "cpu":
        if settings.engine in GPU_ENGINES or device.startswith("cuda"):
            what = f"ENGINE={settings.engine}" + (f" (DEVICE={device})" if device != "auto" else "")
            return [Check("GPU", False, f"{what} needs a CUDA GPU; none visible ({build})", NO_GPU_FIX)]
        return [Check("GPU", True, f"no GPU: ENGINE={settings.engine} runs the reference engine on the CPU "
                                   f"(works, but a 7B model answers at about a word per second; {build})")]
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return [Check("GPU", False, f"DEVICE={device}, but only {torch.cuda.device_count()} GPU(s) visible",
                      "DEVICE=auto or cuda:0")]
    rows = [Check("GPU", True, f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda}, {build})")]
    try:
        with _quiet():
            from bitsandbytes.cextension import lib
        usable = bool(getattr(lib, "compiled_with_cuda", False))
        rows.append(Check("bitsandbytes", usable, "CUDA backend loaded" if usable else "no CUDA backend loaded",
                          "" if usable else "pip install -U bitsandbytes (a build for your CUDA version)"))
    except Exception as error:  # noqa: BLE001 - an import that fails in any way is the finding
        rows.append(Check("bitsandbytes", False, f"cannot import: {first_line(error)}", "pip install -U bitsandbytes"))
    free, total = torch.cuda.mem_get_info(index)
    from llm.loading import resolve_engine

    choice = resolve_engine(settings.engine, f"cuda:{index}")  # as the loader resolves it (auto: by memory)
    key = gpu_memory_need(choice, settings.engine_paged_kv)
    needed = GPU_MEMORY_GB.get(key, 16.0)
    free_gb, total_gb = free / 1e9, total / 1e9
    found = f"ENGINE={settings.engine} ({choice}) needs about {needed:.1f} GB; {free_gb:.1f} of {total_gb:.1f} GB free"
    if free_gb >= needed:
        rows.append(Check("GPU memory", True, found))
    else:
        rows.append(Check("GPU memory", False, found, gpu_memory_advice(key)))
    return rows


def check_model_files(settings: FinbotSettings, offline: bool, endpoint: str, cache_dir: str) -> list[Check]:
    from llm.model_files import (
        ALTERNATIVES,
        ModelSource,
        free_disk_bytes,
        hub_download_size,
        hub_unreachable_reason,
        human_size,
        locate,
    )

    if settings.engine == "fake":
        return [Check("model files", None, "not needed for ENGINE=fake (Mistral's tokenizer ships with finbot)")]
    if settings.engine == "openai":
        sources = [ModelSource("BASE_MODEL", settings.base_model, "tokenizer")]
    else:
        sources = [ModelSource("BASE_MODEL", settings.base_model, "model"),
                   ModelSource("ADAPTER", settings.adapter, "adapter")]
    rows: list[Check] = []
    probe: str | None | bool = False  # False: not probed yet
    for source in sources:
        name = f"{source.kind} {source.setting}"
        status = locate(source, cache_dir)
        if status.problem is not None:
            rows.append(Check(name, False, status.problem, "point it at a directory holding the files, or use a hub id"))
        elif status.where == "local":
            rows.append(Check(name, True, f"local directory {status.path} ({human_size(status.size_bytes)})"))
        elif status.where == "cached":
            rows.append(Check(name, True, f"{source.name} in the local cache ({human_size(status.size_bytes)})"))
        elif offline:
            rows.append(Check(name, False, f"{source.name} not in the local cache, and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set", ALTERNATIVES))
        else:
            if probe is False:
                probe = hub_unreachable_reason(endpoint)
            if probe is not None:
                rows.append(Check(name, False, f"{source.name} not in the local cache; the hub ({endpoint}) is "
                                               f"unreachable ({probe})", ALTERNATIVES))
                continue
            size = hub_download_size(source.name, endpoint)
            free = free_disk_bytes(cache_dir)
            found = (f"{source.name}: to download from {endpoint}, {human_size(size.download_bytes)}; "
                     f"{human_size(free)} free in {cache_dir}")
            if size.problem is not None:
                rows.append(Check(name, False, f"{source.name}: the hub answered: {size.problem}",
                                  "check the id (and HF_TOKEN for a gated or private model)"))
            elif size.download_bytes is not None and free is not None and free < size.download_bytes * 1.1:
                rows.append(Check(name, False, found, "free disk space there, or set HF_HOME to a larger disk"))
            else:
                rows.append(Check(name, True, found))
    return rows


def probe_openai_server(settings: FinbotSettings, timeout_s: float = OPENAI_PROBE_TIMEOUT_S) -> tuple[str | None, float]:
    """Ask the OpenAI-compatible server for one token; (None, seconds) when it answered, else (why not, seconds)."""
    body = {"model": settings.openai_model, "prompt": [1] if settings.openai_prompt_format == "ids" else "a",
            "max_tokens": 1, "stream": False}
    headers = {"Content-Type": "application/json"}
    if settings.openai_api_key:
        headers["Authorization"] = f"Bearer {settings.openai_api_key.get_secret_value()}"
    url = settings.openai_base_url.rstrip("/") + "/completions"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - the configured server
            json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        detail = first_line(Exception(error.read().decode(errors="replace")[:200])) if error.fp else ""
        return f"HTTP {error.code} {detail}".strip(), time.monotonic() - started
    except urllib.error.URLError as error:
        return str(error.reason), time.monotonic() - started
    except (OSError, ValueError) as error:
        return first_line(error), time.monotonic() - started
    return None, time.monotonic() - started


def check_openai(settings: FinbotSettings) -> list[Check]:
    if settings.engine != "openai":
        return [Check("inference server", None, f"not used with ENGINE={settings.engine}")]
    problem, seconds = probe_openai_server(settings)
    if problem is None:
        return [Check("inference server", True,
                      f"{settings.openai_base_url} answered in {seconds:.1f} s (model {settings.openai_model})")]
    return [Check("inference server", False, f"{settings.openai_base_url} (OPENAI_BASE_URL): {problem}",
                  "start it (README: vllm serve … --served-model-name finbot), or fix OPENAI_BASE_URL / OPENAI_MODEL")]


# ---------------------------------------------------------------------------------- the table


def _guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """A check that fails in a way nobody foresaw is a ✘ row with the reason, not a crash of the doctor."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001
        logger.debug("check %s failed", name, exc_info=True)
        return [Check(name, False, f"the check itself failed: {first_line(error)}", "run with LOG_LEVEL=DEBUG for details")]


def run_checks(settings_factory: Callable[[], FinbotSettings] = FinbotSettings) -> list[Check]:
    from pydantic import ValidationError

    try:
        settings = settings_factory()
    except ValidationError as error:
        return [Check("settings", False, line, "fix it in .env or the environment (see .env.example)")
                for line in describe_settings_error(error)]
    import huggingface_hub.constants as hub

    rows = [Check("settings", True, "valid (.env and the environment)")]
    rows += _guarded("database", lambda: check_database(settings))
    slack = _guarded("Slack", lambda: check_slack(settings))
    rows += slack
    if slack[0].ok:
        rows += _guarded("channels", lambda: check_channels(settings))
    else:
        rows.append(Check("channels", None, "not checked: the bot token does not work"))
    rows += _guarded("GPU", lambda: check_gpu(settings))
    rows += _guarded("model files", lambda: check_model_files(settings, hub.HF_HUB_OFFLINE, hub.ENDPOINT, hub.HF_HUB_CACHE))
    rows += _guarded("inference server", lambda: check_openai(settings))
    return rows


def render(rows: list[Check], out: TextIO) -> None:
    from bot.chat import text_width

    width = max(text_width(row.name) for row in rows) + 2
    out.write("finbot doctor\n")
    for row in rows:
        out.write(f"  {MARKS[row.ok]}  {row.name}{' ' * (width - text_width(row.name))}{row.found}\n")
        if row.fix and row.ok is False:
            out.write(f"     {' ' * width}→ {row.fix}\n")
    failed = sum(row.ok is False for row in rows)
    out.write("\n" + (f"{failed} problem(s) found.\n" if failed else "Everything finbot needs is in place.\n"))


def command_doctor(out: TextIO) -> int:
    rows = run_checks()
    render(rows, out)
    return 1 if any(row.ok is False for row in rows) else 0
