"""FSS key generation in worker processes, so that a multi-core dealer host generates in parallel.

Key generation (:func:`protocols.mpc.fss.sign_gen`) is numpy and AES on chunks of elements and
holds the GIL for most of its time, so threads do not add speed. :class:`KeygenWorkers` runs
``processes`` child interpreters (``python -m protocols.mpc.keygen_workers``, started lazily on
first use) and splits one request's elements across them: the dealer draws every random byte
(initial seeds, masks, shares) from ``os.urandom`` in its own process, and a worker gets a
range's ``alpha``, ``beta`` and both parties' initial seeds and returns that range's correction
words, which are deterministic in those inputs. The workers therefore need no randomness.

Wire between the dealer and a worker: its stdin and stdout pipes, raw little-endian bytes only
(nothing pickled): a request is a 16-byte header (``bits``, ``m`` elements) and ``48 m`` bytes
(``alpha`` uint64 [m], ``beta`` int64 [m], seeds uint64 [2, m, 2]); the answer a 16-byte header
(status 0 and the payload's length, or status 1 and an error message's) and the payload, the
correction words as int64 ``[fss.key_words(bits, m) - 2 m]``. A worker exits when its stdin
closes, so it does not outlive the dealer (killed or not): :meth:`KeygenWorkers.close` closes the
pipes and reaps the children, killing one that does not exit in time.

With the compiled kernel (:mod:`protocols.mpc.fss_native`) key generation runs on threads of
the dealer's own process with the GIL released, so :func:`protocols.mpc.fss.sign_gen` does not
hand ranges to these workers and they are never started (they start on first use); they remain
the parallel path of the numpy fallback, and a worker uses the kernel too when it has one.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from protocols.mpc import fss

HEADER = struct.Struct("<QQ")
OK, FAILED = 0, 1
CLOSE_S = 2.0  # how long close() waits for a worker to exit after its stdin closed
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_processes() -> int:
    """Worker processes by default: the dealer host's cores minus one, at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


class KeygenError(fss.FssError):
    """A key-generation worker failed or died."""


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError(f"pipe closed after {0 if data is None else len(data)} of {size} bytes")
    return data


def _read_into(stream: BinaryIO, target: memoryview) -> None:
    done = 0
    while done < target.nbytes:
        got = stream.readinto(target[done:])
        if not got:
            raise EOFError(f"pipe closed after {done} of {target.nbytes} bytes")
        done += got


class KeygenWorkers:
    """``processes`` child processes that generate DCF correction words for ranges of elements."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise KeygenError(f"key generation needs at least one worker process, got {processes}")
        self.processes = processes
        self._lock = threading.Lock()  # one request at a time uses all workers
        self._children_lock = threading.Lock()  # the list of children, also taken by close()
        self._children: list[subprocess.Popen[bytes]] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"KeygenWorkers(processes={self.processes}, started={len(self._children)}, closed={self._closed})"

    @property
    def pids(self) -> list[int]:
        """Process ids of the started workers (empty before first use and after close)."""
        return [child.pid for child in self._children]

    def _start(self) -> list[subprocess.Popen[bytes]]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        with self._children_lock:
            if self._closed:
                raise KeygenError("the key-generation workers are closed")
            while len(self._children) < self.processes:
                self._children.append(subprocess.Popen(
                    [sys.executable, "-m", "protocols.mpc.keygen_workers"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, env=env, cwd=str(REPO_ROOT), close_fds=True))
            return list(self._children)

    def corrections(self, bits: int, parts: list[fss.Part]) -> None:
        """Fill each part's destinations with the correction words of ``(alpha [m], beta [m],
        seeds [2, m, 2])``, at most ``processes`` parts, each on its own worker (read from the
        pipe straight into the destinations)."""
        if len(parts) > self.processes:
            raise KeygenError(f"{len(parts)} parts for {self.processes} worker processes")
        with self._lock:
            children = self._start()
            try:
                for child, (alpha, beta, seeds, _) in zip(children, parts):
                    self._send(child, bits, alpha, beta, seeds)
                for child, part in zip(children, parts):
                    self._receive(child, part[3])
            except (OSError, EOFError, ValueError) as exc:
                self._stop()  # a worker is gone or out of step: start afresh next time
                raise KeygenError(f"a key-generation worker failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _send(child: subprocess.Popen[bytes], bits: int, alpha: np.ndarray, beta: np.ndarray,
              seeds: np.ndarray) -> None:
        stdin = child.stdin
        assert stdin is not None
        stdin.write(HEADER.pack(bits, alpha.shape[0]))
        for array in (alpha, beta, seeds):
            stdin.write(np.ascontiguousarray(array).view(np.uint8).data)
        stdin.flush()

    @staticmethod
    def _receive(child: subprocess.Popen[bytes], destinations: list[np.ndarray]) -> None:
        stdout = child.stdout
        assert stdout is not None
        status, size = HEADER.unpack(_read_exact(stdout, HEADER.size))
        if status != OK:
            raise ValueError(_read_exact(stdout, size).decode(errors="replace"))
        expected = sum(d.nbytes for d in destinations)
        if size != expected:
            raise ValueError(f"a worker answered {size} bytes for {expected}")
        for destination in destinations:
            _read_into(stdout, memoryview(destination).cast("B"))

    def _stop(self, wait_s: float = CLOSE_S) -> None:
        with self._children_lock:
            children, self._children = self._children, []
        for child in children:
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass  # a broken pipe to a dead worker: nothing left to flush
        deadline = time.perf_counter() + wait_s
        for child in children:
            try:
                child.wait(max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:  # still inside a generation: nothing of it is wanted any more
                child.kill()
                child.wait()

    def close(self, wait_s: float = CLOSE_S) -> None:
        """Stop every worker (they exit on the end of their input; one still busy after ``wait_s``
        in all is killed), reap them and refuse further work; a generation in progress fails
        with :class:`KeygenError`."""
        with self._children_lock:
            self._closed = True
        self._stop(wait_s)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """A worker's loop: answer requests from ``stdin`` on ``stdout`` until ``stdin`` closes."""
    scratch = np.empty(0, dtype=np.int64)  # the answer's buffer, kept: no fresh pages per request
    while True:
        header = stdin.read(HEADER.size)
        if not header:
            return
        if len(header) < HEADER.size:
            header += _read_exact(stdin, HEADER.size - len(header))
        bits, m = HEADER.unpack(header)
        body = np.frombuffer(_read_exact(stdin, 48 * m), dtype=np.uint64)
        try:
            needed = fss.key_words(bits, m)
            if scratch.shape[0] < needed:
                scratch = np.empty(needed, dtype=np.int64)
            words = fss.dcf_corrections(body[:m], body[m:2 * m].view(np.int64), body[2 * m:].reshape(2, m, 2), bits,
                                        scratch)
            status, payload = OK, memoryview(words.view(np.uint8))
        except Exception as exc:  # the dealer sees it as a KeygenError naming it
            status, payload = FAILED, memoryview(f"{type(exc).__name__}: {exc}".encode())
        stdout.write(HEADER.pack(status, payload.nbytes))
        stdout.write(payload)
        stdout.flush()


def main() -> None:
    """Entry point of a worker process."""
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        pass  # the dealer stopped or went away: nothing to answer


if __name__ == "__main__":
    main()
