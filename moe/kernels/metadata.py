"""Tile-visit metadata for grouped matmuls (the megablox scheme).

Rows `[M, K]` are sorted by group; group g owns rows
`[offsets[g], offsets[g + 1])`. The rows are cut into tiles of `tile_m` rows. A
*visit* is one (tile, group) pair whose row ranges overlap: a tile that holds
rows of two groups is visited twice, once per group, and each visit writes only
its own group's rows. Empty groups have no visit. The number of visits is at
most `num_tiles + num_groups - 1`, a static bound; the number actually used is
dynamic (`num_visits`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class GroupMetadata(NamedTuple):
    """offsets `[E + 1] int32`, visit_group / visit_tile `[V] int32`, num_visits scalar."""

    offsets: Array
    visit_group: Array
    visit_tile: Array
    num_visits: Array


def num_tiles(num_rows: int, tile_m: int) -> int:
    return -(-num_rows // tile_m)


def max_visits(num_rows: int, num_groups: int, tile_m: int) -> int:
    return num_tiles(num_rows, tile_m) + num_groups - 1


def group_metadata(group_sizes: Array, num_rows: int, tile_m: int, *,
                   visit_empty_groups: bool = False) -> GroupMetadata:
    """Visit lists for `group_sizes [E] int32` over `num_rows` rows cut in `tile_m` tiles.

    Visits beyond `num_visits` repeat the last real visit's group and point
    at the last tile, so a kernel that runs the static bound stays in range;
    they must be masked or skipped.

    `visit_empty_groups=True` gives every empty group one visit (to the tile
    holding its offset, with no rows of its own), for kernels that must write
    a per-group output such as a zero weight gradient. The static bound still
    holds for `num_rows > 0`: one revisit at most per non-empty group after the
    first, one visit per empty group.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    num_groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    first_tile = starts // tile_m
    last_tile_end = (ends + tile_m - 1) // tile_m  # exclusive
    visits_per_group = jnp.where(group_sizes > 0, last_tile_end - first_tile,
                                 1 if visit_empty_groups else 0)
    visit_ends = jnp.cumsum(visits_per_group)
    visit_starts = visit_ends - visits_per_group
    total = visit_ends[-1]

    bound = max_visits(num_rows, num_groups, tile_m)
    v = jnp.arange(bound, dtype=jnp.int32)
    group = jnp.searchsorted(visit_ends, v, side="right").astype(jnp.int32)
    group = jnp.minimum(group, num_groups - 1)
    tile = first_tile[group] + (v - visit_starts[group])
    last_tile = num_tiles(num_rows, tile_m) - 1
    tile = jnp.clip(tile, 0, last_tile).astype(jnp.int32)
    return GroupMetadata(offsets, group, tile, total.astype(jnp.int32))


def metadata_with_tail(group_sizes: Array, num_rows: int, tile_m: int) -> GroupMetadata:
    """`group_metadata` with one extra group E holding the rows past the real
    groups, so that every row tile is visited and its rows are written (as
    zeros by the tail's visits)."""
    group_sizes = group_sizes.astype(jnp.int32)
    tail = jnp.maximum(num_rows - jnp.sum(group_sizes), 0)
    return group_metadata(jnp.concatenate([group_sizes, tail[None]]), num_rows, tile_m)
