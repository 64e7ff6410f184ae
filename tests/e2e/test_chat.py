"""`finbot chat` and `finbot ask` as a newcomer runs them: ENGINE=fake, no network, in a real terminal.

The terminal is a pseudo-terminal (tests/e2e/terminal.py): finbot sees a tty, as in a user's
shell, and the assertions read the screen it leaves, not the escape codes it wrote.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time

import pytest

from tests.e2e.process import finbot_command, finbot_env, run_finbot
from tests.e2e.terminal import PtyFinbot

pytestmark = pytest.mark.e2e

# Long enough to wrap on a narrow terminal; the token limit (one word = one token for the fake
# engine) cuts it in its second sentence, which cleaning then drops.
REPLY = "기준금리는 한국은행이 정하는 정책금리예요. 물가와 경기를 보고 금통위가 결정하는데 이 문장은 끝나지 않아요"
SHOWN = "기준금리는 한국은행이 정하는 정책금리예요."


class _Listener:
    """A port that accepts connections and counts them: where the hub would be."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


@pytest.fixture
def hub() -> _Listener:
    listener = _Listener()
    yield listener
    listener.socket.close()


def no_network(hub: _Listener) -> dict[str, str]:
    # Offline switches off: finbot would really go to the "hub" if the fake engine needed anything from it.
    return {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": hub.url, "ENGINE": "fake"}


def test_chat_streams_the_answer_and_leaves_the_cleaned_one_on_screen(tmp_path, hub):
    chat = PtyFinbot(
        "chat", cwd=tmp_path, columns=30, DATABASE_URL=f"sqlite:///{tmp_path / 'finbot.db'}", **no_network(hub),
        FAKE_REPLY=REPLY, FAKE_TOKENS_PER_SECOND="10", MAX_NEW_TOKENS="9",
    )
    try:
        ready = chat.wait_for(lambda screen: screen.endswith("질문>"), what="the first prompt")
        chat.type("기준금리가 뭐야?")
        chat.wait_for(lambda screen: screen.count("질문>") == 2, what="the answer and the next prompt")
        screen = chat.screen().text()
        chat.type("/quit")
        assert chat.wait_exit() == 0
    finally:
        chat.close()
    assert ready < 5, f"the chat took {ready:.1f} s to start"
    assert hub.connections == 0
    # Streamed: the first words were on screen well before the last ones (10 words a second).
    first, last = chat.first_seen("기준금리는"), chat.first_seen("결정하는데")
    assert first is not None and last is not None and last - first > 0.3
    assert "\ufffd" not in chat.output()  # only whole characters, never half a Hangul syllable
    # The token limit cut the second sentence: the terminal shows the cleaned answer only, wrapped
    # at 30 columns (Hangul is two columns wide), with nothing of the streamed tail left over.
    lines = screen.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("finbot>"))
    assert lines[start:] == ["finbot> 기준금리는 한국은행이", "정하는 정책금리예요.", "질문>"]
    assert "결정하는데" not in screen and "준비하고" not in screen


def test_chat_keeps_the_thread_in_the_database_until_new(tmp_path, hub):
    database = tmp_path / "finbot.db"
    result = subprocess.run(
        finbot_command("chat"), cwd=tmp_path, input="기준금리가 뭐야?\n그럼 환율은?\n/new\n물가는?\n/quit\n",
        env=finbot_env(DATABASE_URL=f"sqlite:///{database}", **no_network(hub)),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Piped, only the final answers are written (no placeholder, no rewriting).
    assert "테스트 답변입니다. 질문: 기준금리가 뭐야? (이전 대화 0개)" in result.stdout
    assert "테스트 답변입니다. 질문: 그럼 환율은? (이전 대화 1개)" in result.stdout
    assert "새 대화를 시작했어요" in result.stdout
    assert "테스트 답변입니다. 질문: 물가는? (이전 대화 0개)" in result.stdout
    assert "준비하고" not in result.stdout and "\x1b" not in result.stdout
    rows = sqlite3.connect(database).execute(
        "select c.thread_ts, m.role, m.status, m.text from messages m join conversations c on c.id = m.conversation_id "
        "where c.team_id = 'terminal' order by m.id"
    ).fetchall()
    threads = sorted({row[0] for row in rows})
    assert len(threads) == 2
    assert [(row[1], row[2]) for row in rows] == [("user", "answered"), ("assistant", "answered")] * 3
    assert [row[3] for row in rows if row[1] == "user"] == ["기준금리가 뭐야?", "그럼 환율은?", "물가는?"]
    assert hub.connections == 0


def test_ctrl_c_during_an_answer_stops_only_that_answer(tmp_path, hub):
    database = tmp_path / "finbot.db"
    chat = PtyFinbot(
        "chat", cwd=tmp_path, DATABASE_URL=f"sqlite:///{database}", **no_network(hub),
        FAKE_REPLY=REPLY, FAKE_TOKENS_PER_SECOND="3",
    )
    try:
        chat.wait_for(lambda screen: screen.endswith("질문>"), what="the first prompt")
        chat.type("기준금리가 뭐야?")
        chat.wait_for(lambda screen: "기준금리는" in screen, what="the answer starting")
        os.kill(chat.process.pid, signal.SIGINT)
        chat.wait_for(lambda screen: screen.count("질문>") == 2, what="the prompt after the stopped answer")
        screen = chat.screen().text()
        chat.type("/quit")
        assert chat.wait_exit() == 0
    finally:
        chat.close()
    assert "(답변을 멈췄어요)" in screen and "Traceback" not in chat.output()
    assert "끝나지 않아요" not in screen
    status, error = sqlite3.connect(database).execute("select status, error from messages where role = 'user'").fetchone()
    assert status == "failed" and "Ctrl-C" in error


def test_ask_with_the_fake_engine_needs_no_network(tmp_path, hub):
    started = time.monotonic()
    result = run_finbot("ask", "기준금리가 뭐야?", cwd=tmp_path, **no_network(hub))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == "테스트 답변입니다. 질문: 기준금리가 뭐야? (이전 대화 0개)\n"
    assert hub.connections == 0
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_ask_on_a_terminal_streams_too(tmp_path, hub):
    ask = PtyFinbot("ask", "기준금리가 뭐야?", cwd=tmp_path, **no_network(hub),
                    FAKE_REPLY=REPLY, FAKE_TOKENS_PER_SECOND="10", MAX_NEW_TOKENS="9")
    try:
        assert ask.wait_exit() == 0
    finally:
        ask.close()
    first, last = ask.first_seen("기준금리는"), ask.first_seen("결정하는데")
    assert first is not None and last is not None and last - first > 0.3
    assert ask.screen().text().splitlines()[-1] == SHOWN
