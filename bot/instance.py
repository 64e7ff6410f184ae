"""Who this finbot process is, and whether another process named the same way is gone.

Work a process owns in the database (a question being answered, a term-of-day claim) carries
the owner's instance id. Leases time out for owners on other machines; an owner on *this*
machine can be checked directly, so work left by a killed process is taken over right after a
restart instead of after its lease runs out.

The id is ``host:pid:start@pidns``: the process start time (in clock ticks since boot) tells a
recycled pid apart from the original process, and the pid namespace keeps two containers that
share a hostname from judging each other's pids.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid

MAX_ID_LENGTH = 128


def _start_ticks(pid: int) -> str | None:
    """The process' start time since boot (field 22 of /proc/PID/stat); None when unknown or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields after the ")" that ends the command name start at field 3 (state). A zombie has
    # exited already; only its parent has not collected it yet.
    if len(fields) <= 19 or fields[0] == "Z":
        return None
    return fields[19]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "?"


@functools.cache
def current_instance_id() -> str:
    pid = os.getpid()
    # Without /proc (not Linux) a random tag stands in; such owners are never judged gone.
    start = _start_ticks(pid) or f"r{uuid.uuid4().hex[:10]}"
    return f"{socket.gethostname()}:{pid}:{start}@{_pid_namespace()}"[:MAX_ID_LENGTH]


def owner_is_gone(owner: str | None) -> bool:
    """True only when `owner` is certainly a dead process of this machine and pid namespace."""
    if not owner or owner == current_instance_id():
        return False
    try:
        rest, namespace = owner.rsplit("@", 1)
        host, pid_text, start = rest.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "?":
        return False
    if start.startswith("r"):
        return False
    current_start = _start_ticks(pid)
    return current_start is None or current_start != start
