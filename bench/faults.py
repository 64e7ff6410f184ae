"""The fault table: every fault finbot must survive, injected several times into real `finbot` processes.

CPU only: the fake engine (slow enough that each fault lands mid-answer), the project's fake Slack
(Web API + Socket Mode), SQLite and a throwaway PostgreSQL server. For each fault and backend it
asks `--questions` questions per round, injects the fault while they are being answered, and
reads every thread afterwards:

- answered: one bot message holding the whole answer;
- apologised: one bot message with an apology (expected only for `engine_oom`'s poisoned question);
- lost: no final answer and no apology (must be 0);
- duplicated: more than one bot message, or a stream left open (must be 0);
- recovery: seconds from the fault to the last question's final message.

    python bench/faults.py                       # every fault, SQLite and PostgreSQL, 3 rounds
    python bench/faults.py --faults kill9_restart,slack_5xx --backends sqlite --rounds 1

Prints a JSON document, then a Markdown table (the one in README's reliability section).
Exit status 1 when anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot import messages_ko  # noqa: E402
from tests.e2e.process import finbot_command, finbot_env, slack_settings, start_finbot  # noqa: E402
from tests.fakes.slack_server import FakeSlack  # noqa: E402
from tests.postgres import RestartablePostgres, find_pg_bin_dir, restartable_postgres_server  # noqa: E402

LAST_WORDS = "이상으로 답변을 마칩니다."
FAKE_REPLY = "답변 시작: {question}. " + "설명을 이어서 드립니다. " * 12 + LAST_WORDS
POISON = "메모리폭탄"
APOLOGIES = {
    messages_ko.GENERATION_FAILED, messages_ko.ANSWER_INTERRUPTED, messages_ko.ANSWER_GAVE_UP,
    messages_ko.GENERATION_TIMED_OUT,
}
FAULTS = (
    "sigterm_restart", "kill9_restart", "kill9_second_instance", "socket_drop", "slack_5xx",
    "db_restart", "engine_oom", "term_of_day_kill",
)


# ---------------------------------------------------------------------------------------- databases


def new_database(pg: RestartablePostgres) -> str:
    return pg.server.create_database()


# ---------------------------------------------------------------------------------------- one round


@dataclass
class Round:
    """One fault injected once: processes, the fake Slack and the questions asked."""

    fake: FakeSlack
    root: Path
    settings: dict[str, str]
    processes: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    questions: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, **extra: str) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}-{len(self.processes)}.log"
        process = start_finbot("run", cwd=self.root, log_path=log, **{**self.settings, **extra})
        self.processes.append((process, log))
        return process

    def ask(self, count: int, prefix: str = "질문", poison: int | None = None) -> None:
        for index in range(count):
            text = f"{prefix} {len(self.threads) + 1}번: 금리가 뭐야?"
            if index == poison:
                text += f" {POISON}"
            mention = self.fake.mention_event(text, channel="C1", user=f"U{len(self.threads):03d}")
            self.fake.send_event(mention)
            self.threads.append(mention["ts"])
            self.questions[mention["ts"]] = text

    def bot_messages(self, thread_ts: str) -> list[dict[str, Any]]:
        return [m for m in self.fake.messages(channel="C1", thread_ts=thread_ts) if m.get("bot_id") == self.fake.bot_id]

    def final(self, thread_ts: str) -> bool:
        messages = self.bot_messages(thread_ts)
        return bool(messages) and all(m.get("stream_state") != "streaming" for m in messages) and any(
            LAST_WORDS in m.get("text", "") or m.get("text") in APOLOGIES for m in messages
        )

    def wait_streaming(self, timeout: float = 60) -> None:
        self.fake.wait_for(
            lambda: all(any("설명을 이어서" in m.get("text", "") or m.get("text") in APOLOGIES
                            for m in self.bot_messages(ts)) for ts in self.threads),
            timeout=timeout, description="every answer streaming",
        )

    def wait_final(self, timeout: float = 120) -> float:
        """Seconds (monotonic clock) when every thread held its final message; raises on timeout."""
        self.fake.wait_for(lambda: all(self.final(ts) for ts in self.threads), timeout=timeout,
                           description="every question finished", interval=0.1)
        return time.monotonic()

    def outcome(self) -> dict[str, int]:
        answered = apologised = lost = duplicated = 0
        for ts in self.threads:
            messages = self.bot_messages(ts)
            texts = [m.get("text", "") for m in messages]
            if len(messages) > 1 or any(m.get("stream_state") == "streaming" for m in messages):
                duplicated += 1
            if any(LAST_WORDS in t and self.questions[ts] in t for t in texts):
                answered += 1
            elif any(t in APOLOGIES for t in texts):
                apologised += 1
            else:
                lost += 1
        return {"questions": len(self.threads), "answered": answered, "apologised": apologised,
                "lost": lost, "duplicated": duplicated}

    def stop_all(self) -> list[str]:
        """SIGTERM every process still running; the logs' problems (tracebacks, bad exits)."""
        problems = []
        for process, _log in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, log in self.processes:
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                code = -9
                problems.append(f"{log.name}: did not stop on SIGTERM")
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                problems.append(f"{log.name}: traceback")
            if code not in (0, -signal.SIGKILL):
                problems.append(f"{log.name}: exit {code}")
        return problems


def kill(process: subprocess.Popen[bytes], how: signal.Signals) -> None:
    process.send_signal(how)
    process.wait(timeout=60)


def run_fault(fault: str, round_: Round, questions: int, pg: RestartablePostgres | None) -> float:
    """Inject `fault` while `questions` are being answered; returns the fault's time (monotonic)."""
    if fault in ("sigterm_restart", "kill9_restart"):
        first = round_.start("first")
        round_.fake.wait_connected(timeout=90)
        round_.ask(questions)
        round_.wait_streaming()
        injected = time.monotonic()
        kill(first, signal.SIGTERM if fault == "sigterm_restart" else signal.SIGKILL)
        round_.start("restarted")
        return injected
    if fault == "kill9_second_instance":
        round_.start("survivor")
        round_.fake.wait_connected(timeout=90)
        victim = round_.start("victim")  # the fake delivers events to the newest connection
        round_.fake.wait_connected(timeout=90, count=2)
        round_.ask(questions)
        round_.wait_streaming()
        injected = time.monotonic()
        kill(victim, signal.SIGKILL)
        return injected
    round_.start("bot")
    round_.fake.wait_connected(timeout=90)
    if fault == "engine_oom":
        round_.ask(questions, poison=0)
        return time.monotonic()
    round_.ask(questions)
    round_.wait_streaming()
    injected = time.monotonic()
    if fault == "socket_drop":
        round_.fake.drop_connections()
    elif fault == "slack_5xx":
        round_.fake.fail_server_errors(status=503, seconds=20)
    elif fault == "db_restart":
        assert pg is not None
        pg.stop()
        time.sleep(2)  # connections fail meanwhile; the bot must retry, not crash
        pg.start()
    else:
        raise ValueError(f"unknown fault {fault}")
    return injected


def term_of_day_kill(root: Path, settings: dict[str, str], fake: FakeSlack) -> dict[str, Any]:
    """`finbot term today` killed between its claim and its post, then run again: posted once."""
    database = settings["DATABASE_URL"]
    extra = {"TERM_OF_DAY_CHANNELS": "C1", "TERM_OF_DAY_INCLUDE_WEEKENDS": "true",
             "TERM_OF_DAY_INCLUDE_HOLIDAYS": "true", "FAKE_TOKENS_PER_SECOND": "8"}
    env = {**settings, **extra}
    log = root / "term-killed.log"
    killed = subprocess.Popen(finbot_command("term", "today"), cwd=root, env=finbot_env(**env),
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def claimed() -> bool:
        return _term_statuses(database) == ["claimed"]

    fake.wait_for(claimed, timeout=90, description="the day claimed")
    injected = time.monotonic()
    kill(killed, signal.SIGKILL)
    rerun = subprocess.run(finbot_command("term", "today"), cwd=root, env=finbot_env(**env),
                           capture_output=True, text=True, timeout=180)
    posts = [m for m in fake.messages(channel="C1") if m.get("thread_ts") is None]
    done = time.monotonic()
    return {
        "questions": 1, "answered": int(len(posts) == 1), "apologised": 0, "lost": int(not posts),
        "duplicated": int(len(posts) > 1), "recovery_s": round(done - injected, 2),
        "problems": [] if rerun.returncode == 0 and "Traceback" not in rerun.stderr else ["rerun failed"],
    }


def _term_statuses(database_url: str) -> list[str]:
    from sqlalchemy import create_engine, text

    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            try:
                return [row[0] for row in connection.execute("select status from term_posts")]
            except sqlite3.OperationalError:
                return []
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [row[0] for row in connection.execute(text("select status from term_posts"))]
    except Exception:  # noqa: BLE001 - not migrated yet
        return []
    finally:
        engine.dispose()


def one_round(fault: str, backend: str, questions: int, pg: RestartablePostgres | None, tokenizer: Path) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"finbot-fault-{fault}-"))
    database_url = new_database(pg) if backend == "postgresql" and pg else f"sqlite:///{root / 'finbot.db'}"
    with FakeSlack() as fake:
        settings = {
            **slack_settings(fake), "DATABASE_URL": database_url, "ENGINE": "fake", "BASE_MODEL": str(tokenizer),
            "FAKE_REPLY": FAKE_REPLY, "FAKE_TOKENS_PER_SECOND": "12", "FAKE_FAIL_ON": f"oom:{POISON}",
            "QUESTION_LEASE_S": "6", "SHUTDOWN_DEADLINE_S": "0.5", "STREAM_FLUSH_SECONDS": "0.2",
            "GENERATION_WORKERS": str(max(4, questions)), "RATE_LIMIT_PER_USER": "0",
            "RATE_LIMIT_PER_CHANNEL": "0", "LOG_LEVEL": "INFO",
        }
        if fault == "term_of_day_kill":
            return term_of_day_kill(root, settings, fake)
        round_ = Round(fake, root, settings)
        problems: list[str] = []
        recovery: float | None = None
        try:
            injected = run_fault(fault, round_, questions, pg)
            try:
                recovery = round_.wait_final(timeout=150) - injected
            except AssertionError as error:
                problems.append(str(error).splitlines()[0])
            time.sleep(1.5)  # a late duplicate would show by now
        finally:
            problems += round_.stop_all()
        result = round_.outcome()
        result["recovery_s"] = None if recovery is None else round(recovery, 2)
        result["problems"] = problems
        return result


def summarize(fault: str, backend: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["recovery_s"] for r in rounds if r["recovery_s"] is not None]
    totals = {key: sum(r[key] for r in rounds) for key in ("questions", "answered", "apologised", "lost", "duplicated")}
    return {
        "fault": fault, "backend": backend, "rounds": len(rounds), **totals,
        "recovery_p50_s": round(statistics.median(times), 2) if times else None,
        "recovery_max_s": max(times) if times else None,
        "problems": [p for r in rounds for p in r["problems"]],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| fault | backend | questions | answered | apologised | lost | duplicated | recovery p50 / max (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['fault']} | {row['backend']} | {row['questions']} | {row['answered']} | {row['apologised']} "
            f"| **{row['lost']}** | **{row['duplicated']}** | {row['recovery_p50_s']} / {row['recovery_max_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {', '.join(FAULTS)}")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=3, help="questions in flight when each fault hits")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    from llm.synthetic import write_mistral_tokenizer

    tokenizer = Path(tempfile.mkdtemp(prefix="finbot-faults-tok-")) / "tokenizer"
    write_mistral_tokenizer(tokenizer)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with _maybe_postgres("postgresql" in args.backends) as pg:
        for backend in [b for b in args.backends.split(",") if b]:
            for fault in faults:
                if fault == "db_restart" and backend != "postgresql":
                    continue  # a SQLite file has no connection to drop
                rounds = []
                for number in range(args.rounds):
                    result = one_round(fault, backend, args.questions, pg, tokenizer)
                    print(f"{fault} [{backend}] round {number + 1}: {json.dumps(result, ensure_ascii=False)}",
                          file=sys.stderr, flush=True)
                    rounds.append(result)
                rows.append(summarize(fault, backend, rounds))
    document = {"faults": rows, "seconds": round(time.monotonic() - started, 1),
                "settings": {"rounds": args.rounds, "questions_per_round": args.questions, "question_lease_s": 6,
                             "shutdown_deadline_s": 0.5, "fake_tokens_per_second": 12}}
    print(json.dumps(document, ensure_ascii=False, indent=2))
    print()
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, ensure_ascii=False, indent=2))
    bad = any(row["lost"] or row["duplicated"] or row["problems"] for row in rows)
    return 1 if bad else 0


@contextmanager
def _maybe_postgres(wanted: bool) -> Iterator[RestartablePostgres | None]:
    if not wanted:
        yield None
        return
    if find_pg_bin_dir() is None:
        raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) not found; use --backends sqlite")
    with restartable_postgres_server() as pg:
        yield pg


if __name__ == "__main__":
    raise SystemExit(main())
