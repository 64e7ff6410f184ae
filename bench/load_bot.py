"""Load test of the real `finbot run` process through the fake Slack server (no GPU, no network).

100 mentions in 100 threads within 10 s, then one follow-up per thread as soon as its first
answer is final, answered by the fake engine at a fixed speed (so what is measured is the bot's
own overhead: events, database, Slack calls, formatting). Reports JSON:

- answered / lost / duplicated questions;
- p50/p95 seconds from event to first visible bot message (placeholder or stream start), to the
  first answer text, and to the final answer;
- the bot process's CPU time per question: user + system CPU seconds of the `finbot run` process
  (psutil, from /proc) between just before the first mention and the end of the load, divided by the
  answered questions (start-up excluded). An idle baseline (the same process's CPU rate over
  `--idle-seconds` with no traffic: Socket Mode pings, the scheduler) is measured first and reported,
  and also subtracted in a separate "net" figure. The whole load is repeated `--runs` times (a fresh
  bot and database each time); the p50 and mean over runs are reported (one process-wide CPU total
  per run cannot be split per message, so "p50" is over runs, not over single messages).

    python bench/load_bot.py                      # defaults: 100 threads, 10 s, 40 tokens/s fake engine, 16 workers
    python bench/load_bot.py --threads 100 --spread 10 --tokens-per-second 40 --workers 16 --out bench/results/load.json

`--engine-env KEY=VALUE` passes extra settings (e.g. ENGINE=fast on a GPU machine with BASE_MODEL/ADAPTER).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bot import messages_ko  # noqa: E402
from tests.e2e.process import start_finbot  # noqa: E402
from tests.fakes.slack_server import FakeSlack  # noqa: E402

REPLY = "답변 {question} 입니다. " + " ".join(["기준금리는", "중앙은행이", "정하는", "정책금리예요."] * 5)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 4)


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50_s": percentile(values, 50), "p95_s": percentile(values, 95),
            "max_s": round(max(values), 4) if values else None}


def build_tokenizer_dir(root: Path) -> Path:
    from llm.synthetic import write_mistral_tokenizer

    directory = root / "tokenizer"
    write_mistral_tokenizer(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--spread", type=float, default=10.0, help="seconds over which the mentions arrive")
    parser.add_argument("--tokens-per-second", type=float, default=40.0, help="fake engine speed (words/s)")
    parser.add_argument("--workers", type=int, default=16, help="GENERATION_WORKERS (enough that answers do not queue)")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="start-up allowance (a real model loads and warms up first)")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3, help="repeat the whole load (fresh bot each time)")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="idle CPU baseline before the load")
    parser.add_argument("--bot-log", type=Path, default=None, metavar="PATH",
                        help="keep the last run's `finbot run` log (it is written to a temporary folder)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="OUT",
                        help="also sample the bot with `py-spy record --gil` during the load (collapsed stacks to OUT)")
    args = parser.parse_args(argv)
    runs = [run_once(args) for _ in range(max(1, args.runs))]
    per_question = [r["bot_cpu_ms_per_question"] for r in runs]
    net = [r["bot_cpu_ms_per_question_net_of_idle"] for r in runs]
    result = {
        **runs[0],
        "runs": len(runs),
        "latencies_and_settings_from": "run 1 (every run's figures are under per_run)",
        "answered": sum(r["answered"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "duplicated": sum(r["duplicated"] for r in runs),
        "exit_code": max(r["exit_code"] for r in runs),
        "bot_cpu_ms_per_question": {
            "p50_over_runs": round(statistics.median(per_question), 2),
            "mean_over_runs": round(statistics.mean(per_question), 2),
            "per_run": per_question,
        },
        "bot_cpu_ms_per_question_net_of_idle": {
            "p50_over_runs": round(statistics.median(net), 2),
            "mean_over_runs": round(statistics.mean(net), 2),
            "per_run": net,
        },
        "cpu_method": (
            "user+system CPU seconds of the `finbot run` process (psutil/proc) from just before the first "
            "mention until all answers were final plus 1 s, divided by the questions answered in that run; "
            "start-up excluded. 'net_of_idle' subtracts the idle CPU rate (measured over idle_seconds with no "
            "traffic before the load) times the load's duration. p50/mean are over runs."
        ),
        "per_run": [{k: r[k] for k in ("start_to_connected_s", "answered", "lost", "duplicated", "event_to_first_visible", "event_to_first_text",
                                        "event_to_final", "bot_cpu_s_total", "bot_cpu_ms_per_question",
                                        "bot_idle_cpu_ms_per_s", "load_s", "exit_code")} for r in runs],
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, ensure_ascii=False, indent=2))
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 and result["exit_code"] == 0 else 1


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    root = Path(tempfile.mkdtemp(prefix="finbot-load-"))
    log = root / "finbot.log"
    extra = dict(item.split("=", 1) for item in args.engine_env)
    with FakeSlack() as fake:
        settings = {
            "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_APP_TOKEN": fake.app_token, "SLACK_API_URL": fake.api_url,
            "DATABASE_URL": args.database_url or f"sqlite:///{root / 'finbot.db'}",
            "ENGINE": "fake",
            # A real engine (--engine-env ENGINE=fast BASE_MODEL=...) brings its own tokenizer.
            "BASE_MODEL": extra.get("BASE_MODEL") or str(build_tokenizer_dir(root)),
            "FAKE_REPLY": REPLY, "FAKE_TOKENS_PER_SECOND": str(args.tokens_per_second),
            "GENERATION_WORKERS": str(args.workers), "LOG_LEVEL": "WARNING",
            # The load comes from a handful of users in one channel, like a busy team; don't rate-limit it.
            "RATE_LIMIT_PER_USER": "0", "RATE_LIMIT_PER_CHANNEL": "0",
            **extra,
        }
        # The fake engine's reply quotes the question, so an answer is found by its marker; a real
        # model's is not: then the thread's k-th bot message is the answer to its k-th question.
        by_marker = settings["ENGINE"] == "fake"
        launched = time.monotonic()
        process = start_finbot("run", cwd=root, log_path=log, **settings)
        try:
            fake.wait_connected(timeout=args.connect_timeout)
            start_to_connected_s = time.monotonic() - launched
            time.sleep(1.0)  # let start-up work settle before the CPU baseline
            bot = psutil.Process(process.pid)
            idle_before, idle_started = bot.cpu_times(), time.monotonic()
            time.sleep(args.idle_seconds)
            idle_after, idle_s = bot.cpu_times(), time.monotonic() - idle_started
            idle_rate = ((idle_after.user - idle_before.user) + (idle_after.system - idle_before.system)) / idle_s
            cpu_before, cpu_started = bot.cpu_times(), time.monotonic()
            profiler = None
            if args.py_spy:
                import subprocess

                profiler = subprocess.Popen(["py-spy", "record", "--pid", str(process.pid), "--gil", "--rate", "250",
                                             "--format", "raw", "--output", str(args.py_spy)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            sent: dict[tuple[str, int], float] = {}  # (thread_ts, turn) -> event sent time
            threads: list[str] = []
            follow_ups_sent: set[str] = set()
            lock = threading.Lock()

            def bot_messages(thread_ts: str) -> list[dict]:
                return [m for m in fake.messages(channel="CLOAD", thread_ts=thread_ts) if m.get("bot_id") == fake.bot_id]

            def final(message: dict) -> bool:
                return message.get("text") not in ("", messages_ko.THINKING) and message.get("stream_state") != "streaming"

            def follow_up_loop(stop: threading.Event) -> None:
                while not stop.is_set():
                    with lock:
                        pending = [t for t in threads if t not in follow_ups_sent]
                    for thread_ts in pending:
                        got = bot_messages(thread_ts)
                        if got and final(got[0]) and (not by_marker or "질문1-" in got[0].get("text", "")):
                            event = fake.message_event(f"질문2-{thread_ts} 그럼 환율은?", channel="CLOAD",
                                                       thread_ts=thread_ts, user="U2")
                            with lock:
                                follow_ups_sent.add(thread_ts)
                                sent[(thread_ts, 2)] = time.time()
                            fake.send_event(event)
                    time.sleep(0.1)

            stop = threading.Event()
            follower = threading.Thread(target=follow_up_loop, args=(stop,), daemon=True)
            follower.start()
            load_started = time.time()
            for index in range(args.threads):
                due = load_started + index * args.spread / args.threads
                time.sleep(max(0.0, due - time.time()))
                ts = fake.next_ts()
                mention = fake.mention_event(f"<@{fake.bot_user_id}> 질문1-{ts} 기준금리가 뭐야?",
                                             channel="CLOAD", ts=ts, user=f"U{index % 7}")
                with lock:
                    sent[(ts, 1)] = time.time()
                    threads.append(ts)
                fake.send_event(mention)
            mentions_done = time.time() - load_started

            def complete() -> bool:
                with lock:
                    if len(follow_ups_sent) < len(threads):
                        return False
                return all(len(got := bot_messages(t)) >= 2 and all(final(m) for m in got) for t in threads)

            deadline = time.time() + args.timeout
            while time.time() < deadline and not complete():
                time.sleep(0.1)
            time.sleep(1.0)  # late duplicates would show up now
            stop.set()
            cpu_after, load_s = bot.cpu_times(), time.monotonic() - cpu_started
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=60)
            if args.bot_log:
                args.bot_log.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, args.bot_log)

        # Per question: which bot message answers it, and when it became visible / got text / was final.
        by_ts: dict[str, list[float]] = {}
        first_text: dict[str, float] = {}
        # Every new bot message per thread (placeholder or stream start), for "first visible".
        posts: dict[str, list[float]] = {}
        for call in fake.calls:
            if not call.response or not call.response.get("ok"):
                continue
            if call.method in ("chat.postMessage", "chat.startStream") and call.params.get("thread_ts"):
                posts.setdefault(str(call.params["thread_ts"]), []).append(call.at)
            ts = call.response.get("ts") or call.params.get("ts")
            if ts is None or call.params.get("channel") != "CLOAD":
                continue
            by_ts.setdefault(str(ts), []).append(call.at)
            text = str(call.params.get("text") or "") + str(call.params.get("markdown_text") or "")
            chunks = call.params.get("chunks")
            if isinstance(chunks, list):
                text += "".join(str(c.get("text", "")) for c in chunks if isinstance(c, dict))
            if text.strip() and text != messages_ko.THINKING and str(ts) not in first_text:
                first_text[str(ts)] = call.at

        to_visible: list[float] = []
        to_text: list[float] = []
        to_final: list[float] = []
        answered = lost = duplicated = 0
        for thread_ts in threads:
            messages = bot_messages(thread_ts)
            for turn in (1, 2):
                if (thread_ts, turn) not in sent:
                    lost += 1
                    continue
                marker = f"질문{turn}-{thread_ts}"
                if by_marker:
                    matching = [m for m in messages if marker in (m.get("text") or "")]
                else:
                    matching = messages[turn - 1 : turn] if len(messages) >= turn and final(messages[turn - 1]) else []
                if not matching:
                    lost += 1
                    continue
                answered += 1
                duplicated += len(matching) - 1
                times = by_ts.get(matching[0]["ts"], [])
                started_at = sent[(thread_ts, turn)]
                visible = [at for at in posts.get(thread_ts, []) if at >= started_at]
                if visible:
                    to_visible.append(min(visible) - started_at)
                if times:
                    to_final.append(max(times) - started_at)
                if matching[0]["ts"] in first_text:
                    to_text.append(first_text[matching[0]["ts"]] - sent[(thread_ts, turn)])
            duplicated += max(0, len(messages) - 2)

        questions = 2 * len(threads)
        cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        answer_seconds = len(REPLY.split(" ")) / args.tokens_per_second
        result = {
            "bench": "load_bot",
            "threads": len(threads),
            "questions": questions,
            "mentions_sent_in_s": round(mentions_done, 2),
            "fake_engine": {"tokens_per_second": args.tokens_per_second, "answer_s": round(answer_seconds, 2),
                            "workers": args.workers} if by_marker else None,
            "workers": args.workers,
            # a real engine loads, tunes and captures its graphs before the bot connects
            "start_to_connected_s": round(start_to_connected_s, 1),
            "answers_matched_by": "question marker" if by_marker else "order in thread",
            "answered": answered,
            "lost": lost,
            "duplicated": duplicated,
            "event_to_first_visible": summary(to_visible),
            "event_to_first_text": summary(to_text),
            "event_to_final": summary(to_final),
            "bot_cpu_s_total": round(cpu_s, 3),
            "bot_cpu_ms_per_question": round(1000 * cpu_s / max(1, answered), 2),
            "bot_idle_cpu_ms_per_s": round(1000 * idle_rate, 2),
            "load_s": round(load_s, 2),
            "bot_cpu_ms_per_question_net_of_idle": round(1000 * (cpu_s - idle_rate * load_s) / max(1, answered), 2),
            "exit_code": exit_code,
            "settings": {k: v for k, v in settings.items() if not k.startswith("SLACK_")},
        }
    if lost or exit_code:  # the operator's log says why
        lines = log.read_text(errors="replace").splitlines()
        print(f"--- last lines of {log} ---", *lines[-60:], sep="\n", file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(main())
