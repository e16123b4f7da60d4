"""The CPU-targets benchmark's layer cut and memory record (tiny shapes, one round).

`scripts/bench_cpu_targets.py` reports the MoE layer's forward+backward cut into
router / layout / experts / rest; the parts are only readable as shares if `rest` is
what is left of the layer and the compared variant (`sort` through the tile loop) is
timed in the same rounds.
"""

import jax
import jax.numpy as jnp

from experiments.bench import breakdown, cpu_targets


def test_layer_cut_adds_up_and_keeps_every_round():
    record = breakdown.layer_breakdown(tokens=64, d_model=8, d_ff=16, num_experts=4, k=2,
                                       dispatch="sort", capacity_factor=1.25, rounds=1,
                                       compare=(breakdown.TILE_LOOP,))
    assert record["capacity"] == 40  # ceil(2 * 64 * 1.25 / 4)
    assert 40 / 128 <= record["kept_fraction"] <= 1.0  # at least one full expert of 128
    for clock in ("wall", "cpu"):
        ms = record[f"{clock}_ms"]
        assert set(ms) == {"layer", "router", "layout", "experts", "dense", "rest"}
        assert abs(ms["rest"] - (ms["layer"] - ms["router"] - ms["layout"] - ms["experts"])) < 1e-9
        assert record[f"{clock}_over_dense"]["dense"] == 1.0
        raw = record[f"raw_{clock}_s"]
        assert set(raw) == {"layer", "router", "layout", "experts", "dense",
                            f"layer_{breakdown.TILE_LOOP}"}
        assert all(len(v) == 1 and v[0] > 0 for v in raw.values())
    assert set(record["compared"]) == {breakdown.TILE_LOOP}
    assert record["padded_layout"]  # sort on CPU: the cut times the padded grouped matmul
    assert len(record["load_average"]) == 2


def test_memory_record_is_xla_buffer_sizes():
    x = jnp.ones((128, 64))
    compiled = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0)).lower(x).compile()
    record = cpu_targets._memory(compiled)
    assert record["argument_size_in_bytes"] == 128 * 64 * 4
    assert record["output_size_in_bytes"] == 128 * 4
    assert record["peak_bytes"] == (record["temp_size_in_bytes"] + 128 * 64 * 4 + 128 * 4
                                    - record["alias_size_in_bytes"])
