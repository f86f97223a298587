"""CrypTen's communicator over a privinf :class:`~protocols.net.channels.Channel` (2 parties).

:func:`protocols.mpc.cryptenlib.install` makes CrypTen use :class:`ChannelCommunicator` and
binds the calling thread's channel, rank and ledger (:meth:`ChannelCommunicator.attach`);
``crypten.init()`` then calls our ``initialize``, which takes them instead of CrypTen's defaults
(rank 0, world size 1). Per-party state is thread-local, like CrypTen's own
``InProcessCommunicator``, so unit tests can run both parties as threads over
:func:`~protocols.net.channels.memory_pair`.

Counting: every method keeps CrypTen's own statistics (it is wrapped in CrypTen's ``_logging``,
so ``crypten.cfg.communicator.verbose`` works as usual), the channel counts bytes, and the
party's ledger gets one round per exchange on the critical path: one per collective, one per
receive of a point-to-point message (a send alone waits for nothing). Objects (``*_obj``) travel
as JSON, never pickled; only what CrypTen's 2PC core sends is supported (None, bool, int, float,
str, lists, tuples, str-keyed dicts, ``torch.Size`` and tensors).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from torch.distributed import ReduceOp

from privinf.ledger.counting import Ledger
from protocols.mpc.cryptenlib.compat import crypten
from protocols.net.channels import Channel, ProtocolError

_comm_pkg = crypten.communicator
_logging = _comm_pkg.communicator._logging
WORLD_SIZE = 2
_TAG = "crypten."


class CommunicatorError(ValueError):
    """Misuse of the CrypTen communicator: not installed, bad rank, unsupported call or object."""


# ----- JSON objects (instead of pickle) ------------------------------------------------------
def _to_json(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Size):
        return {"__size__": [int(d) for d in obj]}
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_to_json(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) and not k.startswith("__") for k in obj):
            raise CommunicatorError("dict keys of a sent object must be strings not starting with '__'")
        return {k: _to_json(v, tensors) for k, v in obj.items()}
    raise CommunicatorError(
        f"cannot send a {type(obj).__name__} without pickle; supported: None, bool, int, float, "
        "str, list, tuple, dict, torch.Size, torch.Tensor"
    )


def _from_json(data: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [_from_json(x, tensors) for x in data]
    if not isinstance(data, dict):
        return data
    if "__size__" in data:
        return torch.Size(data["__size__"])
    if "__tuple__" in data:
        return tuple(_from_json(x, tensors) for x in data["__tuple__"])
    if "__tensor__" in data:
        index = data["__tensor__"]
        if not isinstance(index, int) or not 0 <= index < len(tensors):
            raise ProtocolError(f"object refers to tensor {index!r} of {len(tensors)} sent")
        return tensors[index]
    return {k: _from_json(v, tensors) for k, v in data.items()}


class _Work:
    """What ``isend``/``irecv`` return: ``wait()`` completes the operation once."""

    def __init__(self, action: Any = None) -> None:
        self._action = action

    def is_completed(self) -> bool:
        return self._action is None

    def wait(self) -> None:
        if self._action is not None:
            action, self._action = self._action, None
            action()


class ChannelCommunicator(_comm_pkg.Communicator):
    """CrypTen ``Communicator`` for 2-party computation over one privinf Channel."""

    BYTES_PER_ELEMENT = 8
    _tls = threading.local()

    def __init__(self, channel: Channel, rank: int, ledger: Ledger | None = None) -> None:
        self.channel = channel
        self.rank = rank
        self.world_size = WORLD_SIZE
        self.ledger = ledger
        self._name = f"rank{rank}"
        self.reset_communication_stats()

    # ----- the class-level protocol crypten.communicator uses ----------------------------
    @classmethod
    def is_initialized(cls) -> bool:
        return getattr(cls._tls, "instance", None) is not None

    @classmethod
    def get(cls) -> ChannelCommunicator | None:
        return getattr(cls._tls, "instance", None)

    @classmethod
    def initialize(cls, rank: int = 0, world_size: int = 1, init_ttp: bool = False) -> None:
        """Called by ``crypten.init()``; uses this thread's :func:`install` binding instead of
        CrypTen's default rank and world size."""
        if init_ttp:
            raise CommunicatorError("CrypTen's TTP provider talks torch.distributed; use the privinf dealer")
        binding = getattr(cls._tls, "binding", None)
        if binding is None:
            raise CommunicatorError("call protocols.mpc.cryptenlib.install(channel, rank, ledger) in this thread "
                                    "before crypten.init()")
        cls._tls.instance = cls(*binding)

    @classmethod
    def shutdown(cls) -> None:
        cls._tls.instance = None

    @classmethod
    def attach(cls, channel: Channel, rank: int, ledger: Ledger | None) -> None:
        """Bind the party this thread runs (``crypten.init()`` will use it)."""
        cls._tls.binding = (channel, rank, ledger)

    @classmethod
    def detach(cls) -> None:
        """Forget this thread's party and its communicator."""
        cls.shutdown()
        cls._tls.binding = None

    # ----- helpers -----------------------------------------------------------------------
    def _other(self, rank: Any, what: str) -> None:
        if rank != 1 - self.rank:
            raise CommunicatorError(f"{what} rank {rank!r} is not the peer of rank {self.rank} (2 parties)")

    def _party(self, rank: Any, what: str) -> None:
        if rank not in (0, 1):
            raise CommunicatorError(f"{what} rank {rank!r} does not exist (2 parties)")

    def _round(self) -> None:
        if self.ledger is not None:
            self.ledger.record_rounds(1)

    def _send(self, op: str, tensors: list[torch.Tensor]) -> None:
        """Send tensors of one dtype as one message (flattened and concatenated)."""
        if len({t.dtype for t in tensors}) > 1:
            raise CommunicatorError(f"{op}: batched tensors must share one dtype")
        flat = tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
        self.channel.send(_TAG + op, flat)

    def _recv(self, op: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Receive one message and split it into tensors shaped like ``like``."""
        data = self.channel.recv(_TAG + op)
        if not isinstance(data, np.ndarray):
            raise ProtocolError(f"{op}: expected an array from the peer, got raw bytes")
        flat = torch.from_numpy(data)
        want = sum(t.numel() for t in like)
        if flat.dtype != like[0].dtype or flat.numel() != want:
            raise ProtocolError(f"{op}: peer sent {flat.numel()} x {flat.dtype}, expected {want} x {like[0].dtype}")
        out, start = [], 0
        for t in like:
            out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.device))
            start += t.numel()
        return out

    @staticmethod
    def _check_op(op: Any) -> None:
        if op != ReduceOp.SUM and op != ReduceOp.BXOR:
            raise CommunicatorError(f"reduce op {op} is not supported (SUM and BXOR are)")

    @staticmethod
    def _combine(op: Any, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return first + second if op == ReduceOp.SUM else first ^ second

    def _in_rank_order(self, mine: torch.Tensor, theirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (mine, theirs) if self.rank == 0 else (theirs, mine)

    @staticmethod
    def _as_list(input: Any, batched: bool, op: str) -> list[torch.Tensor]:
        if batched:
            if not isinstance(input, (list, tuple)) or not input:
                raise CommunicatorError(f"batched {op} needs a non-empty list of tensors")
            return list(input)
        if not torch.is_tensor(input):
            raise CommunicatorError(f"{op} needs a tensor, got {type(input).__name__}")
        return [input]

    @staticmethod
    def _no_group(group: Any, op: str) -> None:
        if group is not None:
            raise CommunicatorError(f"{op}: process groups (CrypTen's TTP) are not supported")

    # ----- point to point ----------------------------------------------------------------
    @_logging
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._other(dst, "send: destination")
        self._send("p2p", [tensor])

    @_logging
    def recv(self, tensor: torch.Tensor, src: int | None = None) -> torch.Tensor:
        if src is not None:
            self._other(src, "recv: source")
        (result,) = self._recv("p2p", [tensor])
        self._round()
        return result

    @_logging
    def isend(self, tensor: torch.Tensor, dst: int) -> _Work:
        self._other(dst, "isend: destination")
        self._send("p2p", [tensor])  # the channel never blocks on the peer: done at once
        return _Work()

    @_logging
    def irecv(self, tensor: torch.Tensor, src: int | None = None) -> _Work:
        if src is not None:
            self._other(src, "irecv: source")

        def complete() -> None:
            (result,) = self._recv("p2p", [tensor])
            tensor.copy_(result)
            self._round()

        return _Work(complete)

    # ----- collectives -------------------------------------------------------------------
    @_logging
    def all_reduce(self, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        tensors = self._as_list(input, batched, "all_reduce")
        self._check_op(op)
        self._send("all_reduce", tensors)
        theirs = self._recv("all_reduce", tensors)
        self._round()
        result = [self._combine(op, *self._in_rank_order(m, t)) for m, t in zip(tensors, theirs)]
        return result if batched else result[0]

    @_logging
    def reduce(self, input: Any, dst: int, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        self._party(dst, "reduce: destination")
        tensors = self._as_list(input, batched, "reduce")
        self._check_op(op)
        self._round()
        if dst != self.rank:
            self._send("reduce", tensors)
            return None
        theirs = self._recv("reduce", tensors)
        result = [self._combine(op, *self._in_rank_order(m, t)) for m, t in zip(tensors, theirs)]
        return result if batched else result[0]

    @_logging
    def broadcast(self, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        self._no_group(group, "broadcast")
        self._party(src, "broadcast: source")
        tensors = self._as_list(input, batched, "broadcast")
        self._round()
        if src == self.rank:
            self._send("broadcast", tensors)
        else:
            for tensor, value in zip(tensors, self._recv("broadcast", tensors)):
                tensor.copy_(value)  # in place, as torch.distributed.broadcast does
        return input

    @_logging
    def gather(self, tensor: torch.Tensor, dst: int) -> list[torch.Tensor | None]:
        self._party(dst, "gather: destination")
        self._round()
        if dst != self.rank:
            self._send("gather", [tensor])
            return [None]
        (theirs,) = self._recv("gather", [tensor])
        return list(self._in_rank_order(tensor.clone(), theirs))

    @_logging
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._send("all_gather", [tensor])
        (theirs,) = self._recv("all_gather", [tensor])
        self._round()
        return list(self._in_rank_order(tensor.clone(), theirs))

    @_logging
    def scatter(self, scatter_list: list[torch.Tensor], src: int, size: Any = None, device: Any = None) -> torch.Tensor:
        self._party(src, "scatter: source")
        self._round()
        if src == self.rank:
            if len(scatter_list) != WORLD_SIZE:
                raise CommunicatorError(f"scatter needs {WORLD_SIZE} tensors, got {len(scatter_list)}")
            self._send("scatter", [scatter_list[1 - self.rank]])
            return scatter_list[self.rank]
        if size is None:
            size = scatter_list[self.rank].size()
        like = torch.empty(size=size, dtype=torch.long, device=device)
        (result,) = self._recv("scatter", [like])
        return result

    @_logging
    def barrier(self) -> None:
        self.channel.send(_TAG + "barrier", b"")
        if self.channel.recv(_TAG + "barrier") != b"":
            raise ProtocolError("barrier message from the peer is not empty")
        self._round()

    # ----- objects (JSON + arrays, no pickle) --------------------------------------------
    def _send_obj(self, op: str, obj: Any) -> None:
        tensors: list[torch.Tensor] = []
        data = _to_json(obj, tensors)
        self.channel.send_json(_TAG + op, {"obj": data, "tensors": len(tensors)})
        for tensor in tensors:
            self.channel.send(_TAG + op + ".tensor", tensor)

    def _recv_obj(self, op: str) -> Any:
        envelope = self.channel.recv_json(_TAG + op)
        if not isinstance(envelope, dict) or not isinstance(envelope.get("tensors"), int) or "obj" not in envelope:
            raise ProtocolError(f"{op}: malformed object envelope from the peer")
        tensors = []
        for _ in range(envelope["tensors"]):
            data = self.channel.recv(_TAG + op + ".tensor")
            if not isinstance(data, np.ndarray):
                raise ProtocolError(f"{op}: expected a tensor from the peer, got raw bytes")
            tensors.append(torch.from_numpy(data))
        return _from_json(envelope["obj"], tensors)

    @_logging
    def send_obj(self, obj: Any, dst: int, group: Any = None) -> None:
        self._no_group(group, "send_obj")
        self._other(dst, "send_obj: destination")
        self._send_obj("obj", obj)

    @_logging
    def recv_obj(self, src: int, group: Any = None) -> Any:
        self._no_group(group, "recv_obj")
        self._other(src, "recv_obj: source")
        result = self._recv_obj("obj")
        self._round()
        return result

    @_logging
    def broadcast_obj(self, obj: Any, src: int, group: Any = None) -> Any:
        self._no_group(group, "broadcast_obj")
        self._party(src, "broadcast_obj: source")
        self._round()
        if src == self.rank:
            if obj is None:
                raise CommunicatorError("broadcast_obj: the source must provide an object")
            self._send_obj("broadcast_obj", obj)
            return obj
        return self._recv_obj("broadcast_obj")

    # ----- identity ----------------------------------------------------------------------
    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        raise CommunicatorError("there is no TTP party: the privinf dealer replaces CrypTen's TTP")

    def set_name(self, name: str) -> None:
        if not isinstance(name, str):
            raise CommunicatorError(f"party name must be a string, got {type(name).__name__}")
        self._name = name

    def get_name(self) -> str:
        return self._name

    def get_distributed_backend(self) -> str:
        return f"privinf:{type(self.channel).__name__}"
