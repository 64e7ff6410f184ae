"""A real pseudo-terminal for `finbot chat` / `finbot ask`, and a small screen that reads what it shows.

The child gets a pty of a chosen width as stdin, stdout and stderr, so it behaves exactly as in a
user's terminal (isatty, readline, line discipline). `Screen` replays the bytes it wrote with the
few terminal rules finbot relies on (wide Hangul, wrapping, carriage return, cursor up/right,
erase to the end of the screen), so a test asserts what a user would *see*, not the raw escapes.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

from tests.e2e.process import finbot_command, finbot_env

_CSI_RE = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
_ESC_OTHER_RE = re.compile(r"\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def _width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


class Screen:
    """The visible text of a terminal `columns` wide after the given output (no scrolling limit)."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.rows: list[list[str]] = [[]]
        self.row = 0
        self.col = 0
        self.pending_wrap = False

    def _cell_row(self) -> list[str]:
        while len(self.rows) <= self.row:
            self.rows.append([])
        line = self.rows[self.row]
        while len(line) < self.columns:
            line.append(" ")
        return line

    def _put(self, char: str) -> None:
        width = _width(char)
        if width == 0:
            return
        if self.pending_wrap or self.col + width > self.columns:
            self.row, self.col, self.pending_wrap = self.row + 1, 0, False
        line = self._cell_row()
        line[self.col] = char
        if width == 2:
            line[self.col + 1] = ""  # the right half of a wide character
        self.col += width
        if self.col >= self.columns:
            self.col, self.pending_wrap = self.columns - 1, True

    def feed(self, text: str) -> None:
        position = 0
        while position < len(text):
            char = text[position]
            if char == "\x1b":
                csi = _CSI_RE.match(text, position)
                if csi:
                    self._csi(csi.group(1), csi.group(2))
                    position = csi.end()
                    continue
                other = _ESC_OTHER_RE.match(text, position)
                position = other.end() if other else position + 1
                continue
            if char == "\r":
                self.col, self.pending_wrap = 0, False
            elif char == "\n":
                self.row, self.pending_wrap = self.row + 1, False
                self._cell_row()
            elif char == "\b":
                self.col, self.pending_wrap = max(self.col - 1, 0), False
            elif char == "\x07" or ord(char) < 32:
                pass
            else:
                self._put(char)
            position += 1

    def _csi(self, params: str, final: str) -> None:
        numbers = [int(part) for part in params.split(";") if part.isdigit()]
        count = numbers[0] if numbers else 1
        if final == "A":
            self.row, self.pending_wrap = max(self.row - count, 0), False
        elif final == "B":
            self.row, self.pending_wrap = self.row + count, False
        elif final == "C":
            self.col, self.pending_wrap = min(self.col + count, self.columns - 1), False
        elif final == "D":
            self.col, self.pending_wrap = max(self.col - count, 0), False
        elif final == "G":
            self.col, self.pending_wrap = max(count - 1, 0), False
        elif final == "J":
            line = self._cell_row()
            for column in range(self.col, self.columns):
                line[column] = " "
            del self.rows[self.row + 1 :]
        elif final == "K":
            line = self._cell_row()
            for column in range(self.col, self.columns):
                line[column] = " "

    def lines(self) -> list[str]:
        return ["".join(line).rstrip() for line in self.rows]

    def text(self) -> str:
        return "\n".join(self.lines()).rstrip("\n")


class PtyFinbot:
    """`finbot ARGS` attached to a pseudo-terminal; everything it writes is kept, with arrival times."""

    def __init__(self, *args: str, cwd: Path, columns: int = 60, **settings: str) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.columns = columns
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            finbot_command(*args), cwd=cwd, env=finbot_env(TERM="xterm", COLUMNS=str(columns), **settings),
            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        )
        os.close(slave)
        self._master = master
        self._lock = threading.Lock()
        self.chunks: list[tuple[float, str]] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._master], [], [], 0.1)
                if not ready:
                    if self.process.poll() is not None:
                        return
                    continue
                data = os.read(self._master, 4096)
            except OSError:
                return
            if not data:
                return
            text = self._decoder.decode(data)  # a character split between two reads waits for its rest
            with self._lock:
                self.chunks.append((time.monotonic() - self.started, text))

    def output(self) -> str:
        with self._lock:
            return "".join(text for _, text in self.chunks)

    def screen(self) -> Screen:
        screen = Screen(self.columns)
        screen.feed(self.output())
        return screen

    def type(self, line: str) -> None:
        os.write(self._master, (line + "\r").encode())

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30, what: str = "output") -> float:
        """Seconds since start when `predicate(screen text)` first held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.screen().text()):
                return time.monotonic() - self.started
            if self.process.poll() is not None and predicate(self.screen().text()) is False:
                time.sleep(0.2)
                if predicate(self.screen().text()):
                    return time.monotonic() - self.started
                raise AssertionError(f"finbot exited ({self.process.returncode}) before {what}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout} s; the terminal shows:\n{self.screen().text()}")

    def first_seen(self, text: str) -> float | None:
        """When `text` first appeared in the raw output (seconds since start)."""
        seen = ""
        with self._lock:
            for at, chunk in self.chunks:
                seen += chunk
                if text in seen:
                    return at
        return None

    def wait_exit(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        os.close(self._master)
