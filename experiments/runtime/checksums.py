"""Checkpoint digests that never gather an array onto one host.

`tree_digest(tree)` hashes every leaf's bits, shape and dtype. Per leaf it takes
two position-weighted sums of the leaf's bit patterns modulo 2**32:

  s1 = sum_i bits_i * (mix(i) | 1)          (changes when any one element changes)
  s2 = sum_i mix(bits_i + mix(i))           (a second, non-linear sum)

Unsigned integer addition modulo 2**32 is associative, so the sums do not
depend on how an array is sharded or on the order XLA reduces it: an array
spread over processes is digested on its devices (one all-reduce of two
scalars per leaf), a local one on the host with the same numpy arithmetic, and
a checkpoint written on one topology verifies on another. Only arrays that no
single process holds in full take the device path.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _mix(x: Any, xp: Any = np) -> Any:
    """A 32-bit integer hash (lowbias32), elementwise on uint32; `xp` is numpy or
    jax.numpy, so the host and device digests share one definition."""
    x = x ^ (x >> xp.uint32(16))
    x = x * xp.uint32(0x7FEB352D)
    x = x ^ (x >> xp.uint32(15))
    x = x * xp.uint32(0x846CA68B)
    return x ^ (x >> xp.uint32(16))


def _bits_np(array: np.ndarray) -> np.ndarray:
    """The elements' bit patterns as uint32 (64-bit elements become two words)."""
    array = np.ascontiguousarray(array)
    width = array.dtype.itemsize
    if width == 8:
        return array.reshape(-1).view(np.uint32)
    if width not in _UINT_OF_WIDTH:
        raise TypeError(f"cannot digest dtype {array.dtype}")
    return array.reshape(-1).view(_UINT_OF_WIDTH[width]).astype(np.uint32)


def _sums_np(array: np.ndarray) -> tuple[int, int]:
    bits = _bits_np(array)
    weights = _mix(np.arange(bits.size, dtype=np.uint32))
    with np.errstate(over="ignore"):
        s1 = np.sum(bits * (weights | np.uint32(1)), dtype=np.uint32)
        s2 = np.sum(_mix(bits + weights), dtype=np.uint32)
    return int(s1), int(s2)


@jax.jit
def _sums_device(array: jax.Array) -> tuple[jax.Array, jax.Array]:
    width = array.dtype.itemsize
    if array.dtype == jnp.bool_:
        bits = array.astype(jnp.uint32)
    elif width == 8:
        bits = jax.lax.bitcast_convert_type(array, jnp.uint32)  # [..., 2]
    elif width in _UINT_OF_WIDTH:
        bits = jax.lax.bitcast_convert_type(array, _UINT_OF_WIDTH[width]).astype(jnp.uint32)
    else:
        raise TypeError(f"cannot digest dtype {array.dtype}")
    # Row-major flat positions, computed where each shard lives.
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        stride = (stride * bits.shape[axis]) % (1 << 32)
    weights = _mix(index, jnp)
    return (jnp.sum(bits * (weights | jnp.uint32(1)), dtype=jnp.uint32),
            jnp.sum(_mix(bits + weights, jnp), dtype=jnp.uint32))


def _leaf_sums(leaf: Any) -> tuple[int, int]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        s1, s2 = _sums_device(leaf)
        return int(np.asarray(s1.addressable_data(0))), int(np.asarray(s2.addressable_data(0)))
    return _sums_np(np.asarray(jax.device_get(leaf)))


def tree_digest(tree: Any) -> int:
    """A 32-bit digest of every leaf's bits, shape and dtype, in tree order; the
    same for any sharding of the leaves. A collective when leaves span processes:
    every process must digest the same trees."""
    crc = 0
    for leaf in jax.tree.leaves(tree):
        shape, dtype = np.shape(leaf), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        s1, s2 = _leaf_sums(leaf)
        crc = zlib.crc32(f"{dtype}{tuple(shape)}|{s1}|{s2}".encode(), crc)
    return crc
