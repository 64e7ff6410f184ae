"""오늘의 금융용어: the service with a fixed clock, a real migrated database and the fake Slack server.

No test sleeps for the schedule: the clock is a value the test sets, and the job function
(`run_due`) or the trigger computation is called directly.
"""

from __future__ import annotations

import threading
import time as time_module
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from slack_sdk import WebClient
from sqlalchemy import update

from bot import messages_ko
from bot.scheduler import FinbotScheduler, daily_trigger
from bot.term_catalog import Term, load_terms
from bot.term_of_day import (
    METADATA_EVENT_TYPE,
    SECTION_TEXT_LIMIT,
    TERM_OF_DAY_CATCH_UP_JOB_ID,
    TERM_OF_DAY_JOB_ID,
    TermOfDayConfig,
    TermOfDayService,
    build_post,
    definition_instruction,
    schedule_term_of_day,
    term_question,
    today_term_message,
)
from llm.engine import FakeEngine, GenerationEngine, SamplingParams
from storage.conversations import ConversationStore
from storage.db import create_db_engine, make_session_factory, upgrade_database
from storage.models import TermPost
from storage.term_posts import TermPostStore
from tests.fakes.slack_server import FakeSlack

SEOUL = ZoneInfo("Asia/Seoul")
TERMS = [
    Term("기준금리", "통화정책", "Base rate"),
    Term("양적완화", "통화정책", "Quantitative easing"),
    Term("환율", "금융시장", "Exchange rate"),
]


def at(day: date, hour: int = 9, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=SEOUL)


@dataclass
class Clock:
    value: datetime

    def __call__(self) -> datetime:
        return self.value


class FailingEngine(GenerationEngine):
    name = "failing"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def stream(self, prompt_ids, params, cancel=None):
        self.calls += 1
        raise RuntimeError("CUDA out of memory (simulated)")


class RecordingEngine(FakeEngine):
    """The fake engine, keeping the prompt ids it was given."""

    def __init__(self, tokenizer, reply_template: str) -> None:
        super().__init__(tokenizer, reply_template)
        self.prompts: list[list[int]] = []

    def stream(self, prompt_ids, params, cancel=None):
        self.prompts.append(list(prompt_ids))
        return super().stream(prompt_ids, params, cancel)


@dataclass
class Instance:
    """One bot instance: its own database engine, stores and Slack client."""

    service: TermOfDayService
    conversations: ConversationStore
    posts: TermPostStore
    sleeps: list[float] = field(default_factory=list)


@pytest.fixture
def fake_slack(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSlack]:
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with FakeSlack() as fake:
        yield fake


@pytest.fixture
def make_instance(database_url: str, fake_slack: FakeSlack, mistral_tokenizer):
    upgrade_database(database_url)
    engines = []

    def make(
        clock: Clock,
        *,
        terms: Sequence[Term] = TERMS,
        engine: GenerationEngine | None = None,
        reply: str = "**{question}** 정의는 이렇습니다. 예를 들어 설명해요.",
        **config: object,
    ) -> Instance:
        db_engine = create_db_engine(database_url)
        engines.append(db_engine)
        factory = make_session_factory(db_engine)
        posts, conversations = TermPostStore(factory), ConversationStore(factory)
        sleeps: list[float] = []
        settings = {"channels": ("C1",), "retry_delay": timedelta(seconds=2), **config}
        service = TermOfDayService(
            config=TermOfDayConfig(**settings),  # type: ignore[arg-type]
            posts=posts,
            conversations=conversations,
            engine=engine or FakeEngine(mistral_tokenizer, reply),
            client=WebClient(token=fake_slack.bot_token, base_url=fake_slack.api_url),
            terms=terms,
            sampling=SamplingParams(max_new_tokens=256),
            now=clock,
            sleep=sleeps.append,
        )
        return Instance(service, conversations, posts, sleeps)

    yield make
    for db_engine in engines:
        db_engine.dispose()


def posts_in(fake: FakeSlack, channel: str = "C1") -> list[dict]:
    return [m for m in fake.messages(channel=channel) if m.get("thread_ts") is None]


# ---------------------------------------------------------------------------- calendar and history


def test_daily_job_across_seollal_2026_and_a_substitute_holiday_never_repeats(make_instance, fake_slack):
    clock = Clock(at(date(2026, 2, 12)))
    bot = make_instance(clock, terms=load_terms())
    posted_days = []
    day = date(2026, 2, 12)
    while day <= date(2026, 3, 4):
        clock.value = at(day)
        outcomes = bot.service.run_due()
        if outcomes:
            assert [o.status for o in outcomes] == ["posted"], outcomes
            posted_days.append(day)
        day += timedelta(days=1)
    # 2/14-15 weekend, 2/16-18 설날 연휴, 2/28-3/1 weekend, 3/2 삼일절 대체 휴일.
    expected = [date(2026, 2, d) for d in (12, 13, 19, 20, 23, 24, 25, 26, 27)] + [date(2026, 3, 3), date(2026, 3, 4)]
    assert posted_days == expected
    terms = [p.term for p in bot.posts.history("C1", limit=100)]
    assert len(terms) == len(expected) == len(set(terms))
    assert len(posts_in(fake_slack)) == len(expected)


def test_no_term_repeats_in_a_channel_until_the_catalog_is_exhausted(make_instance):
    clock = Clock(at(date(2026, 3, 3)))
    bot = make_instance(clock, include_weekends=True, include_holidays=True, channels=("C1", "C2"))
    for offset in range(7):
        clock.value = at(date(2026, 3, 3) + timedelta(days=offset))
        assert {o.status for o in bot.service.run_due()} == {"posted"}
    for channel in ("C1", "C2"):
        history = list(reversed([p.term for p in bot.posts.history(channel)]))
        assert len(history) == 7
        assert set(history[0:3]) == set(history[3:6]) == {t.term for t in TERMS}
        assert history[6] in {t.term for t in TERMS}


def test_an_operators_pin_wins_even_for_a_term_outside_the_catalog(make_instance, fake_slack):
    day = date(2026, 3, 3)
    bot = make_instance(Clock(at(day)))
    bot.posts.pin(day, "환율")
    bot.posts.pin(day + timedelta(days=1), "스테이블코인")
    bot.service.run_due()
    bot.service.now = Clock(at(day + timedelta(days=1)))
    bot.service.run_due()
    assert [(p.term, p.category) for p in reversed(bot.posts.history("C1"))] == [("환율", "금융시장"), ("스테이블코인", "기타")]
    headers = [m["blocks"][0]["text"]["text"] for m in posts_in(fake_slack)]
    assert "환율 (Exchange rate)" in headers[0] and "스테이블코인" in headers[1]


# ---------------------------------------------------------------------------- exactly once


def test_two_instances_on_one_database_post_once(make_instance, fake_slack):
    clock = Clock(at(date(2026, 3, 3), 9, 0))
    first, second = make_instance(clock), make_instance(clock)
    assert [o.status for o in first.service.run_due()] == ["posted"]
    assert [o.status for o in second.service.run_due()] == ["skipped"]
    # A retried (or misfired and re-run) job of the same instance does nothing either.
    clock.value = at(date(2026, 3, 3), 9, 30)
    assert [o.status for o in first.service.run_due()] == ["skipped"]
    assert len(fake_slack.calls_to("chat.postMessage")) == 1


def test_concurrent_runs_from_two_threads_post_once(make_instance, fake_slack):
    clock = Clock(at(date(2026, 3, 4), 9, 0))
    instances = [make_instance(clock) for _ in range(2)]
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def run(instance: Instance) -> None:
        barrier.wait()
        outcomes.extend(o.status for o in instance.service.run_due())

    threads = [threading.Thread(target=run, args=(instances[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["posted", "skipped", "skipped", "skipped"]
    assert len(fake_slack.calls_to("chat.postMessage")) == 1


def _make_stale(bot: Instance, day: date, claimed_at: datetime) -> None:
    with bot.posts._session_factory() as session:
        session.execute(
            update(TermPost)
            .where(TermPost.post_date == day)
            .values(status="claimed", claimed_by="crashed", claimed_at=claimed_at, slack_ts=None)
        )
        session.commit()


def test_a_crashed_claim_is_taken_over_after_the_stale_time_and_posted_once(make_instance, fake_slack):
    day = date(2026, 3, 5)
    clock = Clock(at(day, 9, 0))
    bot = make_instance(clock)
    bot.posts.claim("C1", day, term="환율", term_key="환율", category="금융시장", claimed_by="crashed", now=at(day))
    clock.value = at(day, 9, 10)  # not stale yet (30 minutes)
    assert [o.status for o in bot.service.run_due()] == ["skipped"]
    clock.value = at(day, 9, 40)
    [outcome] = bot.service.run_due()
    assert (outcome.status, outcome.term) == ("posted", "환율")  # the crashed owner's term is kept
    assert len(posts_in(fake_slack)) == 1


def test_a_takeover_records_the_post_a_crashed_owner_already_made_instead_of_posting_again(make_instance, fake_slack):
    day = date(2026, 3, 5)
    clock = Clock(at(day, 9, 0))
    bot = make_instance(clock)
    [first] = bot.service.run_due()
    # The owner posted, then died before recording it: the row still says 'claimed'.
    _make_stale(bot, day, at(day, 9, 0))
    clock.value = at(day, 10, 0)
    [outcome] = bot.service.run_due()
    assert outcome.status == "skipped" and outcome.slack_ts == first.slack_ts
    assert len(fake_slack.calls_to("chat.postMessage")) == 1
    stored = bot.posts.get("C1", day)
    assert (stored.status, stored.slack_ts) == ("posted", first.slack_ts)


class TakeoverWhileGenerating(FakeEngine):
    """Generates so slowly that the claim goes stale: another instance takes it over and posts
    before this answer is done."""

    def __init__(self, tokenizer, clock: Clock, other: Callable[[], Instance]) -> None:
        super().__init__(tokenizer, "기준금리는 중앙은행이 정하는 금리입니다.")
        self.clock, self.other = clock, other
        self.other_outcomes: list[str] = []

    def stream(self, prompt_ids, params, cancel=None):
        self.clock.value += timedelta(minutes=31)  # past the 30-minute stale time
        self.other_outcomes.extend(o.status for o in self.other().service.run_due())
        return super().stream(prompt_ids, params, cancel)


def test_a_claim_taken_over_while_generating_is_not_posted_by_its_first_owner(
    make_instance, fake_slack, mistral_tokenizer
):
    day = date(2026, 3, 5)
    clock = Clock(at(day, 9, 0))
    second: list[Instance] = []
    engine = TakeoverWhileGenerating(mistral_tokenizer, clock, lambda: second[0])
    first = make_instance(clock, engine=engine)
    second.append(make_instance(clock))
    [outcome] = first.service.run_due()
    assert engine.other_outcomes == ["posted"]  # the second instance took the stale claim and posted
    # One term of the day in the channel, the second instance's, and the record says so.
    posted = [c.params.get("text") for c in fake_slack.calls_to("chat.postMessage")]
    assert len(posted) == 1, f"the day's term was posted {len(posted)} times: {posted}"
    [post] = posts_in(fake_slack)
    assert (outcome.status, outcome.reason) == ("skipped", "claim lost")
    stored = first.posts.get("C1", day)
    assert (stored.status, stored.slack_ts) == ("posted", post["ts"])
    assert stored.claimed_by == second[0].service.instance_id


def test_a_takeover_that_cannot_check_slack_does_not_post(make_instance, fake_slack):
    day = date(2026, 3, 5)
    clock = Clock(at(day, 10, 0))
    bot = make_instance(clock)
    bot.posts.claim("C1", day, term="환율", term_key="환율", category="금융시장", claimed_by="crashed", now=at(day))
    fake_slack.fail_next("conversations.history", error="missing_scope", status=200, retry_after=None)
    [outcome] = bot.service.run_due()
    assert outcome.status == "failed"
    assert fake_slack.calls_to("chat.postMessage") == []
    assert bot.posts.get("C1", day).status == "failed"


# ---------------------------------------------------------------------------- catch-up window


@pytest.mark.parametrize(
    ("now", "posts"),
    [
        (at(date(2026, 3, 3), 8, 59), False),  # before the post time
        (at(date(2026, 3, 3), 9, 0), True),
        (at(date(2026, 3, 3), 14, 59), True),  # started late, within the 6-hour grace
        (at(date(2026, 3, 3), 15, 0), False),  # grace over
        (at(date(2026, 3, 4), 0, 30), False),  # next morning: neither yesterday's term nor today's yet
        (at(date(2026, 3, 2), 12, 0), False),  # 삼일절 대체 휴일
    ],
)
def test_catch_up_after_downtime_only_within_the_grace_of_the_same_day(make_instance, fake_slack, now, posts):
    bot = make_instance(Clock(now))
    outcomes = bot.service.run_due()
    assert [o.status for o in outcomes] == (["posted"] if posts else [])
    assert len(posts_in(fake_slack)) == (1 if posts else 0)
    if posts:
        assert bot.posts.get("C1", now.date()) is not None


def test_a_misfired_job_running_after_midnight_does_not_post_yesterdays_term(make_instance, fake_slack):
    # Down all of 3/3 (a business day); the 09:00 job of 3/3 only gets to run at 3/4 00:05.
    bot = make_instance(Clock(at(date(2026, 3, 4), 0, 5)))
    assert bot.service.run_due() == []
    assert bot.posts.history("C1") == []
    with pytest.raises(ValueError, match="refusing"):
        bot.service.post_in_channel("C1", date(2026, 3, 3))
    assert fake_slack.calls_to("chat.postMessage") == []


# ---------------------------------------------------------------------------- generation and the post


def test_a_service_without_an_engine_plans_but_never_claims(make_instance, fake_slack):
    day = date(2026, 3, 3)
    bot = make_instance(Clock(at(day)))
    bot.service.engine = None  # as `finbot term today --dry-run` builds it
    assert bot.service.choose_term("C1", day) in TERMS
    [outcome] = bot.service.run_due()
    assert outcome.status == "failed" and "no engine" in (outcome.reason or "")
    # No claim was left behind to block the day once an engine is there.
    assert bot.posts.get("C1", day) is None and fake_slack.calls_to("chat.postMessage") == []


def test_generation_failure_is_retried_a_bounded_number_of_times_then_a_fallback_is_posted(
    make_instance, fake_slack, mistral_tokenizer, caplog
):
    engine = FailingEngine(mistral_tokenizer)
    day = date(2026, 3, 3)
    bot = make_instance(Clock(at(day)), engine=engine, generation_attempts=3)
    [outcome] = bot.service.run_due()
    assert outcome.status == "fallback"
    assert engine.calls == 3
    assert bot.sleeps == [2.0, 2.0]  # between attempts, not after the last
    [post] = posts_in(fake_slack)
    assert outcome.term in post["blocks"][0]["text"]["text"]
    question = term_question(outcome.term)
    assert "지금은 설명을 준비하지 못했어요" in post["blocks"][1]["text"]["text"]
    assert question in post["blocks"][1]["text"]["text"]
    stored = bot.posts.get("C1", day)
    assert stored.status == "posted" and "CUDA out of memory" in (stored.error or "")
    assert "CUDA out of memory" in caplog.text


def test_the_post_reaches_slack_as_block_kit_and_its_thread_is_a_conversation(make_instance, fake_slack):
    day = date(2026, 3, 3)
    bot = make_instance(Clock(at(day)), terms=[TERMS[0]])
    [outcome] = bot.service.run_due()
    [post] = posts_in(fake_slack)
    header, section, context, divider, invite = post["blocks"]
    assert header == {
        "type": "header", "text": {"type": "plain_text", "text": ":books: 오늘의 금융용어 · 기준금리 (Base rate)", "emoji": True}
    }
    instruction = definition_instruction("기준금리")
    assert instruction == "'기준금리'라는 금융·경제 용어의 뜻을 먼저 한두 문장으로 정의하고, 예시와 함께 쉽게 설명해줘."
    # The fake engine echoes the instruction it got, in bold: Markdown became mrkdwn.
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert section["text"]["text"].startswith(f"*{instruction}*")
    assert context["elements"][0]["text"] == "분류: *통화정책* · 2026년 3월 3일 (화)"
    assert divider["type"] == "divider"
    assert invite["elements"][0]["text"] == messages_ko.TERM_OF_DAY_INVITE
    assert post["text"] == "오늘의 금융용어: 기준금리 (Base rate)"
    assert post["metadata"]["event_type"] == METADATA_EVENT_TYPE
    assert post["metadata"]["event_payload"]["post_date"] == "2026-03-03"

    conversation = bot.conversations.find_conversation(fake_slack.team_id, "C1", post["ts"])
    assert conversation is not None
    stored = bot.posts.get("C1", day)
    assert stored.slack_ts == post["ts"] == outcome.slack_ts
    assert bot.conversations.history(conversation) == [("기준금리가 뭐야?", stored.explanation)]
    assert stored.explanation.startswith(f"**{instruction}**")


def test_the_prompt_is_the_seed_layout_and_an_echo_of_it_is_not_posted(make_instance, fake_slack, mistral_tokenizer):
    # The model repeats the instruction and its [/INST] before answering: the echo must go.
    engine = RecordingEngine(mistral_tokenizer, "{question} [/INST] 기준금리는 중앙은행이 정하는 금리입니다.")
    day = date(2026, 3, 3)
    bot = make_instance(Clock(at(day)), terms=[TERMS[0]], engine=engine)
    [outcome] = bot.service.run_due()
    assert outcome.status == "posted"
    instruction = definition_instruction("기준금리")
    assert engine.prompts == [mistral_tokenizer(f"[INST]{instruction} [/INST]")["input_ids"]]
    assert bot.posts.get("C1", day).explanation == "기준금리는 중앙은행이 정하는 금리입니다."


def test_long_explanations_are_split_into_sections_within_slacks_limit():
    paragraph = "금리는 돈의 가격입니다. " * 40
    explanation = "\n\n".join([paragraph] * 10)
    _, blocks = build_post(Term("금리", "통화정책", None), explanation, date(2026, 3, 3))
    sections = [b["text"]["text"] for b in blocks if b["type"] == "section"]
    assert len(sections) > 1
    assert all(len(text) <= SECTION_TEXT_LIMIT for text in sections)
    assert "".join(sections).replace("\n", "").replace(" ", "") == explanation.replace("\n", "").replace(" ", "")
    # Without any break to cut at, the text is still cut to the limit and nothing is lost.
    _, blocks = build_post(Term("금리", "통화정책", None), "가" * 7000, date(2026, 3, 3))
    assert [b["text"]["text"] for b in blocks if b["type"] == "section"] == ["가" * 3000, "가" * 3000, "가" * 1000]


def test_particles_follow_the_last_syllable():
    assert term_question("기준금리") == "기준금리가 뭐야?"
    assert term_question("환율") == "환율이 뭐야?"
    assert term_question("주가수익비율(PER)") == "주가수익비율(PER)이(가) 뭐야?"
    assert definition_instruction("환율").startswith("'환율'이라는 ")


# ---------------------------------------------------------------------------- /용어 오늘


def test_today_command_shows_the_post_or_says_why_there_is_none(make_instance):
    day = date(2026, 3, 3)
    clock = Clock(at(day, 8, 0))
    bot = make_instance(clock)
    assert today_term_message(bot.service, "C1") == {"text": messages_ko.TERM_OF_DAY_NOT_YET.format(time="09:00")}
    clock.value = at(day, 9, 0)
    bot.service.run_due()
    shown = today_term_message(bot.service, "C9")  # another channel still sees the term
    assert shown["blocks"][0]["type"] == "header" and bot.posts.get("C1", day).term in shown["text"]

    clock.value = at(date(2026, 2, 17), 10, 0)
    holiday = today_term_message(bot.service, "C1")
    assert holiday == {
        "text": "오늘은 설날이라 오늘의 금융용어를 쉬어요. 다음 용어는 2026년 2월 19일 (목)에 찾아올게요. :palm_tree:"
    }
    clock.value = at(date(2026, 2, 28), 10, 0)
    assert "주말" in today_term_message(bot.service)["text"]


# ---------------------------------------------------------------------------- the scheduler


def test_the_daily_trigger_fires_at_nine_seoul_time():
    trigger = daily_trigger(time(9, 0), "Asia/Seoul")
    assert trigger.get_next_fire_time(None, at(date(2026, 3, 3), 8, 0)) == at(date(2026, 3, 3), 9, 0)
    assert trigger.get_next_fire_time(None, at(date(2026, 3, 3), 9, 1)) == at(date(2026, 3, 4), 9, 0)


def test_scheduling_adds_the_daily_job_with_the_grace_and_a_startup_catch_up(make_instance):
    bot = make_instance(Clock(at(date(2026, 3, 3))), catch_up_grace=timedelta(minutes=90), post_time=time(7, 30))
    scheduler = FinbotScheduler("Asia/Seoul")
    assert schedule_term_of_day(scheduler, bot.service)
    assert set(scheduler.job_ids()) == {TERM_OF_DAY_JOB_ID, TERM_OF_DAY_CATCH_UP_JOB_ID}
    job = scheduler._scheduler.get_job(TERM_OF_DAY_JOB_ID)
    assert job.misfire_grace_time == 90 * 60 and job.coalesce
    # the configured time, not the default 09:00
    assert job.trigger.get_next_fire_time(None, at(date(2026, 3, 3), 7, 0)) == at(date(2026, 3, 3), 7, 30)

    quiet = make_instance(Clock(at(date(2026, 3, 3))), channels=())
    other = FinbotScheduler("Asia/Seoul")
    assert not schedule_term_of_day(other, quiet.service) and other.job_ids() == []


def test_a_started_scheduler_runs_the_startup_job_and_survives_job_errors(caplog):
    scheduler = FinbotScheduler("Asia/Seoul")
    ran, broke = threading.Event(), threading.Event()

    def broken() -> None:
        broke.set()
        raise RuntimeError("boom")

    scheduler.add_startup_job("broken", broken)
    scheduler.add_startup_job("catch-up", ran.set)
    scheduler.add_daily_job("daily", ran.set, at=time(9, 0))
    with caplog.at_level("ERROR"):
        scheduler.start()
        try:
            assert broke.wait(5) and ran.wait(5)
            deadline = time_module.monotonic() + 5
            while "job broken failed" not in caplog.text and time_module.monotonic() < deadline:
                time_module.sleep(0.01)
            assert "job broken failed" in caplog.text and "boom" in caplog.text  # the operator sees why
            assert scheduler.running and scheduler.next_run_time("daily") is not None
        finally:
            scheduler.shutdown()
    assert not scheduler.running


def test_admin_settings_from_the_home_tab_override_the_environment_on_every_instance(make_instance):
    """An admin's channels and time (stored_settings) apply at once where they were made, reach another
    instance on its next refresh (its daily job moves too), and a reset brings the environment's back."""
    from bot.term_of_day import TERM_OF_DAY_SETTINGS_JOB_ID
    from storage.stored_settings import StoredSettingStore

    clock = Clock(at(date(2026, 3, 3), 8, 0))
    here, there = make_instance(clock), make_instance(clock)
    schedulers = []
    for instance in (here, there):
        instance.service.stored_settings = StoredSettingStore(instance.posts._session_factory)
        scheduler = FinbotScheduler("Asia/Seoul")
        assert schedule_term_of_day(scheduler, instance.service)
        scheduler.start()  # a running scheduler, as in `finbot run`: jobs are rescheduled in place
        assert TERM_OF_DAY_SETTINGS_JOB_ID in scheduler.job_ids()
        schedulers.append(scheduler)

    def fires(scheduler: FinbotScheduler) -> datetime:
        return scheduler._scheduler.get_job(TERM_OF_DAY_JOB_ID).trigger.get_next_fire_time(None, clock())

    assert fires(schedulers[1]) == at(date(2026, 3, 3), 9, 0)
    here.service.change_settings(channels=["C7", "C8"], post_time=time(10, 30), by="UADMIN")
    assert (here.service.config.channels, here.service.config.post_time) == (("C7", "C8"), time(10, 30))
    assert here.service.overridden and fires(schedulers[0]) == at(date(2026, 3, 3), 10, 30)
    assert there.service.config.channels == ("C1",)  # not yet: its refresh runs every 30 s
    assert there.service.refresh_settings()
    assert there.service.config.channels == ("C7", "C8") and fires(schedulers[1]) == at(date(2026, 3, 3), 10, 30)

    # No channel at all: nothing is scheduled any more; a reset brings back C1 at 09:00.
    here.service.change_settings(channels=[], by="UADMIN")
    assert TERM_OF_DAY_JOB_ID not in schedulers[0].job_ids()
    here.service.reset_settings(by="UADMIN")
    assert (here.service.config.channels, here.service.config.post_time) == (("C1",), time(9, 0))
    assert not here.service.overridden and fires(schedulers[0]) == at(date(2026, 3, 3), 9, 0)
    for scheduler in schedulers:
        scheduler.shutdown()
