"""Attention through JAX's Pallas TPU splash-attention kernel, exact for any length and head size.

The kernel wants (heads, length, head_dim) per example, lengths in whole blocks, a lane-sized
head dimension and an unscaled q. Here: q is scaled first (as the XLA path does, in q's dtype),
lengths are zero-padded to a block multiple and the padded keys masked out with segment ids
(their logits are the kernel's mask value, so their weights are exactly 0), head_dim is
zero-padded to a multiple of 128 (zero columns add exact zeros to q.k; v's zero columns are cut
off), and the batch is vmapped. Scores and softmax are fp32 inside the kernel (so `upcast` holds
by construction); backward is the kernel's own (dq and dk/dv kernels).

XLA cannot partition a Mosaic kernel (a multi-device jit refuses to lower one), so under a context
mesh (sharding.traced_on: the edit, the text encoders, the FSDP train step) the kernel runs in a
shard_map over the mesh's non-manual axes, each device on its own rows of the batch (on all rows
when they do not divide evenly). Inside pmap (every axis manual) it is called as it is.

INTERPRET: run the kernel in Pallas interpret mode (any backend; CPU tests). `interpret()`
switches it for a block of code.
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

LANES = 128          # head_dim is padded to a multiple of this
MAX_BLOCK = 512      # q / kv tile length; short sequences use one 128-multiple tile
INTERPRET = False


@contextlib.contextmanager
def interpret(on: bool = True):
    """Run the Pallas kernel in interpret mode inside the block (set at trace time)."""
    global INTERPRET
    old, INTERPRET = INTERPRET, on
    try:
        yield
    finally:
        INTERPRET = old


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_for(length: int) -> int:
    """The tile length for a sequence: one tile of a 128 multiple up to MAX_BLOCK, else MAX_BLOCK."""
    return min(MAX_BLOCK, _round_up(length, LANES))


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool, interpret_mode: bool):
    b = dict(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
             block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
             block_q_dq=block_q, block_kv_dq=block_kv)
    one = masks.CausalMask((q_len, kv_len)) if causal else masks.FullMask((q_len, kv_len))
    mask = masks.MultiHeadMask([one] * heads)
    with jax.ensure_compile_time_eval():   # the mask tables are constants, shared by every trace
        return splash.make_splash_mha(mask, block_sizes=splash.BlockSizes(**b), head_shards=1, q_seq_shards=1,
                                  interpret=interpret_mode)


def mesh_split(batch: int) -> tuple[tuple[str, ...], bool] | None:
    """How the kernel runs under the context mesh: (the mesh's non-manual axes, which its shard_map
    covers; whether the batch of `batch` rows is split over them, in mesh order as the edit's ('data',)
    and training's ('data', 'fsdp') batch shardings are - else every device runs all rows). None: no
    context mesh, or every axis already manual (inside pmap), so the kernel is called as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual)
    if not axes:
        return None
    return axes, batch % math.prod(mesh.shape[a] for a in axes) == 0


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v on (batch, length, heads, head_dim) arrays, via the Pallas kernel
    (causal: query i sees keys 0..i)."""
    batch, q_len, heads, d = q.shape
    kv_len = k.shape[1]
    dtype = q.dtype
    q = q * jnp.asarray(1.0 / math.sqrt(d), dtype)
    bq, bkv = block_for(q_len), block_for(kv_len)
    lq, lk, dp = _round_up(q_len, bq), _round_up(kv_len, bkv), _round_up(d, LANES)

    def prep(t, length):   # (B, L, H, D) -> (B, H, L_pad, D_pad), zero padded
        t = jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0), (0, dp - d)))
        return jnp.transpose(t, (0, 2, 1, 3))

    qp, kp, vp = prep(q, lq), prep(k, lk), prep(v, lk)
    kernel = _kernel(heads, lq, lk, bq, bkv, causal, INTERPRET)
    padded_keys = (np.arange(lk) >= kv_len).astype(np.int32)

    def rows(qs, ks, vs):   # a block of examples through the kernel, one at a time
        if lk == kv_len:
            return jax.vmap(kernel)(qs, ks, vs)
        # padded keys in their own segment: no real query attends to them
        seg = splash.SegmentIds(q=jnp.zeros((lq,), jnp.int32), kv=jnp.asarray(padded_keys))
        return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=seg))(qs, ks, vs)

    split = mesh_split(batch)
    if split is None:
        out = rows(qp, kp, vp)
    else:
        axes, divides = split
        spec = P(axes) if divides else P()
        out = jax.shard_map(rows, in_specs=(spec, spec, spec), out_specs=spec, axis_names=set(axes),
                            check_vma=False)(qp, kp, vp)   # the kernel declares no varying axes
    return jnp.transpose(out, (0, 2, 1, 3))[:, :q_len, :, :d].astype(dtype)
