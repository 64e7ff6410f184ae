from bot.formatting import escape_for_stream, split_message, to_mrkdwn
from bot.rate_limits import QuestionRateLimiter


def test_user_and_channel_limits_slide():
    now = [0.0]
    limiter = QuestionRateLimiter(per_user=2, per_channel=3, window_seconds=10, clock=lambda: now[0])

    def ask(user: str) -> str | None:
        exceeded = limiter.exceeded("T", "C", user)
        if exceeded is None:
            limiter.hit("T", "C", user)
        return exceeded

    assert ask("U1") is None
    assert ask("U1") is None
    assert ask("U1") == "user"
    assert ask("U2") is None
    assert ask("U3") == "channel"
    now[0] = 10.0
    assert ask("U1") is None


def test_checking_counts_nothing_only_hits_do():
    limiter = QuestionRateLimiter(per_user=1, per_channel=0, window_seconds=10, clock=lambda: 0.0)
    assert [limiter.exceeded("T", "C", "U1") for _ in range(3)] == [None, None, None]
    limiter.hit("T", "C", "U1")
    assert limiter.exceeded("T", "C", "U1") == "user"
    assert limiter.exceeded("T", "C", "U2") is None  # other users and the unlimited channel


def test_split_message_prefers_sentence_ends_and_respects_the_limit():
    text = " ".join(f"{n}번째 문장입니다." for n in range(40))
    pieces = split_message(text, 100)
    assert len(pieces) > 1 and all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("다.") for p in pieces)
    assert " ".join(pieces) == text


def test_stream_escaping_is_append_stable():
    raw = "메일은 @here 로 <!channel> & 끝"
    shown = ""
    for end in range(1, len(raw) + 1):
        view = escape_for_stream(raw[:end])
        assert view.startswith(shown)
        shown = view
    assert shown == to_mrkdwn(raw)
