"""The process's gRPC event loop: one asyncio loop on a daemon thread that carries every party link.

Party code is synchronous (CrypTen's communicator waits for each message), so the links keep a
blocking ``send`` / ``recv`` API; what moves the bytes is gRPC's asyncio stack on this loop. Why
not gRPC's synchronous API: there each message crosses three Python threads per direction (the
request consumer, the channel's completion-queue thread, the reader), and on a two-core host a
round trip of a bidirectional stream took 0.67-0.70 ms and ~0.4 ms of CPU per end; on one loop
thread the same general channel (a party thread sending and receiving through queues) took
0.39 ms and ~0.23 ms (``bench/link_ping.py``; docs/kv_pruning_history.md, "The link on gRPC's asyncio
stack").

Everything gRPC creates for a link (channels, calls, servers) is made on this loop; other threads
reach it through :func:`call` (run a coroutine and wait), :func:`make` (build an object there) or
:func:`post` (schedule, do not wait).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_tasks: set[asyncio.Task[Any]] = set()  # spawned tasks, held until they end


def get() -> asyncio.AbstractEventLoop:
    """The running link loop (started on first use)."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, daemon=True, name="grpc-links")
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def on_loop() -> bool:
    """Whether the caller runs on the link loop's thread."""
    return _thread is not None and threading.current_thread() is _thread


def call(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the link loop and return its result (from any thread but the loop's own)."""
    if on_loop():
        coro.close()
        raise RuntimeError("aio_loop.call from the link loop would wait for itself")
    return asyncio.run_coroutine_threadsafe(coro, get()).result(timeout)


def make(factory: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``factory(*args, **kwargs)`` run on the link loop (gRPC's asyncio channels and servers belong
    to the loop that made them), its result returned to the caller."""
    async def build() -> T:
        return factory(*args, **kwargs)

    return call(build())


def post(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the link loop soon (from any thread, the loop's own included)."""
    get().call_soon_threadsafe(fn, *args)


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Start ``coro`` as a task on the link loop, without waiting for it (from any thread, the
    loop's own included). The task is held until it ends: asyncio keeps only weak references."""

    def start() -> None:
        task = asyncio.ensure_future(coro)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    get().call_soon_threadsafe(start)
