"""`ENGINE=openai`: generation on a remote OpenAI-compatible server such as vLLM.

The prompt is sent to `/v1/completions` (not chat: the chat endpoint would re-render the turns
with the server's chat template) in one of two forms:

- `ids` (default): the exact prompt token ids finbot built, as `prompt: [1, 733, 16289, ...]`.
  vLLM's completions endpoint accepts a list of ints. The model sees exactly the tokens the
  reference engine sees: BOS once, `</s>` as the EOS token between history turns, and no
  re-tokenization drift (SentencePiece does not always round-trip decode→encode; e.g. the
  `[/INST]a1</s>[INST]` joins and leading spaces after special tokens).
- `text`: the same prompt decoded to its `<s>[INST]q1 [/INST]a1</s>[INST]q2 [/INST]` form, for
  servers that only accept strings. The leading `<s>` is left to the server (it adds BOS itself),
  so BOS is not doubled. This is best effort: the server re-tokenizes the text, which can differ
  from finbot's ids by a piece (the legacy tokenizer's prefix spaces after `[/INST]` and `</s>`),
  and a server parses a `</s>` typed by a user as a real end of turn, which the ids form prevents.

Sampling follows the adapter card: temperature, top_p, and top_k (a vLLM extension, sent as an
extra body field), `max_tokens`. `server="transformers"` (`transformers serve`, whose
/v1/completions refuses fields outside OpenAI's schema with HTTP 422 and samples only when the
model's generation config says so) gets top_k and `do_sample` in its `generation_config` field
instead; it takes text prompts only. Streaming uses server-sent events; chunks handed to the bot are
whole characters (a trailing U+FFFD from a server that split a multi-byte character is held back
until the rest arrives). Timeouts, connection errors and bad responses raise `GenerationError`;
HTTP 429 and 503 (server overloaded) raise `EngineBusyError`.

Why the server stopped comes from the choice's `finish_reason`: "length" is the token limit;
"stop" is the model's EOS unless vLLM's `stop_reason` names a stop string (then "stop"); a
stream that ends without any reason, or with one we do not know, reports "error" (the text is
handed over as is, but nothing vouches that it is complete). vLLM ends a stream with
`data: [DONE]`; `transformers serve` just closes it after the chunk with the finish_reason,
which is as good an end. A stream closed before any finish_reason is an error (the server died).

Only the standard library's HTTP client is used, so this engine adds no dependency.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llm.engine import FinishReason, Generation, GenerationEngine, SamplingParams
from llm.errors import EngineBusyError, GenerationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUSY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class OpenAIEngineConfig:
    # Up to and including /v1, e.g. http://vllm:8000/v1
    base_url: str = "http://localhost:8000/v1"
    # vLLM's --served-model-name
    model: str = "finbot"
    api_key: str | None = None
    # Whole request, first byte to last (seconds); also the idle limit between streamed chunks.
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    prompt_format: Literal["ids", "text"] = "ids"
    stream: bool = True
    # Who serves /v1/completions: vLLM (and servers like it), or `transformers serve`.
    server: Literal["vllm", "transformers"] = "vllm"


class OpenAIEngine(GenerationEngine):
    """A `GenerationEngine` whose model runs behind an OpenAI-compatible completions endpoint."""

    name = "openai"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: OpenAIEngineConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self._url = config.base_url.rstrip("/") + "/completions"

    # ------------------------------------------------------------------ request

    def request_body(self, prompt_ids: Sequence[int], params: SamplingParams, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "prompt": self._prompt(prompt_ids),
            "max_tokens": params.max_new_tokens,
            "stream": stream,
        }
        if self.config.server == "transformers":
            # Only OpenAI's fields are accepted; HF generation settings travel as a JSON string.
            extra = {"do_sample": False} if params.greedy else {"do_sample": True, "top_k": params.top_k}
            body["generation_config"] = json.dumps(extra)
            if params.greedy:
                body.update(temperature=0.0, top_p=1.0)
            else:
                body.update(temperature=params.temperature, top_p=params.top_p)
        elif params.greedy:
            body.update(temperature=0.0, top_p=1.0, top_k=-1)
        else:
            # top_k is not in OpenAI's schema; vLLM reads it from the body (0 would mean "none" in HF).
            body.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _prompt(self, prompt_ids: Sequence[int]) -> list[int] | str:
        ids = [int(token_id) for token_id in prompt_ids]
        if self.config.prompt_format == "ids":
            return ids
        bos = self.tokenizer.bos_token_id
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]  # the server's tokenizer adds BOS itself
        return self.tokenizer.decode(
            ids, skip_special_tokens=False, spaces_between_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _open(self, body: dict[str, Any]) -> http.client.HTTPResponse:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if body["stream"] else "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(
            self._url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            # The socket timeout bounds connecting and every read; the overall deadline is checked per chunk.
            return urllib.request.urlopen(request, timeout=max(self.config.connect_timeout_s, 0.1))  # noqa: S310
        except urllib.error.HTTPError as error:
            detail = _error_detail(error)
            if error.code in BUSY_STATUSES:
                raise EngineBusyError(f"inference server at {self._url} is busy (HTTP {error.code}): {detail}") from None
            raise GenerationError(f"inference server at {self._url} answered HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise GenerationError(f"inference server at {self._url} unreachable: {error!r}") from None

    # ------------------------------------------------------------------ GenerationEngine

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        return Generation(self._generate(prompt_ids, params, cancel))

    def _generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Generator[str, None, FinishReason]:
        started = time.monotonic()
        deadline = started + self.config.timeout_s
        body = self.request_body(prompt_ids, params, stream=self.config.stream)
        response = self._open(body)
        try:
            _set_read_timeout(response, _remaining(deadline, self._url))
            if not self.config.stream:
                text, reason = self._read_whole(response, deadline)
                yield from _whole_chars(iter([text]))
                return reason
            reason = yield from _whole_chars(self._read_events(response, deadline, cancel))
            return reason or "error"
        finally:
            response.close()

    def _read_whole(self, response: http.client.HTTPResponse, deadline: float) -> tuple[str, FinishReason]:
        try:
            payload = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise _read_error(error, self._url, deadline) from None
        choice = _choice(payload, self._url)
        return str(choice.get("text") or ""), _finish_reason(choice)

    def _read_events(
        self, response: http.client.HTTPResponse, deadline: float, cancel: threading.Event | None
    ) -> Generator[str, None, FinishReason]:
        # vLLM puts finish_reason on the last choice chunk and only then sends [DONE].
        reason: FinishReason = "error"
        finished = False
        while True:
            if cancel is not None and cancel.is_set():
                return "cancelled"
            _set_read_timeout(response, _remaining(deadline, self._url))
            try:
                line = response.readline()
            except (OSError, http.client.HTTPException) as error:
                raise _read_error(error, self._url, deadline) from None
            if not line:
                if finished:
                    return reason  # transformers serve sends no [DONE] after the last chunk
                raise GenerationError(f"inference server at {self._url} closed the stream before its end")
            line = line.strip()
            if not line or line.startswith(b":"):
                continue  # keep-alive or comment
            if not line.startswith(b"data:"):
                continue  # event:/id: fields carry nothing we use
            data = line[5:].strip()
            if data == b"[DONE]":
                return reason
            try:
                payload = json.loads(data)
            except ValueError:
                raise GenerationError(f"inference server at {self._url} sent a malformed event: {data[:200]!r}") from None
            if "error" in payload:
                raise GenerationError(f"inference server at {self._url} failed mid-stream: {payload['error']}")
            choice = _choice(payload, self._url)
            if choice.get("finish_reason") is not None:
                reason = _finish_reason(choice)
                finished = True
            if text := str(choice.get("text") or ""):
                yield text


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise GenerationError(f"inference server at {url} timed out")
    return left


def _set_read_timeout(response: http.client.HTTPResponse, seconds: float) -> None:
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _read_error(error: BaseException, url: str, deadline: float) -> GenerationError:
    if isinstance(error, socket.timeout | TimeoutError) or time.monotonic() >= deadline:
        return GenerationError(f"inference server at {url} timed out")
    return GenerationError(f"reading from inference server at {url} failed: {error!r}")


def _choice(payload: dict[str, Any], url: str) -> dict[str, Any]:
    try:
        choice = payload["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise GenerationError(f"inference server at {url} sent no choices: {str(payload)[:200]}") from None
    if not isinstance(choice, dict):
        raise GenerationError(f"inference server at {url} sent a malformed choice: {str(choice)[:200]}")
    return choice


def _finish_reason(choice: dict[str, Any]) -> FinishReason:
    """finbot's `FinishReason` for an OpenAI/vLLM completion choice.

    OpenAI says "stop" both for the model's EOS and for a matched stop sequence; vLLM tells them
    apart with `stop_reason` (None for EOS, the matched string, or a stop token id, which is an
    end-of-answer token like EOS). Anything else ("abort", a content filter, none at all) gives
    no assurance that the text is complete: "error".
    """
    reason = choice.get("finish_reason")
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop" if isinstance(choice.get("stop_reason"), str) else "eos"
    return "error"


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()[:500].decode(errors="replace")
    except Exception:  # the body is only for the log line
        raw = ""
    try:
        message = json.loads(raw).get("error", raw)
        if isinstance(message, dict):
            message = message.get("message", message)
        return str(message)[:300]
    except (ValueError, AttributeError):
        return raw[:300]


def _whole_chars(chunks: Iterator[str] | Generator[str, None, FinishReason]) -> Generator[str, None, FinishReason | None]:
    """Hold back a trailing U+FFFD (a split multi-byte character) until the next chunk completes it.

    Returns what `chunks` returned (the finish reason; None for a plain iterator).
    """
    pending = ""
    while True:
        try:
            chunk = next(chunks)
        except StopIteration as stop:
            reason = stop.value
            break
        pending += chunk
        cut = len(pending)
        while cut and pending[cut - 1] == "\ufffd":
            cut -= 1
        if cut:
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending
    return reason


def build_openai_engine(tokenizer: PreTrainedTokenizerBase, config: OpenAIEngineConfig | None = None) -> OpenAIEngine:
    config = config or OpenAIEngineConfig()
    logger.info(
        "remote engine: %s model %s, prompt as %s, streaming %s",
        config.base_url, config.model, config.prompt_format, "on" if config.stream else "off",
    )
    return OpenAIEngine(tokenizer, config)
