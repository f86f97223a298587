"""The process's link loop: coroutines run on one thread, calls from it are refused, posts keep order."""

from __future__ import annotations

import asyncio
import threading

import pytest

from protocols.net import aio_loop


async def _thread_name() -> str:
    return threading.current_thread().name


def test_call_runs_on_the_link_thread_and_returns() -> None:
    assert aio_loop.call(_thread_name(), timeout=10) == "grpc-links"
    assert not aio_loop.on_loop()


def test_make_builds_on_the_link_thread() -> None:
    assert aio_loop.make(lambda suffix: threading.current_thread().name + suffix, "!") == "grpc-links!"


def test_posts_run_in_order_on_the_loop() -> None:
    seen: list[int] = []
    done = threading.Event()
    for i in range(100):
        aio_loop.post(seen.append, i)
    aio_loop.post(done.set)
    assert done.wait(10)
    assert seen == list(range(100))


def test_call_from_the_loop_itself_is_refused() -> None:
    async def nested() -> str:
        try:
            aio_loop.call(_thread_name())
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "would wait for itself" in aio_loop.call(nested(), timeout=10)


def test_spawned_task_runs_without_waiting() -> None:
    done = threading.Event()

    async def work() -> None:
        await asyncio.sleep(0)
        done.set()

    aio_loop.spawn(work())
    assert done.wait(10)


def test_the_same_loop_serves_every_caller() -> None:
    assert aio_loop.get() is aio_loop.get()
    with pytest.raises(ZeroDivisionError):
        aio_loop.call(_divide(), timeout=10)


async def _divide() -> float:
    return 1 / 0
