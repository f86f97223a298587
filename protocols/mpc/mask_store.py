"""Weight-stationary masks kept between sessions (``storage = keep``), and the dealer's epoch keys.

A weight-stationary linear needs the client to hold ``F = W - B`` and the dealer to know ``B``
(:mod:`protocols.mpc.secure_linear`). With ``storage = regenerate`` ``B`` comes from the server's
per-session seed and ``F`` (model-size in 64-bit ring elements) crosses the wire at every session
set-up. With ``storage = keep``:

* the dealer holds one long-lived *epoch* per client identity (its authenticated certificate
  name): a public random epoch id and a secret 128-bit epoch key, in ``<root>/dealer/NAME.json``;
* the dealer hands the epoch key to the server, the epoch id to both parties (offline, over the
  mutually authenticated links, like the seeds);
* the server hashes what ``F`` is a function of (:func:`weights_digest`: the fixed-point bits and
  the layers' names, shapes and weights) and derives ``mask_id = HMAC(epoch key, digest)`` and the mask seed
  ``HKDF(epoch key, mask_id)`` (:func:`mask_id`, :func:`mask_seed`); ``B`` comes from the mask
  seed, so a changed model gets a fresh ``B`` (reusing ``B`` for new weights would hand the
  client ``W - W'``). The server sends ``mask_id`` to the client, and to the dealer with its
  preprocessing requests, which derives the same seed;
* the client looks ``F`` up under :class:`MaskKey` (mask id, epoch id, model, variant, fixed-point
  bits, layer shapes). A changed model digest or dealer epoch gives another mask id, so the lookup
  finds nothing and the full set-up runs (and its ``F`` is stored under the new key); an entry
  whose recorded key differs from the key its file name promises is refused with an error.

Files: the store directory is created 0700 (an existing one that others can read is refused),
each file 0600, created with ``O_EXCL | O_NOFOLLOW`` under a temporary name, fsynced and renamed
into place (atomic). Masks are safetensors files (raw arrays + a JSON header), nothing pickled.

Security: a stored ``F`` is as sensitive as a share, the dealer's epoch file as a seed. Either
alone looks random to its reader (``B`` is a PRF output under the epoch key); together they give
the weights (``W = F + B``), what a client colluding with the dealer could do. The client's input
stays protected by the per-session seeds, never stored. The dealer, which holds the epoch key,
could confirm a guess of the server's weights against ``mask_id``; the client sees only
``mask_id``, a PRF output under a key it does not hold. Deleting the dealer's epoch file starts a
new epoch (fresh ``B``); entries stored under the old one are then never used and can be deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from protocols.mpc.csprng import SEED_BYTES, hkdf_sha256

STORE_ENV = "PRIVINF_STORE"
MASKS_DIR = "masks"
DEALER_DIR = "dealer"
MASKS_FORMAT = "privinf.masks/1"
EPOCH_FORMAT = "privinf.dealer-epoch/1"
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIGEST_CONTEXT = b"privinf/ws-weights/v1"


class MaskStoreError(ValueError):
    """A store directory or entry that cannot be used safely, or a bad entry id / name."""


def default_store_root() -> Path:
    """``$PRIVINF_STORE``, else ``$XDG_DATA_HOME/privinf``, else ``~/.local/share/privinf``."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "privinf"


def private_dir(path: Path, create: bool = True) -> Path:
    """``path`` as a directory only its owner can enter (created 0700 when ``create``)."""
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise MaskStoreError(f"store directory {path} does not exist") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise MaskStoreError(f"store directory {path} is not a plain directory (a link?): refused")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise MaskStoreError(f"store directory {path} is not private (owner only, mode 0700): refused; "
                             f"chmod 700 {path}")
    return path


def write_private(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to ``path`` atomically as a new 0600 file (O_EXCL|O_NOFOLLOW, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, _CREATE, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=True) as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_private(path: Path) -> int:
    """A read-only descriptor of ``path``, a regular 0600 file of ours (links and shared files are refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise MaskStoreError(f"cannot open {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        os.close(fd)
        raise MaskStoreError(f"{path} is not a private regular file (owner only, mode 0600): refused")
    return fd


def read_private(path: Path) -> bytes:
    """The bytes of ``path``, checked as :func:`open_private` does."""
    with os.fdopen(open_private(path), "rb") as handle:
        return handle.read()


def check_entry_id(entry_id: str) -> str:
    """``entry_id`` if it is an entry id (32 lower-case hex digits)."""
    if not isinstance(entry_id, str) or not _ID_RE.match(entry_id):
        raise MaskStoreError(f"bad stored-mask id {entry_id!r}: expected 32 hex digits (see `privinf masks list`)")
    return entry_id


# ----- derivations -------------------------------------------------------------------------
def weights_digest(layers: Iterable[tuple[str, torch.Tensor]], fixed_point_bits: int) -> bytes:
    """SHA-256 of what ``F`` is a function of besides ``B``: the fixed-point bits and each
    layer's name, shape, dtype and weight bytes, in order."""
    digest = hashlib.sha256(_DIGEST_CONTEXT + f"|{int(fixed_point_bits)}|".encode())
    for name, weight in layers:
        ring = weight.detach().contiguous()
        digest.update(json.dumps([name, list(ring.shape), str(ring.dtype)]).encode())
        digest.update(memoryview(ring.numpy()).cast("B"))
    return digest.digest()


def mask_id(epoch_key: bytes, digest: bytes) -> str:
    """The public name of a model's masks under an epoch: HMAC-SHA256(epoch key, digest), 128 bits."""
    return hmac.new(epoch_key, b"privinf/ws-mask-id/v1|" + digest, hashlib.sha256).hexdigest()[:32]


def mask_seed(epoch_key: bytes, ident: str) -> bytes:
    """The 128-bit seed ``B`` is expanded from, for mask id ``ident`` (server and dealer derive it)."""
    return hkdf_sha256(epoch_key, None, b"privinf/ws-mask/v1|" + check_entry_id(ident).encode(), SEED_BYTES)


# ----- the client's masks ------------------------------------------------------------------
@dataclass(frozen=True)
class MaskKey:
    """What a stored ``F`` is valid for; its hash names the file."""

    mask_id: str
    epoch: str
    model: str
    variant: str
    fixed_point_bits: int
    layers: tuple[tuple[str, int, int], ...]  # (name, out, in) in order

    def to_json(self) -> dict[str, Any]:
        """The key as a JSON object (stored in the file's header)."""
        return {**asdict(self), "layers": [list(layer) for layer in self.layers]}

    @property
    def entry_id(self) -> str:
        """32 hex digits of SHA-256 over the canonical JSON of the key."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StoredEntry:
    """One stored file as ``privinf masks list`` shows it."""

    kind: str  # "masks" (a client's F) or "epoch" (a dealer's epoch key)
    ident: str
    size: int
    created: str
    about: str
    path: Path


class MaskStore:
    """A party's store: client masks under ``<root>/masks``, dealer epochs under ``<root>/dealer``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()

    def _masks_dir(self, create: bool) -> Path:
        if create:
            private_dir(self.root)
        return private_dir(self.root / MASKS_DIR, create)

    def path_of(self, key: MaskKey) -> Path:
        """Where the masks of ``key`` live."""
        return self.root / MASKS_DIR / f"{key.entry_id}.safetensors"

    def load(self, key: MaskKey) -> dict[str, torch.Tensor] | None:
        """The stored ``F`` per layer for ``key``, or None when nothing is stored under it."""
        path = self.path_of(key)
        if not path.exists() and not path.is_symlink():
            return None
        private_dir(path.parent, create=False)
        metadata, tensors = _map_tensors(path)
        if metadata.get("key") != json.dumps(key.to_json(), sort_keys=True):
            raise MaskStoreError(f"stored masks {key.entry_id} were made for another model, epoch or "
                                 f"configuration than their name says: refused (privinf masks delete {key.entry_id})")
        for name, out_features, in_features in key.layers:
            f = tensors.get(name)
            if f is None or f.dtype != torch.int64 or tuple(f.shape) != (out_features, in_features):
                raise MaskStoreError(f"stored masks {key.entry_id} lack a valid {name}: refused "
                                     f"(privinf masks delete {key.entry_id})")
        return tensors

    def save(self, key: MaskKey, masks: dict[str, torch.Tensor]) -> int:
        """Store ``F`` per layer under ``key`` (atomically; an existing entry is replaced); returns the file size."""
        self._masks_dir(create=True)
        metadata = {"format": MASKS_FORMAT, "key": json.dumps(key.to_json(), sort_keys=True),
                    "created": _now()}
        data = save_tensors({name: f.contiguous() for name, f in masks.items()}, metadata)
        write_private(self.path_of(key), [data])
        return len(data)

    def entries(self) -> list[StoredEntry]:
        """Every stored mask file and dealer epoch, oldest first."""
        found: list[StoredEntry] = []
        masks, dealer = self.root / MASKS_DIR, self.root / DEALER_DIR
        for path in sorted(masks.glob("*.safetensors")) if masks.is_dir() else []:
            found.append(_mask_entry(path))
        for path in sorted(dealer.glob("*.json")) if dealer.is_dir() else []:
            found.append(_epoch_entry(path))
        return sorted(found, key=lambda e: e.created)

    def delete(self, ident: str) -> StoredEntry:
        """Delete the entry named ``ident`` (a mask id, or ``dealer:NAME`` for an epoch)."""
        for entry in self.entries():
            if entry.ident == ident:
                entry.path.unlink()
                return entry
        raise MaskStoreError(f"nothing stored under {ident!r} in {self.root} (see `privinf masks list`)")

    def delete_all(self) -> list[StoredEntry]:
        """Delete every stored entry; returns what was deleted."""
        gone = self.entries()
        for entry in gone:
            entry.path.unlink()
        return gone


def _map_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and tensors of a private safetensors file, memory-mapped (pages are
    read when a layer first uses them, not at set-up). The file is opened once, checked through
    its descriptor, and mapped through that same descriptor (no second lookup of the path)."""
    fd = open_private(path)
    try:
        source = f"/proc/self/fd/{fd}"
        if not os.path.exists(source):  # no /proc: read the checked descriptor instead
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read()
            length = int.from_bytes(data[:8], "little")
            return json.loads(data[8:8 + length]).get("__metadata__", {}), load_tensors(data)
        with safe_open(source, "pt") as handle:
            return handle.metadata() or {}, {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, ValueError, SafetensorError) as exc:
        raise MaskStoreError(f"stored masks {path.name} are not a readable safetensors file: {exc}") from None
    finally:
        os.close(fd)


def _mask_entry(path: Path) -> StoredEntry:
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        key = json.loads(meta.get("key", "{}"))
        about = f"{key.get('model')} {key.get('variant')} epoch {str(key.get('epoch'))[:8]}"
    except Exception:  # listing shows an unreadable file instead of failing
        meta, about = {}, "unreadable"
    return StoredEntry("masks", path.name.removesuffix(".safetensors"), path.stat().st_size,
                       meta.get("created", "?"), about, path)


def _epoch_entry(path: Path) -> StoredEntry:
    try:
        data = json.loads(path.read_text())
        about, created = f"dealer epoch {str(data.get('epoch'))[:8]}", str(data.get("created", "?"))
    except (OSError, ValueError):
        about, created = "unreadable", "?"
    return StoredEntry("epoch", f"dealer:{path.stem}", path.stat().st_size, created, about, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----- the dealer's epochs -----------------------------------------------------------------
@dataclass(frozen=True)
class Epoch:
    """A dealer epoch for one client identity: public id, secret key (never logged)."""

    ident: str
    key: bytes

    def __repr__(self) -> str:
        return f"Epoch(ident={self.ident!r})"


def dealer_epoch(root: Path | str | None, client: str) -> Epoch:
    """The dealer's current epoch for ``client`` (its certificate name), created on first use."""
    if not isinstance(client, str) or not _NAME_RE.match(client):
        raise MaskStoreError(f"bad client identity {client!r} for a dealer epoch")
    base = Path(root) if root is not None else default_store_root()
    private_dir(base)
    path = private_dir(base / DEALER_DIR) / f"{client}.json"
    if not path.exists() and not path.is_symlink():
        fresh = {"format": EPOCH_FORMAT, "client": client, "epoch": secrets.token_hex(16),
                 "key": os.urandom(SEED_BYTES).hex(), "created": _now()}
        try:
            write_private_new(path, json.dumps(fresh).encode())
        except FileExistsError:
            pass  # another session created it first: use theirs
    malformed = MaskStoreError(f"dealer epoch file {path} is malformed: refused (delete it to start a new epoch)")
    try:
        data = json.loads(read_private(path))
        epoch, key = str(data["epoch"]), bytes.fromhex(data["key"])
    except (KeyError, ValueError, TypeError):
        raise malformed from None
    if data.get("format") != EPOCH_FORMAT or not _ID_RE.match(epoch) or len(key) != SEED_BYTES:
        raise malformed
    return Epoch(epoch, key)


def write_private_new(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 with ``data`` only if it does not exist (FileExistsError otherwise)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    write_private(tmp, [data])
    try:
        os.link(tmp, path)  # atomic create-if-absent of a complete file
    finally:
        tmp.unlink(missing_ok=True)
