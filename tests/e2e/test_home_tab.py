"""The App Home tab of the real `finbot run` (issue 13): what users and admins see, and admin
controls that act at once, against the fake Slack (views.publish / views.open, block actions).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bot import messages_ko
from tests.e2e.process import running_finbot
from tests.fakes.slack_server import FakeSlack

pytestmark = pytest.mark.e2e

ADMIN = "UHOMEADMIN"
USER = "UHOMEUSER"
REPLY = "{question} 에 대한 답변이에요. 금리는 돈의 가격이에요."
SEOUL = ZoneInfo("Asia/Seoul")
# Every admin control's action id: none may reach a non-admin's view.
ADMIN_ACTION_IDS = (
    "finbot_home_qa_add", "finbot_home_qa_remove", "finbot_home_tod_channels", "finbot_home_tod_time",
    "finbot_home_tod_reset", "finbot_home_pin_open", "finbot_home_pin_remove",
)


@dataclass
class HomeBot:
    fake: FakeSlack
    database: Path
    log: Path

    def rows(self, sql: str, *args: object) -> list[tuple]:
        with sqlite3.connect(self.database) as connection:
            return connection.execute(sql, args).fetchall()

    def open_home(self, user: str) -> dict:
        """The user opens the Home tab; returns the view finbot publishes for them."""
        published = len(self.fake.calls_to("views.publish"))
        self.fake.wait_acked(self.fake.send_event(self.fake.home_opened_event(user)))
        self.fake.wait_for(
            lambda: len([c for c in self.fake.calls_to("views.publish")[published:] if c.params.get("user_id") == user]),
            timeout=30, description=f"the Home tab published for {user}",
        )
        view = self.fake.home_view(user)
        assert view is not None
        return view

    def click(self, user: str, action: dict, view: dict | None = None) -> None:
        """A block action in the Home tab, as Slack sends it (whoever `user` claims to be)."""
        envelope = self.fake.send_interactive({
            "user": {"id": user, "team_id": self.fake.team_id},
            "container": {"type": "view", "view_id": (view or {}).get("id", "VFORGED")},
            "view": view or {"type": "home", "id": "VFORGED", "blocks": [], "state": {"values": {}}},
            "actions": [{"block_id": "b", "action_ts": str(time.time()), **action}],
        })
        self.fake.wait_acked(envelope)

    def ask(self, channel: str, user: str, text: str) -> dict:
        mention = self.fake.mention_event(text, channel=channel, user=user)
        self.fake.wait_acked(self.fake.send_event(mention))
        return self.fake.wait_for_message(channel=channel, thread_ts=mention["ts"], timeout=30,
                                          match=lambda m: bool(m.get("blocks")))


def _text(view: dict) -> str:
    return json.dumps(view, ensure_ascii=False)


@pytest.fixture(scope="module")
def home_bot(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> Iterator[HomeBot]:
    cwd = tmp_path_factory.mktemp("home")
    database = cwd / "finbot.db"
    # Three hours from now: today's term is not due until an admin moves the time.
    later = (datetime.now(SEOUL) + timedelta(hours=3)).strftime("%H:%M")
    with (
        FakeSlack() as fake,
        running_finbot(
            fake, cwd, cwd / "finbot.log",
            DATABASE_URL=f"sqlite:///{database}",
            ENGINE="fake",
            BASE_MODEL=str(tiny_checkpoint.base_dir),
            FAKE_REPLY=REPLY,
            ADMIN_USER_IDS=f"UOTHERADMIN,{ADMIN}",
            TERM_OF_DAY_TIME=later,
            TERM_OF_DAY_INCLUDE_WEEKENDS="true",
            TERM_OF_DAY_INCLUDE_HOLIDAYS="true",
        ),
    ):
        yield HomeBot(fake, database, cwd / "finbot.log")


def test_a_user_sees_what_finbot_does_today_term_and_own_questions_but_no_admin_data(home_bot: HomeBot):
    fake = home_bot.fake
    answer = home_bot.ask("CHOME1", USER, "기준금리가 <뭐야> & 왜?")
    home_bot.ask("CHOME1", "USOMEONEELSE", "남의 질문이에요")

    view = home_bot.open_home(USER)
    text = _text(view)
    assert view["type"] == "home"
    assert messages_ko.HOME_TITLE in text and "@finbot 기준금리가 뭐야?" in text  # what it does, how to ask
    assert messages_ko.HOME_TERM_TITLE in text
    assert messages_ko.HOME_RECENT_TITLE in text
    # Their own question, escaped, linked to its thread, with its status; nobody else's.
    thread = answer["thread_ts"]
    link = f"https://finbot-test.slack.com/archives/CHOME1/p{thread.replace('.', '')}"
    assert f"<{link}|기준금리가 &lt;뭐야&gt; &amp; 왜?>" in text
    assert messages_ko.HOME_STATUS["answered"] in text
    assert "남의 질문" not in text
    # No admin part, and no admin control, however it would be spelled.
    assert messages_ko.HOME_ADMIN_TITLE not in text
    assert not any(action_id in text for action_id in ADMIN_ACTION_IDS)

    # The Messages tab opening publishes nothing.
    published = len(fake.calls_to("views.publish"))
    fake.wait_acked(fake.send_event(fake.home_opened_event(USER, tab="messages")))
    time.sleep(0.5)
    assert len(fake.calls_to("views.publish")) == published


def test_an_admin_sees_the_week_and_controls_act_at_once_and_forged_actions_are_refused(home_bot: HomeBot):
    fake = home_bot.fake
    # A 👎 on an answer, for the admin's review list.
    answer = home_bot.ask("CHOME2", USER, "채권이 뭐야?")
    [buttons] = [b for b in answer["blocks"] if b.get("block_id") == "finbot_feedback"]
    down = next(e for e in buttons["elements"] if e["action_id"] == "finbot_feedback_down")
    home_bot.click(USER, {"type": "button", "action_id": "finbot_feedback_down", "value": down["value"]}, view=None)
    fake.wait_for(lambda: home_bot.rows("select count(*) from feedback where vote = -1") == [(1,)], timeout=15)

    view = home_bot.open_home(ADMIN)
    text = _text(view)
    assert messages_ko.HOME_ADMIN_TITLE in text
    [(questions,)] = home_bot.rows("select count(*) from messages where role = 'user' and slack_user is not null")
    assert f"*질문* {questions}개" in text
    assert "👎 1" in text and messages_ko.HOME_ADMIN_NO_MEDIAN not in text  # votes and a median time
    assert f"archives/CHOME2/p{answer['thread_ts'].replace('.', '')}" in text and "채권이 뭐야?" in text
    assert all(action_id in text for action_id in ADMIN_ACTION_IDS if "remove" not in action_id and "reset" not in action_id)

    # A non-admin's forged clicks change nothing: no Q&A channel, no term-of-day channel, no pin.
    home_bot.click(USER, {"type": "channels_select", "action_id": "finbot_home_qa_add", "selected_channel": "CFORGED"})
    home_bot.click(USER, {"type": "multi_channels_select", "action_id": "finbot_home_tod_channels",
                          "selected_channels": ["CFORGED"]})
    forged_pin = fake.send_interactive({
        "type": "view_submission",
        "user": {"id": USER, "team_id": fake.team_id},
        "view": {"type": "modal", "id": "VFORGEDPIN", "callback_id": "finbot_home_pin", "state": {"values": {
            "pin_date": {"date": {"type": "datepicker", "selected_date": (date.today() + timedelta(days=3)).isoformat()}},
            "pin_term": {"term": {"type": "plain_text_input", "value": "위조"}},
        }}},
    })
    assert fake.wait_acked(forged_pin)["response_action"] == "errors"
    top_level = fake.message_event("여기는 질문 채널인가요?", channel="CFORGED", user=USER)
    fake.wait_acked(fake.send_event(top_level))
    time.sleep(1.5)  # an answer would have started by now
    assert fake.messages(channel="CFORGED") == []
    assert home_bot.rows("select count(*) from qa_channels") == [(0,)]
    assert home_bot.rows("select count(*) from stored_settings") == [(0,)]
    assert home_bot.rows("select count(*) from term_pins") == [(0,)]
    log = home_bot.log.read_text()
    assert f"refused Home tab action finbot_home_qa_add from {USER}" in log
    assert f"refused Home tab pin from {USER}" in log

    # The admin turns a Q&A channel on: its next top-level question is answered, no restart.
    published = len(fake.calls_to("views.publish"))
    home_bot.click(ADMIN, {"type": "channels_select", "action_id": "finbot_home_qa_add", "selected_channel": "CQA"},
                   view=view)
    question = fake.message_event("ETF가 뭐야?", channel="CQA", user=USER)
    fake.wait_acked(fake.send_event(question))
    fake.wait_for_message(channel="CQA", thread_ts=question["ts"], timeout=30, match=lambda m: bool(m.get("blocks")))
    fake.wait_for(lambda: len(fake.calls_to("views.publish")) > published, timeout=15)
    assert "<#CQA>" in _text(fake.home_view(ADMIN)) and "finbot_home_qa_remove" in _text(fake.home_view(ADMIN))

    # Term of the day: a channel, then a post time a minute ago; the post goes out at once.
    home_bot.click(ADMIN, {"type": "multi_channels_select", "action_id": "finbot_home_tod_channels",
                           "selected_channels": ["CTOD"]}, view=view)
    fake.wait_for(lambda: home_bot.rows("select value from stored_settings where key = 'term_of_day.channels'")
                  == [("CTOD",)], timeout=15)
    assert fake.messages(channel="CTOD") == []  # not due yet: the time is three hours away
    now = datetime.now(SEOUL)
    earlier = max(now - timedelta(minutes=1), now.replace(hour=0, minute=0))
    home_bot.click(ADMIN, {"type": "timepicker", "action_id": "finbot_home_tod_time",
                           "selected_time": earlier.strftime("%H:%M")}, view=view)
    post = fake.wait_for_message(channel="CTOD", timeout=30)
    assert messages_ko.TERM_OF_DAY_TITLE in post["blocks"][0]["text"]["text"]
    # The post is recorded right after Slack took it: wait for that, not only for the message.
    [(term,)] = fake.wait_for(
        lambda: home_bot.rows("select term from term_posts where channel_id = 'CTOD' and status = 'posted'"),
        timeout=15, description="the post recorded",
    )
    assert f"scheduled daily job term-of-day at {earlier.strftime('%H:%M')}" in home_bot.log.read_text()
    # Everyone's Home tab shows today's term now.
    assert term in _text(home_bot.open_home(USER))

    # A pin for a coming date through the modal; a date in the past is refused with a reason.
    home_bot.click(ADMIN, {"type": "button", "action_id": "finbot_home_pin_open"}, view=view)
    fake.wait_for(lambda: fake.opened_views, timeout=15, description="the pin modal")
    modal = fake.opened_views[-1]
    assert modal["callback_id"] == "finbot_home_pin"

    def submit(day: date, term: str) -> dict | None:
        return fake.wait_acked(fake.send_interactive({
            "type": "view_submission",
            "user": {"id": ADMIN, "team_id": fake.team_id},
            "view": {**modal, "state": {"values": {
                "pin_date": {"date": {"type": "datepicker", "selected_date": day.isoformat()}},
                "pin_term": {"term": {"type": "plain_text_input", "value": term}},
            }}},
        }))

    refused = submit(now.date() - timedelta(days=1), "환율")
    assert refused["response_action"] == "errors" and "pin_date" in refused["errors"]
    coming = now.date() + timedelta(days=2)
    assert not (submit(coming, "환율") or {}).get("errors")
    assert home_bot.rows("select post_date, term from term_pins") == [(coming.isoformat(), "환율")]
    fake.wait_for(lambda: coming.isoformat() in _text(fake.home_view(ADMIN)), timeout=15)

    # The database refusing the write (here: its table renamed away): the modal stays open with one Korean
    # line, the operator's log gets one WARNING line, no traceback (running_finbot checks on the way out).
    with sqlite3.connect(home_bot.database) as connection:
        connection.execute("alter table term_pins rename to term_pins_away")
    try:
        failed = submit(coming + timedelta(days=1), "금리")
    finally:
        with sqlite3.connect(home_bot.database) as connection:
            connection.execute("alter table term_pins_away rename to term_pins")
    assert failed["response_action"] == "errors"
    assert failed["errors"] == {"pin_term": messages_ko.HOME_PIN_ERROR_SAVE}
    assert "Home tab pin by" in home_bot.log.read_text() and "could not be saved" in home_bot.log.read_text()
