"""ENGINE=openai against a local fake OpenAI-compatible (vLLM-like) completions server."""

from __future__ import annotations

import threading
import time

import pytest

from llm.engine import SamplingParams
from llm.errors import EngineBusyError, GenerationError
from llm.openai_engine import OpenAIEngine, OpenAIEngineConfig, _whole_chars
from llm.prompt import encode_prompt
from tests.fakes.openai_server import FakeOpenAI

PARAMS = SamplingParams(temperature=0.9, top_p=0.8, top_k=50, max_new_tokens=77)


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


def _engine(tokenizer, server: FakeOpenAI, **overrides) -> OpenAIEngine:
    config = OpenAIEngineConfig(**{"base_url": server.base_url, "model": "finbot", "timeout_s": 5, **overrides})
    return OpenAIEngine(tokenizer, config)


def _prompt(tokenizer) -> list[int]:
    return list(encode_prompt(tokenizer, [("기준금리가 뭐야?", "정책금리예요.")], "그럼 환율은?", 3072))


def test_streaming_sends_exact_prompt_ids_and_card_sampling(mistral_tokenizer, server):
    engine = _engine(mistral_tokenizer, server)
    prompt_ids = _prompt(mistral_tokenizer)
    chunks = list(engine.stream(prompt_ids, PARAMS))
    assert "".join(chunks) == "기준금리는 중앙은행이 정해요."
    assert len(chunks) >= 2  # streamed, not one blob
    [body] = server.requests
    assert body["prompt"] == prompt_ids
    assert body["prompt"][0] == mistral_tokenizer.bos_token_id
    assert (body["model"], body["temperature"], body["top_p"], body["top_k"], body["max_tokens"], body["stream"]) == (
        "finbot", 0.9, 0.8, 50, 77, True,
    )


def test_non_streaming_and_text_prompt_form(mistral_tokenizer, server):
    engine = _engine(mistral_tokenizer, server, stream=False, prompt_format="text", api_key="sk-test")
    prompt_ids = _prompt(mistral_tokenizer)
    assert engine.generate(prompt_ids, PARAMS) == "기준금리는 중앙은행이 정해요."
    [body] = server.requests
    assert body["stream"] is False
    # The seed's instruction form with history, exactly what the ids decode to (the legacy
    # tokenizer's prefix spaces included); BOS is left to the server's tokenizer.
    assert body["prompt"] == "[INST]기준금리가 뭐야? [/INST] 정책금리예요.</s> [INST]그럼 환율은? [/INST]"
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_greedy_and_seed(mistral_tokenizer, server):
    engine = _engine(mistral_tokenizer, server)
    engine.generate(_prompt(mistral_tokenizer), SamplingParams(greedy=True, seed=7, max_new_tokens=5))
    body = server.requests[0]
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (0.0, 7, 5)


@pytest.mark.parametrize("status", [429, 503])
def test_overloaded_server_is_engine_busy(mistral_tokenizer, server, status):
    server.fail_next(status)
    with pytest.raises(EngineBusyError, match=str(status)):
        list(_engine(mistral_tokenizer, server).stream([1, 2, 3], PARAMS))


@pytest.mark.parametrize("status", [400, 500])
def test_other_http_errors_are_generation_errors(mistral_tokenizer, server, status):
    server.fail_next(status)
    with pytest.raises(GenerationError, match=f"HTTP {status}.*fake failure"):
        list(_engine(mistral_tokenizer, server).stream([1, 2, 3], PARAMS))


def test_unreachable_server_is_a_generation_error(mistral_tokenizer):
    config = OpenAIEngineConfig(base_url="http://127.0.0.1:9/v1", timeout_s=2, connect_timeout_s=1)
    with pytest.raises(GenerationError, match="unreachable"):
        list(OpenAIEngine(mistral_tokenizer, config).stream([1, 2], PARAMS))


def test_slow_start_times_out(mistral_tokenizer, server):
    server.delay = 3
    engine = _engine(mistral_tokenizer, server, timeout_s=1, connect_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(GenerationError, match="timed out"):
        list(engine.stream([1, 2], PARAMS))
    assert time.monotonic() - started < 2.5


def test_stream_stalling_mid_answer_times_out(mistral_tokenizer, server):
    server.stall_after = 2
    engine = _engine(mistral_tokenizer, server, timeout_s=1)
    received: list[str] = []
    with pytest.raises(GenerationError, match="timed out"):
        for chunk in engine.stream([1, 2], PARAMS):
            received.append(chunk)
    assert "".join(received) == "기준금리는 "


def test_error_event_mid_stream(mistral_tokenizer, server):
    server.mid_stream_error = True
    with pytest.raises(GenerationError, match="engine died"):
        list(_engine(mistral_tokenizer, server).stream([1, 2], PARAMS))


def test_cancel_stops_reading(mistral_tokenizer, server):
    cancel = threading.Event()
    stream = _engine(mistral_tokenizer, server).stream([1, 2], PARAMS, cancel)
    first = next(stream)
    cancel.set()
    assert first == "기준"
    assert list(stream) == []
    assert stream.finish_reason == "cancelled"


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize(
    ("finish_reason", "stop_reason", "expected"),
    [
        ("stop", None, "eos"),  # vLLM: the model's EOS
        ("stop", 2, "eos"),  # a stop token id: an end-of-answer token like EOS
        ("stop", "\n\n", "stop"),  # a stop string matched
        ("length", None, "length"),
        ("abort", None, "error"),  # aborted on the server: nothing says the text is complete
        (None, None, "error"),  # the server never said why it stopped
    ],
)
def test_finish_reason_from_the_server(mistral_tokenizer, server, streaming, finish_reason, stop_reason, expected):
    server.finish_reason, server.stop_reason = finish_reason, stop_reason
    generation = _engine(mistral_tokenizer, server, stream=streaming).stream([1, 2], PARAMS)
    assert generation.finish_reason is None
    assert "".join(generation) == "기준금리는 중앙은행이 정해요."
    assert generation.finish_reason == expected


def test_a_remote_answer_ended_by_the_model_is_kept_whole_and_one_cut_by_max_tokens_is_trimmed(
    mistral_tokenizer, server
):
    from llm.answering import answer_question

    server.reply_chunks = ["기준금리는 ", "한국은행이 ", "정합니다.\n", "출처: ", "한국은행"]
    answer = answer_question(_engine(mistral_tokenizer, server), [], "기준금리?", PARAMS, 3072)
    assert answer == "기준금리는 한국은행이 정합니다.\n출처: 한국은행"
    server.finish_reason = "length"
    answer = answer_question(_engine(mistral_tokenizer, server), [], "기준금리?", PARAMS, 3072)
    assert answer == "기준금리는 한국은행이 정합니다."


def test_split_characters_are_held_back_until_complete():
    assert list(_whole_chars(iter(["가나\ufffd", "다", "\ufffd"]))) == ["가나", "\ufffd다", "\ufffd"]


def test_answering_pipeline_uses_the_remote_engine(mistral_tokenizer, server):
    from llm.answering import answer_question

    answer = answer_question(_engine(mistral_tokenizer, server), [], "기준금리?", PARAMS, 3072)
    assert answer.startswith("기준금리는 중앙은행이")


def test_transformers_serve_gets_sampling_in_its_generation_config_and_may_end_without_done(mistral_tokenizer, server):
    """`transformers serve` answers 422 to fields outside OpenAI's schema (top_k), samples only with
    do_sample, and closes a stream after its finish_reason without `data: [DONE]`."""
    import json

    server.send_done = False
    engine = OpenAIEngine(mistral_tokenizer, OpenAIEngineConfig(
        base_url=server.base_url, model="/models/finbot-merged", timeout_s=5, prompt_format="text", server="transformers",
    ))
    generation = engine.stream(_prompt(mistral_tokenizer), PARAMS)
    assert "".join(generation) == "기준금리는 중앙은행이 정해요."
    assert generation.finish_reason == "eos"
    engine.generate(_prompt(mistral_tokenizer), SamplingParams(greedy=True, max_new_tokens=5))
    sampled, greedy = server.requests
    assert "top_k" not in sampled and "top_k" not in greedy
    assert json.loads(sampled["generation_config"]) == {"do_sample": True, "top_k": 50}
    assert (sampled["temperature"], sampled["top_p"], sampled["max_tokens"]) == (0.9, 0.8, 77)
    assert json.loads(greedy["generation_config"]) == {"do_sample": False} and greedy["temperature"] == 0.0

    # A stream closed before any finish_reason is a dead server, whatever the flavour.
    server.finish_reason = None
    with pytest.raises(GenerationError, match="closed the stream before its end"):
        list(engine.stream(_prompt(mistral_tokenizer), PARAMS))
