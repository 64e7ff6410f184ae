"""A local fake OpenAI-compatible completions server (the subset of vLLM's API finbot uses).

Runs aiohttp on 127.0.0.1 in a background thread. Every request body is recorded in
``requests``; ``reply_chunks`` sets the text answered (one event each when streaming),
``finish_reason`` / ``stop_reason`` what the last choice says about why it ended (as vLLM does:
the reason rides on the last text chunk; None leaves it out), and ``fail_next(status)`` /
``delay`` / ``stall_after`` inject errors and slowness.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeOpenAI:
    reply_chunks: list[str] = field(default_factory=lambda: ["기준", "금리는 ", "중앙은행이 ", "정해요."])
    delay: float = 0.0  # before the response starts
    stall_after: int | None = None  # stream this many chunks, then hang
    mid_stream_error: bool = False
    finish_reason: str | None = "stop"
    stop_reason: str | int | None = None
    # vLLM ends a stream with `data: [DONE]`; `transformers serve` just closes it.
    send_done: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    _faults: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stop: asyncio.Event | None = None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, status: int, times: int = 1) -> None:
        self._faults.extend([status] * times)

    def __enter__(self) -> FakeOpenAI:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/completions", self._completions)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, self._sock, shutdown_timeout=0.5).start()
            self._stop = asyncio.Event()
            ready.set()
            await self._stop.wait()
            await self._runner.cleanup()

        self._thread = threading.Thread(target=lambda: self._loop.run_until_complete(serve()), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self._faults:
            status = self._faults.pop(0)
            return web.json_response({"error": {"message": f"fake failure {status}"}}, status=status)
        if self.delay:
            await asyncio.sleep(self.delay)
        if not body.get("stream"):
            return web.json_response(
                {"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                 "choices": [{"index": 0, "text": "".join(self.reply_chunks), **self._ending()}]}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keep-alive\n\n")
        chunks = self.reply_chunks or [""]  # an empty answer still gets its closing event
        for index, chunk in enumerate(chunks):
            if self.stall_after is not None and index >= self.stall_after:
                await asyncio.sleep(3600)
            last = index == len(chunks) - 1 and not self.mid_stream_error
            choice = {"index": 0, "text": chunk, **(self._ending() if last else {"finish_reason": None})}
            event = {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}
            await response.write(f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode())
        if self.mid_stream_error:
            await response.write(b'data: {"error": {"message": "engine died"}}\n\n')
        if self.send_done:
            await response.write(b"data: [DONE]\n\n")
        return response

    def _ending(self) -> dict[str, Any]:
        """The closing choice's fields (vLLM's `stop_reason` only with a reason to go with it)."""
        if self.finish_reason is None:
            return {}
        return {"finish_reason": self.finish_reason, "stop_reason": self.stop_reason}
