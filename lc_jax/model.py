"""A decoder-only transformer in Flax NNX.

Embed -> N x Block(RMSNorm, Attention, RMSNorm, SwiGLU) -> RMSNorm -> head.
Parameters are f32 (`param_dtype`) and carry logical axis names
(`out_sharding`) that `lc_jax.sharding` maps onto mesh axes; compute runs in
`dtype` (bf16 on accelerators), with norms, softmax statistics and logits in f32.

Layers may differ (`lc_jax.layers`: a repeating pattern of layer types, each with its attention variant
and its position scheme); the model-wide position scheme embeds the input tokens.

Cached decoding (`Transformer.decode`, driven by `lc_jax.generate`) runs the same
blocks against a `KVCache`: new keys are attended together with the cached ones
through the same variant (masks from positions and segment ids), then written
into each layer's cache at slot = position mod S (a ring buffer of S slots when the
layer's mask sees at most S - 1 tokens back: a sliding window or a chunk), its sink
tokens, if any, kept in slots of their own.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lc_jax import attention as attention_variants
from lc_jax import ops, positions
from lc_jax.layers import LayerType, per_layer
from lc_jax.positions.rope import RoPE

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape, axes, dtype, stddev: float) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=stddev)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


# ----------------------------------------------------------------------------- KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's cached keys and values (only the K kv heads: GQA is never repeated to H), with the
    position and segment of every slot. Layers of different types keep different numbers of slots.

    seg_BS is 0 for a filled slot and -1 for an empty one; queries carry segment 0,
    so empty slots are never visible. Slot of position p: p mod S (S = slots); with N sink tokens
    (`sink_slots`, StreamingLLM), p for p < N and N + (p - N) mod (S - N) after them.
    Float caches hold k/v in the compute dtype and no scales. int8 caches hold
    k/v as int8 plus one f32 scale per (batch, slot, kv head), i.e. per token and
    kv head over the D dims: x ~= q * scale, scale = max|x| / 127.
    `pre_rotation`: keys are cached before RoPE and rotated at read time with the
    current frequencies (dynamic NTK, whose frequencies depend on the length).
    """

    k_BSKD: jax.Array
    v_BSKD: jax.Array
    pos_BS: jax.Array
    seg_BS: jax.Array
    k_scale_BSK: jax.Array | None = None
    v_scale_BSK: jax.Array | None = None
    pre_rotation: bool = dataclasses.field(default=False, metadata=dict(static=True))
    sink_slots: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def slots(self) -> int:
        return self.pos_BS.shape[1]

    def slot_of(self, pos_BT):
        """Where the new tokens at pos_BT (contiguous per row) go: the sink tokens to their own slots, the rest
        round the ring; a token that a later one of the same chunk overwrites gets slot S (dropped)."""
        S, N = self.slots, self.sink_slots
        ring = max(S - N, 1)
        slot_BT = jnp.where(pos_BT < N, pos_BT, N + (pos_BT - N) % ring)
        T = pos_BT.shape[1]
        last_BT = (jnp.arange(T) >= T - ring)[None, :]  # only the chunk's last `ring` tokens survive the ring
        return jnp.where((pos_BT < N) | last_BT, slot_BT, S)

    @property
    def int8(self) -> bool:
        return self.k_scale_BSK is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One `LayerKV` per layer."""

    layers: tuple[LayerKV, ...]

    @property
    def int8(self) -> bool:
        return self.layers[0].int8


EMPTY_SEGMENT = -1


def quantize_int8(x_BSKD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 with one f32 scale per (token, kv head): (q int8 [B,S,K,D], scale f32 [B,S,K])."""
    x = x_BSKD.astype(jnp.float32)
    scale_BSK = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale_BSK > 0, scale_BSK, 1.0)[..., None]
    return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale_BSK


def dequantize_int8(q_BSKD: jax.Array, scale_BSK: jax.Array, dtype) -> jax.Array:
    return (q_BSKD.astype(jnp.float32) * scale_BSK[..., None]).astype(dtype)


def rotation_depends_on_length(position: positions.PositionScheme) -> bool:
    """True for dynamic NTK RoPE: its frequencies follow the current length, so keys are cached unrotated."""
    return isinstance(position, RoPE) and position.scaling.get("name") == "dynamic_ntk"


def _write_slots(cache_BS, new_BT, slots_BT):
    """Scatter new entries (per batch row) into their slots; slots must be distinct within a row, and an
    entry whose slot is out of range (`LayerKV.slot_of`: it would be overwritten in the same chunk) is dropped."""
    rows_B1 = jnp.arange(cache_BS.shape[0])[:, None]
    return cache_BS.at[rows_B1, slots_BT].set(new_BT.astype(cache_BS.dtype), mode="drop")


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped K/V heads; the variant decides what is visible."""

    def __init__(self, *, d_model, num_heads, num_kv_heads, head_dim, num_layers, attention_cfg,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype = dtype
        s_in, s_out = d_model**-0.5, (num_heads * head_dim) ** -0.5 / math.sqrt(2 * num_layers)
        self.wq = _param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype, s_in)
        self.wk = _param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype, s_in)
        self.wv = _param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype, s_in)
        self.wo = _param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"), param_dtype, s_out)
        self.variant = attention_variants.build(
            attention_cfg, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x_BTE, pos_BT, seg_BT, position: positions.PositionScheme, *, stage=None,
                 diagnostics=False):
        """(out_BTE, aux): the variant's auxiliary values (see `AttentionVariant.__call__`)."""
        dt = self.dtype
        q_BTHD, k_BTKD, v_BTKD = self.qkv(x_BTE, pos_BT, position)
        out_BTHD, aux = self.variant(
            q_BTHD, k_BTKD, v_BTKD, q_pos_BT=pos_BT, kv_pos_BS=pos_BT, q_seg_BT=seg_BT, kv_seg_BS=seg_BT,
            bias=position.bias(), x_BTE=x_BTE, stage=stage, diagnostics=diagnostics,
        )
        return jnp.einsum("bthd,hde->bte", out_BTHD.astype(dt), self.wo[...].astype(dt)), aux

    def qkv(self, x_BTE, pos_BT, position: positions.PositionScheme):
        """(q_BTHD, k_BTKD, v_BTKD) of a whole sequence, q and k after the position scheme's rotation (also what
        `inspect_attention` reads)."""
        dt = self.dtype
        q_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, self.wq[...].astype(dt))
        k_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wk[...].astype(dt))
        v_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wv[...].astype(dt))
        q_BTHD, k_BTKD = position.rotate(q_BTHD, k_BTKD, pos_BT, pos_BT)
        return q_BTHD, k_BTKD, v_BTKD

    def decode(self, x_BTE, pos_BT, layer: LayerKV, position: positions.PositionScheme,
               rope_len=None) -> tuple[jax.Array, LayerKV]:
        """Attend new tokens to [cached keys; themselves], then write them into the cache.

        Attending over the concatenation (rather than writing first) keeps a chunk
        longer than a ring buffer exact: its early queries still see keys that its
        later tokens overwrite. `rope_len` overrides the length that dynamic NTK
        uses (chunked prefill passes the whole prompt's, so chunks match one-shot).
        """
        dt = self.dtype
        B, T = pos_BT.shape
        q_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, self.wq[...].astype(dt))
        k_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wk[...].astype(dt))
        v_BTKD = jnp.einsum("bte,ekd->btkd", x_BTE, self.wv[...].astype(dt))
        if not layer.pre_rotation:
            q_BTHD, k_BTKD = position.rotate(q_BTHD, k_BTKD, pos_BT, pos_BT)
        if layer.int8:  # new tokens see their own keys as the cache will hold them: chunking stays exact
            kq, ks = quantize_int8(k_BTKD)
            vq, vs = quantize_int8(v_BTKD)
            k_BTKD, v_BTKD = dequantize_int8(kq, ks, dt), dequantize_int8(vq, vs, dt)
            old_k, old_v = (dequantize_int8(layer.k_BSKD, layer.k_scale_BSK, dt),
                            dequantize_int8(layer.v_BSKD, layer.v_scale_BSK, dt))
        else:
            old_k, old_v = layer.k_BSKD.astype(dt), layer.v_BSKD.astype(dt)
        keys_BSKD = jnp.concatenate([old_k, k_BTKD], axis=1)
        values_BSKD = jnp.concatenate([old_v, v_BTKD], axis=1)
        kv_pos_BS = jnp.concatenate([layer.pos_BS, pos_BT], axis=1)
        kv_seg_BS = jnp.concatenate([layer.seg_BS, jnp.zeros((B, T), jnp.int32)], axis=1)
        if layer.pre_rotation:
            current_len = jnp.maximum(pos_BT.max(), layer.pos_BS.max()) + 1 if rope_len is None else rope_len
            q_BTHD, keys_BSKD = position.rotate(q_BTHD, keys_BSKD, pos_BT, kv_pos_BS, current_len)
        out_BTHD, _ = self.variant(
            q_BTHD, keys_BSKD, values_BSKD, q_pos_BT=pos_BT, kv_pos_BS=kv_pos_BS,
            q_seg_BT=jnp.zeros((B, T), jnp.int32), kv_seg_BS=kv_seg_BS,
            bias=position.bias(), x_BTE=x_BTE,
        )
        slots_BT = layer.slot_of(pos_BT)
        if layer.int8:
            k_new, v_new = kq, vq
            scales = dict(k_scale_BSK=_write_slots(layer.k_scale_BSK, ks, slots_BT),
                          v_scale_BSK=_write_slots(layer.v_scale_BSK, vs, slots_BT))
        else:
            k_new, v_new, scales = k_BTKD, v_BTKD, {}
        new = LayerKV(_write_slots(layer.k_BSKD, k_new, slots_BT), _write_slots(layer.v_BSKD, v_new, slots_BT),
                      pos_BS=_write_slots(layer.pos_BS, pos_BT, slots_BT),
                      seg_BS=_write_slots(layer.seg_BS, jnp.zeros_like(slots_BT), slots_BT),
                      pre_rotation=layer.pre_rotation, sink_slots=layer.sink_slots, **scales)
        out_BTE = jnp.einsum("bthd,hde->bte", out_BTHD.astype(dt), self.wo[...].astype(dt))
        return out_BTE, new


class SwiGLU(nnx.Module):
    def __init__(self, *, d_model, mlp_dim, num_layers, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        s_in, s_out = d_model**-0.5, mlp_dim**-0.5 / math.sqrt(2 * num_layers)
        self.w_gate = _param(rngs, (d_model, mlp_dim), ("embed", "mlp"), param_dtype, s_in)
        self.w_up = _param(rngs, (d_model, mlp_dim), ("embed", "mlp"), param_dtype, s_in)
        self.w_down = _param(rngs, (mlp_dim, d_model), ("mlp", "embed"), param_dtype, s_out)

    def __call__(self, x_BTE):
        dt = self.dtype
        h_BTF = jax.nn.silu(x_BTE @ self.w_gate[...].astype(dt)) * (x_BTE @ self.w_up[...].astype(dt))
        return h_BTF @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, *, d_model, num_heads, num_kv_heads, head_dim, mlp_dim, num_layers, attention_cfg,
                 norm_eps, dtype, param_dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.attn = Attention(
            d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            num_layers=num_layers, attention_cfg=attention_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(d_model=d_model, mlp_dim=mlp_dim, num_layers=num_layers, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTE, pos_BT, seg_BT, position, *, stage=None, diagnostics=False):
        a_BTE, aux = self.attn(self.attn_norm(x_BTE), pos_BT, seg_BT, position, stage=stage, diagnostics=diagnostics)
        x_BTE = x_BTE + a_BTE
        return x_BTE + self.mlp(self.mlp_norm(x_BTE)), aux

    def decode(self, x_BTE, pos_BT, layer: LayerKV, position, rope_len=None):
        a_BTE, layer = self.attn.decode(self.attn_norm(x_BTE), pos_BT, layer, position, rope_len)
        x_BTE = x_BTE + a_BTE
        return x_BTE + self.mlp(self.mlp_norm(x_BTE)), layer


class Transformer(nnx.Module):
    def __init__(self, *, vocab_size: int, d_model: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, mlp_dim: int, max_seq_len: int, position, layers: list[LayerType],
                 tie_embeddings: bool = False, dtype: str = "float32", param_dtype: str = "float32",
                 remat: str = "none", norm_eps: float = 1e-6, rngs: nnx.Rngs):
        """`position`: the model-wide scheme's config; `layers`: each layer's type (`lc_jax.layers.per_layer`)."""
        dt, pdt = DTYPES[dtype], DTYPES[param_dtype]
        num_layers = len(layers)
        self.dtype, self.remat, self.tie_embeddings = dt, remat, tie_embeddings
        self.embed = _param(rngs, (vocab_size, d_model), ("vocab", "embed"), pdt, 1.0)
        dims = dict(num_heads=num_heads, head_dim=head_dim, d_model=d_model, max_seq_len=max_seq_len,
                    param_dtype=pdt, rngs=rngs)
        self.position = positions.build(position, **dims)
        # Layer types with a scheme of their own (a RoPE base, NoPE on global layers) share one module each.
        own = {t.name: t.position for t in layers if t.own_position}
        self.layer_positions = nnx.Dict({name: positions.build(cfg, **dims) for name, cfg in own.items()}) \
            if own else None  # (no node at all without them: checkpoints from before patterns restore as they were)
        self.position_of_layer = tuple(t.name if t.own_position else None for t in layers)
        self.blocks = nnx.List([
            Block(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  mlp_dim=mlp_dim, num_layers=num_layers, attention_cfg=t.attention, norm_eps=norm_eps,
                  dtype=dt, param_dtype=pdt, rngs=rngs)
            for t in layers
        ])
        self.final_norm = RMSNorm(d_model, eps=norm_eps, param_dtype=pdt)
        if not tie_embeddings:
            self.head = _param(rngs, (d_model, vocab_size), ("embed", "vocab"), pdt, d_model**-0.5)

    @classmethod
    def from_config(cls, m, *, rngs: nnx.Rngs) -> Transformer:
        """Build from a `config.model` ConfigDict (already validated)."""
        return cls(
            vocab_size=m.vocab_size, d_model=m.d_model, num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads, head_dim=m.head_dim or m.d_model // m.num_heads, mlp_dim=m.mlp_dim,
            max_seq_len=m.max_seq_len, position=m.position, layers=per_layer(m),
            tie_embeddings=m.tie_embeddings, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
            norm_eps=m.norm_eps, rngs=rngs,
        )

    def __call__(self, tokens_BT=None, positions_BT=None, segment_ids_BT=None, *, embeds_BTE=None, stage=None,
                 diagnostics=False, return_aux=False):
        """Logits [B, T, V] in f32; with `return_aux`, (logits, aux) where aux sums the attention variants'
        auxiliary values over layers ({name: f32 [sum, count]}).

        `embeds_BTE` replaces the token lookup (causality tests, soft prompts). `stage` is the variant's
        training stage (None: its first); `diagnostics` asks variants for their extra measurements.
        """
        x_BTE, positions_BT = self.inputs(tokens_BT, positions_BT, embeds_BTE)

        def run_block(block, x, pos, seg, position):
            return block(x, pos, seg, position, stage=stage, diagnostics=diagnostics)

        if self.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.remat])
        x_BTE = ops.constrain(x_BTE, "batch", "seq", None)
        aux: dict[str, jax.Array] = {}
        for i, block in enumerate(self.blocks):
            x_BTE, block_aux = run_block(block, x_BTE, positions_BT, segment_ids_BT, self.layer_position(i))
            x_BTE = ops.constrain(x_BTE, "batch", "seq", None)
            for k, v in block_aux.items():  # a key only some layer types return (DSA's) is kept past the others
                aux[k] = aux.get(k, 0.0) + v
        logits = ops.constrain(self._logits(x_BTE), "batch", "seq", "vocab")
        return (logits, aux) if return_aux else logits

    def inputs(self, tokens_BT=None, positions_BT=None, embeds_BTE=None):
        """(x_BTE, positions_BT): the first block's input (token embeddings plus the position scheme's, if any)
        and the positions, 0..T-1 unless given."""
        if embeds_BTE is None:
            embeds_BTE = jnp.take(self.embed[...], tokens_BT, axis=0)
        x_BTE = embeds_BTE.astype(self.dtype)
        B, T = x_BTE.shape[:2]
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return self.position.embed(x_BTE, positions_BT), positions_BT

    def layer_position(self, i: int) -> positions.PositionScheme:
        """The position scheme layer `i` attends with."""
        name = self.position_of_layer[i]
        return self.position if name is None else self.layer_positions[name]

    def _logits(self, x_BTE):
        h_BTE = self.final_norm(x_BTE)
        if self.tie_embeddings:  # unit-variance embeddings: rescale so initial logits are O(1)
            w_EV = self.embed[...].T * self.embed[...].shape[1] ** -0.5
        else:
            w_EV = self.head[...]
        return jnp.einsum("bte,ev->btv", h_BTE, w_EV.astype(self.dtype), preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------------- cached decoding

    def check_cache_support(self) -> None:
        """Raise if a variant cannot attend from a KV cache (`AttentionVariant.CACHE`; DSA scores keys from
        hidden states the cache does not keep)."""
        for b in self.blocks:
            if not b.attn.variant.CACHE:
                name = next(n for n, cls in attention_variants.REGISTRY.items() if type(b.attn.variant) is cls)
                can = [n for n, cls in attention_variants.REGISTRY.items() if cls.CACHE]
                raise NotImplementedError(
                    f"model.attention.name={name!r} is not supported with a KV cache yet; generate with "
                    f"model.attention.name in {can}")

    def cache_slots(self, max_len: int) -> list[int]:
        """Slots each layer's cache needs for `max_len` tokens: bounded by how far back its mask sees (its sink
        tokens plus a ring buffer of `mask.max_distance + 1` slots under a sliding window or chunks; all of
        them otherwise: `Mask.cache_slots`)."""
        return [b.attn.variant.mask.cache_slots(max_len) for b in self.blocks]

    def init_cache(self, batch: int, max_len: int, *, int8: bool = False) -> KVCache:
        """An empty cache for `max_len` tokens per row; a windowed or chunked layer keeps only what it sees."""
        self.check_cache_support()

        def layer(i: int, S: int) -> LayerKV:
            attn = self.blocks[i].attn
            shape = (batch, S, attn.num_kv_heads, attn.head_dim)
            sinks = self.blocks[i].attn.variant.mask.sink_tokens or 0
            book = dict(pos_BS=jnp.zeros((batch, S), jnp.int32), seg_BS=jnp.full((batch, S), EMPTY_SEGMENT, jnp.int32),
                        pre_rotation=rotation_depends_on_length(self.layer_position(i)), sink_slots=min(sinks, S))
            if int8:
                return LayerKV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), **book,
                               k_scale_BSK=jnp.zeros(shape[:3], jnp.float32),
                               v_scale_BSK=jnp.zeros(shape[:3], jnp.float32))
            return LayerKV(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), **book)

        return KVCache(layers=tuple(layer(i, S) for i, S in enumerate(self.cache_slots(max_len))))

    def decode(self, tokens_BT, positions_BT, cache: KVCache, *, rope_len=None) -> tuple[jax.Array, KVCache]:
        """(logits [B, T, V] f32, updated cache) for T new tokens at `positions_BT` after those in `cache`.

        Positions must be contiguous per row and continue the cached ones. Logits
        equal `__call__` over the whole sequence (dynamic NTK: over the prefix up to
        the chunk's end, or `rope_len`; see `Attention.decode`).
        """
        self.check_cache_support()
        x_BTE = self.position.embed(jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype), positions_BT)
        layers = []
        for i, (block, layer) in enumerate(zip(self.blocks, cache.layers, strict=True)):
            x_BTE, layer = block.decode(x_BTE, positions_BT, layer, self.layer_position(i), rope_len)
            layers.append(layer)
        return self._logits(x_BTE), KVCache(layers=tuple(layers))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
