"""The dealer's wire vocabulary: the tags, message types and request kinds every party and the
dealer speak, with the payload layout of each request (:class:`TupleRequest`) and of a recorded
schedule (:class:`RequestSchedule`). One module, used by the dealer and all its callers.

Messages on a party <-> dealer channel (JSON control + raw int64 arrays, nothing pickled):
``dealer.seed`` (16 bytes, dealer -> party, once); ``dealer.msg`` JSON from a party, whose
``type`` is one of :data:`MSG_TYPES`: ``tuple`` (``index``, ``request``: one request answered
online), ``preprocess`` (``start``, ``inferences``, ``schedule``: a recorded schedule answered
ahead), ``ws_preprocess`` (weight-stationary corrections, :mod:`protocols.mpc.secure_linear`),
``kvs_triple`` (KV-stationary corrections, :mod:`protocols.kv.stationary`), ``report`` (send the
dealer's ledger rows on ``dealer.rows``) and ``end``; ``dealer.corr`` arrays back.

A request may carry a :class:`ScopeLabel` (``label``: the requesting party's ledger scope, op
kind and step, all public model structure) so the dealer charges the material it sends to the
layer and op that consume it; labels never change what is generated.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from protocols.mpc import fss, fss_bit, fss_dpf

CLIENT_RANK = 0  # the computing parties, as CrypTen ranks them
SERVER_RANK = 1

TAG_SEED = "dealer.seed"
TAG_MSG = "dealer.msg"
TAG_CORR = "dealer.corr"
TAG_ROWS = "dealer.rows"
TAG_EPOCH = "dealer.epoch"  # storage = keep: the epoch id to both parties (JSON) ...
TAG_EPOCH_KEY = "dealer.epoch_key"  # ... and the epoch key to the server (16 raw bytes), offline

MSG_TUPLE = "tuple"
MSG_PREPROCESS = "preprocess"
MSG_WS_PREPROCESS = "ws_preprocess"
MSG_KV_TRIPLE = "kvs_triple"
MSG_REPORT = "report"
MSG_END = "end"
MSG_TYPES = (MSG_TUPLE, MSG_PREPROCESS, MSG_WS_PREPROCESS, MSG_KV_TRIPLE, MSG_REPORT, MSG_END)

KINDS = ("additive", "square", "binary", "wraps", "B2A", "sign", "signbit", "onehot", "rowscale", "gelu", "dpf")
KEY_KINDS = ("sign", "signbit")  # FSS sign-gate keys (arithmetic / bit output): both parties fetch a half
FETCHED_BY_BOTH = KEY_KINDS + ("dpf",)  # dpf: both parties fetch the same shared key words (protocols/mpc/fss_dpf.py)
DPF_KWARGS = ("bits", "payload", "shift")  # a dpf request: domain bits, payload (1: (1); 2: (1, mask)), shift
GELU_MASKS = ("x", "v", "v2", "v3", "v4", "inside", "even", "w")  # order of a gelu request's masks
GELU_PRODUCTS = (("x", "x"), ("v", "v"), ("v", "v2"), ("v2", "v2"), ("v", "v4"), ("v3", "v3"),
                 ("inside", "even"), ("w", "x"))  # mask products it shares (protocols/mpc/fused_gelu.py)
SIGN_BITS_RANGE = (2, 64)
ONEHOT_DOMAIN_MAX = 1 << 16  # a one-hot request's domain: a power of two up to this
ADDITIVE_OPS = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")
_CONV_KWARGS = ("stride", "padding", "dilation", "groups", "output_padding")
CORRECTED_RANK = CLIENT_RANK  # the party that receives corrections for CrypTen tuples
WORLD_SIZE = 2


class DealerError(ValueError):
    """A malformed, unexpected or mismatched dealer request or reply."""


LABEL_PATTERN = re.compile(r"[A-Za-z0-9_.:<>/-]{1,200}")  # a label's scope, op and step: model paths and kinds


@dataclass(frozen=True)
class ScopeLabel:
    """Where a request is charged in the ledgers: the requesting party's scope path (a model
    module path such as ``minilm.layer.0.attn.softmax``), its op kind and its step label ("" for
    none). Public (model structure); bounded and checked on arrival."""

    scope: str
    op: str
    step: str = ""

    def __post_init__(self) -> None:
        for key in ("scope", "op", "step"):
            value = getattr(self, key)
            if not isinstance(value, str) or (value or key != "step") and not LABEL_PATTERN.fullmatch(value):
                raise DealerError(f"a label's {key} must be 1-200 of A-Za-z0-9_.:<>/-, got {value!r:.80}")

    def to_json(self) -> dict[str, str]:
        return {"scope": self.scope, "op": self.op, **({"step": self.step} if self.step else {})}

    @classmethod
    def from_json(cls, data: Any) -> ScopeLabel:
        if not isinstance(data, dict) or set(data) - {"scope", "op", "step"}:
            raise DealerError(f"a request label is an object with scope, op and step, got {data!r:.80}")
        return cls(data.get("scope"), data.get("op"), data.get("step", ""))


def _dims(value: Any, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in value)
    except TypeError:
        raise DealerError(f"{what} must be a list of ints, got {value!r}") from None
    if any(d < 0 for d in dims):
        raise DealerError(f"{what} has a negative dimension: {list(dims)}")
    return dims


def _kwarg_value(key: str, value: Any) -> int | tuple[int, ...]:
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise DealerError(f"conv argument {key}={value!r} must be an int or a list of ints")
    if isinstance(value, int):
        return value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DealerError(f"conv argument {key}={value!r} must be an int or a list of ints")
    return tuple(value)


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """torch's broadcast of shapes ``a`` and ``b`` in plain Python (RuntimeError where torch
    refuses): ``torch.broadcast_shapes`` imports torch._refs and sympy on its first call (~0.4 s)."""
    out = []
    for x, y in itertools.zip_longest(reversed(a), reversed(b), fillvalue=1):
        if x != y and 1 not in (x, y):
            raise RuntimeError(f"shapes {list(a)} and {list(b)} cannot be broadcast")
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``torch.matmul`` of shapes ``a`` and ``b`` (a 1-D operand gains, then loses, a
    dimension; batch dimensions broadcast); RuntimeError where torch would raise one."""
    if not a or not b:
        raise RuntimeError("both arguments to matmul need to be at least 1D")
    left, right = ((1,) + a if len(a) == 1 else a), (b + (1,) if len(b) == 1 else b)
    if left[-1] != right[-2]:
        raise RuntimeError(f"shapes {list(a)} and {list(b)} cannot be multiplied")
    rows = () if len(a) == 1 else (left[-2],)
    cols = () if len(b) == 1 else (right[-1],)
    return broadcast_shape(left[:-2], right[:-2]) + rows + cols


@dataclass(frozen=True)
class TupleRequest:
    """One public request for correlated randomness, as CrypTen's provider receives it."""

    kind: str
    size0: tuple[int, ...]
    size1: tuple[int, ...] = ()
    op: str = ""
    kwargs: tuple[tuple[str, Any], ...] = field(default=())
    label: ScopeLabel | None = field(default=None, compare=False)  # ledger attribution only

    def __post_init__(self) -> None:
        if self.label is not None and not isinstance(self.label, ScopeLabel):
            raise DealerError(f"a request label must be a ScopeLabel, got {type(self.label).__name__}")
        if self.kind not in KINDS:
            raise DealerError(f"unknown tuple kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "additive" and self.op not in ADDITIVE_OPS:
            raise DealerError(f"unsupported additive-triple op {self.op!r}; expected one of {ADDITIVE_OPS}")
        if self.kind in KEY_KINDS:
            keys = dict(self.kwargs)
            bits = keys.get("bits")
            if self.op or set(keys) != {"bits"} or not isinstance(bits, int) \
                    or not SIGN_BITS_RANGE[0] <= bits <= SIGN_BITS_RANGE[1]:
                raise DealerError(f"a {self.kind} request takes only bits in {list(SIGN_BITS_RANGE)}, got "
                                  f"op={self.op!r} {dict(self.kwargs)}")
            return
        if self.kind == "dpf":
            self._check_dpf()
            return
        if self.kind == "onehot":
            domain = dict(self.kwargs).get("domain")
            if self.op or [k for k, _ in self.kwargs] != ["domain"] or isinstance(domain, bool) \
                    or not isinstance(domain, int) or not 2 <= domain <= ONEHOT_DOMAIN_MAX \
                    or domain & (domain - 1):
                raise DealerError(f"a onehot request takes only a domain that is a power of two in "
                                  f"[2, {ONEHOT_DOMAIN_MAX}], got op={self.op!r} {dict(self.kwargs)}")
            return
        if self.kind != "additive" and (self.op or self.kwargs):
            raise DealerError(f"{self.kind} requests take no op or op arguments")
        for key, _ in self.kwargs:
            if key not in _CONV_KWARGS:
                raise DealerError(f"unsupported op argument {key!r}; expected one of {_CONV_KWARGS}")

    def _check_dpf(self) -> None:
        keys = dict(self.kwargs)
        values = [keys.get(k) for k in DPF_KWARGS]
        if self.op or [k for k, _ in self.kwargs] != list(DPF_KWARGS) \
                or any(isinstance(v, bool) or not isinstance(v, int) for v in values) \
                or not 1 <= values[0] <= fss_dpf.MAX_REQUEST_BITS or values[1] not in (1, 2) or not 0 <= values[2] < 64:
            raise DealerError(f"a dpf request takes bits in [1, {fss_dpf.MAX_REQUEST_BITS}], payload 1 or 2 and a "
                              f"shift in [0, 64), got op={self.op!r} {dict(self.kwargs)}")

    @classmethod
    def additive(cls, size0: Any, size1: Any, op: str, **kwargs: Any) -> TupleRequest:
        items = tuple(sorted((k, _kwarg_value(k, v)) for k, v in kwargs.items()))
        return cls("additive", _dims(size0, "size0"), _dims(size1, "size1"), op, items)

    @classmethod
    def sign(cls, size: Any, bits: int) -> TupleRequest:
        """FSS sign-gate keys for a tensor of ``size`` on ``bits``-bit values (both parties fetch)."""
        return cls("sign", _dims(size, "size"), (), "", (("bits", int(bits)),))

    @classmethod
    def sign_bit(cls, size: Any, bits: int) -> TupleRequest:
        """Bit-output FSS sign-gate keys (:mod:`protocols.mpc.fss_bit`) for a tensor of ``size``."""
        return cls("signbit", _dims(size, "size"), (), "", (("bits", int(bits)),))

    @classmethod
    def one_hot(cls, size: Any, domain: int) -> TupleRequest:
        """A random ``rho`` (uniform mod ``domain``) per element and the unit vector ``e_rho``."""
        return cls("onehot", _dims(size, "size"), (), "", (("domain", domain),))

    @classmethod
    def dpf(cls, size: Any, bits: int, payload: int = 1, shift: int = 0) -> TupleRequest:
        """DPF keys (:mod:`protocols.mpc.fss_dpf`) on ``bits``-bit domains at ``alpha = (mask >> shift)
        mod 2^bits`` for a random ring ``mask`` per element, payload ``(1,)`` or ``(1, mask)``."""
        return cls("dpf", _dims(size, "size"), (), "", (("bits", int(bits)), ("payload", int(payload)),
                                                        ("shift", int(shift))))

    @property
    def payload(self) -> int:
        return int(dict(self.kwargs)["payload"])

    @property
    def shift(self) -> int:
        return int(dict(self.kwargs)["shift"])

    @property
    def domain(self) -> int:
        return int(dict(self.kwargs)["domain"])

    @property
    def bits(self) -> int:
        return int(dict(self.kwargs)["bits"])

    def output_shape(self) -> tuple[int, ...]:
        """Shape of the dependent tensor (c, r^2, theta_r, rA, or one party's flat sign keys),
        computed on meta tensors."""
        if self.kind == "sign":
            return (fss.sign_key_words(self.bits, _numel(self.size0)),)
        if self.kind == "signbit":
            return (fss_bit.bit_sign_key_words(self.bits, _numel(self.size0)),)
        if self.kind == "onehot":
            return self.size0 + (self.domain,)
        if self.kind == "dpf":
            return (fss_dpf.shared_words(self.bits, _numel(self.size0), self.payload),)
        if self.kind == "rowscale":
            return (2,) + self.size0
        if self.kind == "gelu":
            return (len(GELU_PRODUCTS),) + self.size0
        if self.kind == "additive":
            a = torch.empty(self.size0, device="meta")
            b = torch.empty(self.size1, device="meta")
            try:
                if self.op == "mul" and not self.kwargs:  # a meta mul imports dynamo (~1 s)
                    return broadcast_shape(self.size0, self.size1)
                if self.op == "matmul" and not self.kwargs:  # a meta matmul imports sympy (~0.4 s)
                    return matmul_shape(self.size0, self.size1)
                return tuple(getattr(torch, self.op)(a, b, **dict(self.kwargs)).shape)
            except RuntimeError as exc:
                raise DealerError(f"{self.op} of shapes {list(self.size0)} and {list(self.size1)} "
                                  f"is invalid: {str(exc).splitlines()[0]}") from None
        if self.kind == "binary":
            return broadcast_shape(self.size0, self.size1)
        return self.size0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "size0": list(self.size0)}
        if self.kind in ("additive", "binary"):
            out["size1"] = list(self.size1)
        if self.op:
            out["op"] = self.op
        if self.kind in KEY_KINDS:
            out["bits"] = self.bits
        elif self.kind == "onehot":
            out["domain"] = self.domain
        elif self.kind == "dpf":
            out.update({k: v for k, v in self.kwargs})
        elif self.kwargs:
            out["kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs}
        if self.label is not None:
            out["label"] = self.label.to_json()
        return out

    def labelled(self, label: ScopeLabel | None) -> TupleRequest:
        """The same request charged to ``label``."""
        return replace(self, label=label)

    @classmethod
    def from_json(cls, data: Any) -> TupleRequest:
        if not isinstance(data, dict) or "kind" not in data or "size0" not in data:
            raise DealerError(f"malformed tuple request: {data!r:.200}")
        label = ScopeLabel.from_json(data["label"]) if "label" in data else None
        return cls._from_json(data).labelled(label)

    @classmethod
    def _from_json(cls, data: dict[str, Any]) -> TupleRequest:
        if data["kind"] in KEY_KINDS:
            bits = data.get("bits")
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise DealerError(f"a {data['kind']} request needs an integer bits, got {bits!r}")
            return cls(data["kind"], _dims(data["size0"], "size0"), (), "", (("bits", bits),))
        if data["kind"] == "dpf":
            return cls("dpf", _dims(data["size0"], "size0"), (), "", tuple((k, data.get(k)) for k in DPF_KWARGS))
        if data["kind"] == "onehot":
            domain = data.get("domain")
            if isinstance(domain, bool) or not isinstance(domain, int):
                raise DealerError(f"a onehot request needs an integer domain, got {domain!r}")
            return cls.one_hot(data["size0"], domain)
        kwargs = data.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise DealerError(f"tuple request kwargs must be an object, got {kwargs!r}")
        items = tuple(sorted((k, _kwarg_value(k, v)) for k, v in kwargs.items()))
        return cls(str(data["kind"]), _dims(data["size0"], "size0"),
                   _dims(data.get("size1", []), "size1"), str(data.get("op", "")), items)


class RequestSchedule:
    """The ordered, public list of tuple requests one inference makes (recorded by party 0)."""

    def __init__(self, requests: list[TupleRequest] | None = None) -> None:
        self.requests: list[TupleRequest] = list(requests or [])

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> TupleRequest:
        return self.requests[index]

    def append(self, request: TupleRequest) -> None:
        self.requests.append(request)

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.requests]

    @classmethod
    def from_json(cls, data: Any) -> RequestSchedule:
        if not isinstance(data, list):
            raise DealerError(f"a request schedule is a JSON list, got {type(data).__name__}")
        return cls([TupleRequest.from_json(item) for item in data])

    def digest(self) -> str:
        """SHA-256 of the canonical JSON (both sides check they preprocess the same schedule)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def correction_bytes(self) -> int:
        """Bytes of corrections party 0 stores per inference of this schedule."""
        return sum(8 * _numel(r.output_shape()) for r in self.requests)

    def has_sign(self) -> bool:
        """Whether any request is for FSS sign keys (which party 1 fetches as well)."""
        return any(r.kind in KEY_KINDS for r in self.requests)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
