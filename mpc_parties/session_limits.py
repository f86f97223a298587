"""Link limits after the hello, derived from what the session agreed.

Before a valid hello a link takes only the hello phase's few KiB (:data:`~protocols.net.framing.HELLO_LIMITS`).
Once the session is accepted, its links are held to the largest message the agreed session can
legitimately send, computed here from public terms only: the model's shapes (longest input,
widths, vocabulary, heads, largest weight), the protocol and its configuration (FSS key words per
compared element at ``comparison_bits``; the CKKS parameters and rotation keys of the HE plan).
A frame above it is refused on its first chunk with :class:`~protocols.net.framing.LimitExceeded`,
which names the limit; the 2 GiB ceiling (:data:`~protocols.net.framing.MAX_MESSAGE_BYTES`) stays above.

One function, :func:`session_limits`, gives the limit of the computing links (client <-> session
worker, dealer -> computing party); :data:`DEALER_REQUEST_LIMITS` bounds what the dealer takes
from the parties (JSON requests only). The server's welcome names the session's limit, which the
client holds its own links to (:func:`limits_from_welcome`): the numbers are public, and a peer
that lied could only raise the client's limit up to the ceiling it had anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from models.bundle import ModelBundle
from protocols.mpc import fss
from protocols.mpc.vocabulary import GELU_PRODUCTS
from protocols.net.channels import ProtocolError
from protocols.net.framing import MAX_MESSAGE_BYTES, LinkLimits
from protocols.session_spec import SessionSpec

WORD_BYTES = 8  # ring elements are int64; EE and HE arrays are at most float64
HEADROOM = 2  # above the computed largest message: batching and framing we do not model exactly
FLOOR_BYTES = 1 << 20  # control messages (JSON rows, reports) never need a limit below this
DEALER_REQUEST_BYTES = 32 << 20  # the dealer's inbound vocabulary: JSON requests and schedules
DEALER_REQUEST_LIMITS = LinkLimits(DEALER_REQUEST_BYTES, 2 * DEALER_REQUEST_BYTES, "session")
WELCOME_LIMIT_KEY = "frame_limit"
_FSS_WORDS_SAMPLE = 64  # elements over which the DCF keys' per-element words are averaged (one bit word)


COMPARING_ATTENTION = ("softmax", "relu")  # kinds that compare every attention score (max, ReLU)
NORMALISED_ATTENTION = ("softmax", "power", "2quad", "relu", "linear")  # a reciprocal per score row
COMPARING_ACTIVATIONS = (None, "gelu", "relu", "silu")  # None: the model's native GeLU / SiLU
COMPARING_NORMS = (None, "layernorm", "rmsnorm")  # an inverse square root per row
ROW_COMPARISONS = 16  # elements compared per row by a reciprocal's or inverse square root's first guess (bound)


@dataclass(frozen=True)
class SessionShapes:
    """The public sizes a session's messages are made of (elements, not bytes)."""

    tokens: int  # longest input the model takes: its positions, or patches + class token
    tensor: int  # most elements of one tensor: a weight, an activation block, the scores, the logits
    compared: int  # most elements one non-linear step of the variant compares at once
    one_hot: int  # elements of the token one-hot rows (text input), else 0

    @classmethod
    def of(cls, bundle: ModelBundle) -> SessionShapes:
        """Shapes of a loaded model bundle, running its variant."""
        config = bundle.config
        tokens = (config.image_size // config.patch_size) ** 2 + 1 if config.family == "vit" else config.max_positions
        width = max(config.hidden, config.ffn * (2 if config.mlp == "gated" else 1))
        logits = tokens * config.vocab_size if config.family == "decoder" else config.num_classes
        scores = config.heads * tokens * tokens
        largest = max((p.numel() for p in bundle.model.parameters()), default=0)
        tensor = max(largest, tokens * width, scores, logits)
        compared = max(_compared(bundle, layer, tokens) for layer in range(config.layers))
        one_hot = tokens * (1 << max(1, (config.vocab_size - 1).bit_length())) if bundle.input_kind == "text" else 0
        return cls(tokens, tensor, max(compared, config.vocab_size), one_hot)  # + the argmax of a decoding step


def _compared(bundle: ModelBundle, layer: int, tokens: int) -> int:
    """Elements layer ``layer`` of the bundle's variant compares in one step."""
    config, spec = bundle.config, bundle.variant.layer(layer)
    kinds = [head.kind for head in spec.head_kinds(config.heads)]
    act = None if spec.act is None else spec.act.kind
    norm = None if spec.norm is None else spec.norm.kind
    scores = sum(kind in COMPARING_ATTENTION for kind in kinds) * tokens * tokens
    features = tokens * config.hidden if "linear" in kinds else 0  # phi = ReLU on Q and K
    ffn = tokens * config.ffn if act in COMPARING_ACTIVATIONS else 0
    rows = (sum(kind in NORMALISED_ATTENTION for kind in kinds) + (norm in COMPARING_NORMS)) * tokens
    return max(scores, features, ffn, ROW_COMPARISONS * rows)


def _mpc_words(shapes: SessionShapes, spec: SessionSpec) -> int:
    """int64 words of the largest MPC message: an opening of two operands, a dealer reply for a
    non-linear step (FSS sign keys or the fused GeLU's mask products), or the one-hot rows."""
    per_element = len(GELU_PRODUCTS)
    if spec.config.comparisons == "fss":
        bits = spec.config.comparison_bits
        per_element = max(per_element, math.ceil(fss.sign_key_words(bits, _FSS_WORDS_SAMPLE) / _FSS_WORDS_SAMPLE))
    return max(2 * shapes.tensor, per_element * shapes.compared, shapes.one_hot)


def _he_bytes(bundle: ModelBundle, shapes: SessionShapes) -> int:
    """Bytes of the largest HE message: the client's public context (public, relinearisation and
    one Galois key per rotation step of the plan) or a batch of ciphertexts (uncompressed sizes)."""
    from protocols.he.evaluator import PARAMS, HeEvaluator

    meta = getattr(bundle.model, "he_meta", None)
    steps = len(HeEvaluator(bundle.name, bundle.model, meta).rotation_steps()) if meta is not None else 0
    moduli = len(PARAMS.coeff_mod_bit_sizes)
    ciphertext = 2 * PARAMS.poly_modulus_degree * moduli * WORD_BYTES
    switching_key = (moduli - 1) * ciphertext
    context = (steps + 2) * switching_key
    config = bundle.config
    per_tensor = math.ceil(shapes.tensor / PARAMS.slots)
    ciphertexts = (config.heads * shapes.tokens + per_tensor + 1) * ciphertext
    return max(context, ciphertexts)


def largest_message_bytes(spec: SessionSpec, bundle: ModelBundle) -> int:
    """The largest message the agreed session can send on a computing link (before headroom)."""
    shapes = SessionShapes.of(bundle)
    if spec.protocol == "mpc":
        return WORD_BYTES * _mpc_words(shapes, spec)
    if spec.protocol == "he":
        return _he_bytes(bundle, shapes)
    return WORD_BYTES * 2 * shapes.tensor  # ee: transformed weights, inputs and outputs as arrays


def session_limits(spec: SessionSpec, bundle: ModelBundle) -> LinkLimits:
    """Limits of a computing link of the agreed session: the largest message it can send with
    :data:`HEADROOM`, at least :data:`FLOOR_BYTES`, at most the 2 GiB ceiling."""
    wanted = HEADROOM * largest_message_bytes(spec, bundle)
    return LinkLimits(min(MAX_MESSAGE_BYTES, max(FLOOR_BYTES, wanted)))


def limits_from_welcome(reply: dict[str, Any]) -> LinkLimits:
    """The session's limits as the server's welcome names them (the ceiling if it names none)."""
    value = reply.get(WELCOME_LIMIT_KEY, MAX_MESSAGE_BYTES)
    if isinstance(value, bool) or not isinstance(value, int) or not FLOOR_BYTES <= value <= MAX_MESSAGE_BYTES:
        raise ProtocolError(f"the welcome's {WELCOME_LIMIT_KEY} must be an integer in "
                            f"{FLOOR_BYTES}..{MAX_MESSAGE_BYTES}, got {value!r:.40}")
    return LinkLimits(value)
