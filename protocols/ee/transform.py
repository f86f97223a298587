"""The owner's one-time model transformation: secret permutations that commute with every op.

What is permuted, and why each op commutes (``P`` the residual-stream permutation):

* Residual stream (all families): every tensor with a hidden axis is permuted along it: the word,
  position and token-type tables (columns), ViT's CLS token and position table, the columns of
  q/k/v/gate/up/LM head/classifier, the rows and biases of o/down/patch projections, the gains
  and biases of every norm. LayerNorm's mean and variance and RMSNorm's mean square are sums over
  the units, so they do not depend on their order; the affine norm's 1/std is a scalar. Residual
  additions are elementwise.
* Vocabulary (encoder, decoder): a scatter permutation of the embedding rows and the LM-head rows
  (tied or not, the same one): the compute node sees permuted ids and returns permuted logits;
  greedy decoding on the compute node feeds its own permuted argmax back in, consistently.
* FFN: one permutation of the intermediate units per layer (rows of gate and up, the same for
  both since they meet in an elementwise product; columns of down). GeLU, quad, ReLU and SiLU are
  elementwise.
* Heads: a permutation of the query heads that keeps GQA groups together (a permutation of the kv
  heads and, inside each group, of its query heads) and keeps each head's attention kernel (for a
  per-head heterogeneous variant heads move only among heads of the same kernel; with GQA and
  heterogeneous kernels the head order is kept).
* Inside a head: v/o dims by any permutation per kv head (attention mixes tokens, never the dims
  of v). q/k dims by one permutation per kv head, shared by q and k (scores are q . k sums over
  the dims; the ``linear`` kernel's feature map is elementwise). With RoPE the dims (i, i + d/2)
  form a pair rotated by a public angle per frequency, all frequencies distinct: a permutation
  must map each pair to itself (only the identity; moving pairs would need the rotation tables
  permuted, and the compute node holds those tables, so it would read the permutation from them).
  Instead each pair of q and k gets the same secret 2-D rotation: rotations of one plane commute,
  and (R q) . (R k) = q . k. Not with the ``linear`` kernel, whose elementwise feature map does not
  commute with a rotation: there the q/k dims stay as they are.
* ViT input: a permutation of the patches (their position-table rows follow; attention is over an
  unmasked set of tokens, and the CLS token stays first) and of the C*p*p pixels inside every
  patch (the patch projection's columns follow); the classifier's rows get a secret label order.

What breaks equivariance is listed in docs/ee.md (anything that mixes units in a fixed order).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from models.attention import Attention
from models.block import MLP, Block
from models.config import ModelConfig
from models.layers import Linear
from protocols.ee.keys import AttentionKey, EeKey, KeySource, inverse


def draw_key(model: nn.Module, source: KeySource | None = None) -> EeKey:
    """Fresh secret permutations for ``model`` (an Encoder, Decoder or ViT)."""
    source = source or KeySource()
    config: ModelConfig = model.config
    blocks = list(model.layer)
    key = EeKey(
        family=config.family,
        hidden=source.permutation(config.hidden),
        ffn=tuple(source.permutation(config.ffn) for _ in blocks),
        attention=tuple(_attention_key(block.attn, config, source) for block in blocks),
    )
    if config.family == "vit":
        return dataclasses.replace(key, classes=source.permutation(config.num_classes),
                            patches=source.permutation(config.num_patches),
                            pixels=source.permutation(config.channels * config.patch_size ** 2),
                            patch_size=config.patch_size)
    return dataclasses.replace(key, vocab=source.permutation(config.vocab_size))


def _kernel_kinds(attn: Attention) -> list[str]:
    kinds = [""] * attn.heads
    for name, members in attn.groups:
        for head in members:
            kinds[head] = getattr(attn, name).spec.kind
    return kinds


def _head_order(attn: Attention, source: KeySource) -> torch.Tensor:
    """Gather over query heads: GQA groups stay together, each head keeps its kernel."""
    heads, group = attn.heads, attn.heads // attn.kv_heads
    kinds = _kernel_kinds(attn)
    if len(set(kinds)) == 1:
        kv = source.permutation(attn.kv_heads)
        inside = [source.permutation(group) for _ in range(attn.kv_heads)]
        return torch.cat([kv[g] * group + inside[g] for g in range(attn.kv_heads)])
    order = torch.arange(heads)
    if group == 1:
        for kind in sorted(set(kinds)):
            slots = torch.tensor([h for h in range(heads) if kinds[h] == kind])
            order[slots] = slots[source.permutation(len(slots))]
    return order


def _attention_key(attn: Attention, config: ModelConfig, source: KeySource) -> AttentionKey:
    d, kv = attn.head_dim, attn.kv_heads
    q_heads = _head_order(attn, source)
    kv_heads = q_heads[:: attn.heads // kv] // (attn.heads // kv)
    v_dims = torch.stack([source.permutation(d) for _ in range(kv)])
    if config.position == "rope":
        rotatable = "linear" not in _kernel_kinds(attn)
        qk_dims = torch.arange(d).repeat(kv, 1)
        angles = source.angles((kv, d // 2)) if rotatable else torch.zeros(kv, d // 2, dtype=torch.float64)
        return AttentionKey(q_heads, kv_heads, qk_dims, v_dims, angles)
    qk_dims = torch.stack([source.permutation(d) for _ in range(kv)])
    return AttentionKey(q_heads, kv_heads, qk_dims, v_dims, None)


# ----- applying a key ---------------------------------------------------------------------------
def transform(model: nn.Module, key: EeKey) -> nn.Module:
    """A transformed copy of ``model`` (the original is untouched); shares no tensor with it."""
    out = copy.deepcopy(model)
    done: set[int] = set()
    with torch.no_grad():
        _transform_embeddings(out, key, done)
        for block, att, ffn in zip(out.layer, key.attention, key.ffn):
            _transform_block(block, att, ffn, key.hidden, done)
        if key.family in ("decoder", "vit"):
            _permute_norm(out.final_norm, key.hidden, done)
        if key.family == "decoder":
            _set(out.lm_head.weight, _scatter_rows(out.lm_head.weight, key.vocab)[:, key.hidden], done)
            if out.lm_head.bias is not None:
                _set(out.lm_head.bias, _scatter_rows(out.lm_head.bias, key.vocab), done)
        if key.family == "vit":
            _set(out.head.weight, _scatter_rows(out.head.weight, key.classes)[:, key.hidden], done)
            _set(out.head.bias, _scatter_rows(out.head.bias, key.classes), done)
    return out


def _set(param: torch.Tensor, value: torch.Tensor, done: set[int]) -> None:
    """Replace a parameter's values once (a tied parameter is reached twice)."""
    if id(param) in done:
        return
    if value.shape != param.shape:
        raise ValueError(f"EE transform changed a shape: {list(param.shape)} -> {list(value.shape)}")
    param.copy_(value.to(param.dtype))
    done.add(id(param))


def _scatter_rows(table: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Row ``perm[t]`` of the result is row ``t`` of ``table``."""
    return table[inverse(perm)]


def _transform_embeddings(model: nn.Module, key: EeKey, done: set[int]) -> None:
    p = key.hidden
    if key.family == "vit":
        _set(model.patch.weight, model.patch.weight[p][:, key.pixels], done)
        _set(model.patch.bias, model.patch.bias[p], done)
        _set(model.cls, model.cls[..., p], done)
        tokens = torch.cat([torch.zeros(1, dtype=torch.long), key.patches + 1])
        _set(model.pos, model.pos[:, tokens][..., p], done)
        return
    _set(model.embed.weight, _scatter_rows(model.embed.weight, key.vocab)[:, p], done)
    for name in ("pos", "token_type"):
        table = getattr(model, name, None)
        if table is not None:
            _set(table.weight, table.weight[:, p], done)
    if key.family == "encoder":
        _permute_norm(model.embed_norm, p, done)


def _permute_norm(norm: nn.Module, p: torch.Tensor, done: set[int]) -> None:
    _set(norm.weight, norm.weight[p], done)
    if getattr(norm, "bias", None) is not None:
        _set(norm.bias, norm.bias[p], done)


def _transform_block(block: Block, att: AttentionKey, ffn: torch.Tensor, p: torch.Tensor, done: set[int]) -> None:
    _permute_norm(block.attn_norm, p, done)
    _permute_norm(block.mlp_norm, p, done)
    _transform_attention(block.attn, att, p, done)
    _transform_mlp(block.mlp, ffn, p, done)


def _transform_mlp(mlp: MLP, ffn: torch.Tensor, p: torch.Tensor, done: set[int]) -> None:
    for name in ("gate", "up") if mlp.gated else ("up",):
        layer: Linear = getattr(mlp, name)
        _set(layer.weight, layer.weight[ffn][:, p], done)
        if layer.bias is not None:
            _set(layer.bias, layer.bias[ffn], done)
    _set(mlp.down.weight, mlp.down.weight[p][:, ffn], done)
    if mlp.down.bias is not None:
        _set(mlp.down.bias, mlp.down.bias[p], done)


def _head_rows(values: torch.Tensor, heads: int, order: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """[heads * d, ...] -> [heads, d, ...]: new head j is old head ``order[j]``, dims ``dims[j]``."""
    blocks = values.reshape(heads, -1, *values.shape[1:])
    return blocks[order[:, None], dims]


def _rotate_pairs(blocks: torch.Tensor, angles: torch.Tensor | None) -> torch.Tensor:
    """Rotate each RoPE pair (i, i + d/2) of every head by its angle: RoPE's own form."""
    if angles is None:
        return blocks
    half = blocks.shape[1] // 2
    shape = (*angles.shape, *([1] * (blocks.dim() - 2)))
    cos, sin = angles.cos().reshape(shape), angles.sin().reshape(shape)
    first, second = blocks[:, :half].double(), blocks[:, half:].double()
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=1).to(blocks.dtype)


def _transform_attention(attn: Attention, att: AttentionKey, p: torch.Tensor, done: set[int]) -> None:
    group = attn.heads // attn.kv_heads
    per_query = torch.arange(attn.heads) // group
    angles_q = None if att.qk_angles is None else att.qk_angles[per_query]
    plans = (
        (attn.q, attn.heads, att.q_heads, att.qk_dims[per_query], angles_q),
        (attn.k, attn.kv_heads, att.kv_heads, att.qk_dims, att.qk_angles),
        (attn.v, attn.kv_heads, att.kv_heads, att.v_dims, None),
    )
    for layer, heads, order, dims, angles in plans:
        weight = _rotate_pairs(_head_rows(layer.weight, heads, order, dims), angles)
        _set(layer.weight, weight.reshape(layer.weight.shape)[:, p], done)
        if layer.bias is not None:
            bias = _rotate_pairs(_head_rows(layer.bias, heads, order, dims), angles)
            _set(layer.bias, bias.reshape(-1), done)
    o = attn.o
    columns = o.weight.reshape(o.weight.shape[0], attn.heads, attn.head_dim)
    columns = columns[:, att.q_heads[:, None], att.v_dims[per_query]]
    _set(o.weight, columns.reshape(o.weight.shape)[p], done)
    if o.bias is not None:
        _set(o.bias, o.bias[p], done)
