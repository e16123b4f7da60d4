"""Expert feed-forward networks as pure functions of stacked weights.

An `ExpertFFN` bundles the stacked expert weights and the activation. The
dispatchers in `moe.dispatch` call it in one of three forms:

  * `batched(x [E, C, d])`: every expert on its own capacity buffer (one
    batched matmul);
  * `grouped(x [M, d], group_sizes [E], gmm)`: rows sorted by expert, through
    a grouped matmul (`moe.kernels`);
  * `all_experts(x [T, d])`: every expert on every token, `[E, T, d]`
    (dense reference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe.validation import check_one_of

Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
}
# GLU variants: activation(x @ wi_gate) * (x @ wi).
_GLU_ACTIVATIONS: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}

ACTIVATIONS = tuple(_ACTIVATIONS) + tuple(_GLU_ACTIVATIONS)


def check_activation(activation: str) -> None:
    check_one_of("activation", activation, ACTIVATIONS)


def is_glu(activation: str) -> bool:
    check_activation(activation)
    return activation in _GLU_ACTIVATIONS


def activation_fn(activation: str) -> Callable[[Array], Array]:
    """The elementwise nonlinearity (for GLU variants: the one applied to the gate)."""
    check_activation(activation)
    return _ACTIVATIONS[_GLU_ACTIVATIONS.get(activation, activation)]


def hidden_activations(activation: str, up: Array, gate: Array | None = None) -> Array:
    """The hidden activations from the input projections: `act(gate) * up` (GLU) or
    `act(up)`."""
    act = activation_fn(activation)
    return act(gate) * up if gate is not None else act(up)


# gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]
GroupedMatmul = Callable[[Array, Array, Array], Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertFFN:
    """Stacked expert weights.

    wi: `[E, d, f]` input projection.
    wo: `[E, f, d]` output projection.
    wi_gate: `[E, d, f]` gate projection for GLU activations, else None.
    activation: name from `ACTIVATIONS` (static).
    """

    wi: Array
    wo: Array
    wi_gate: Array | None = None
    activation: str = dataclasses.field(default="relu", metadata=dict(static=True))

    def __post_init__(self):
        check_activation(self.activation)
        if is_glu(self.activation) != (self.wi_gate is not None):
            raise ValueError(
                f"activation {self.activation!r} "
                f"{'needs' if is_glu(self.activation) else 'takes no'} wi_gate")

    @property
    def num_experts(self) -> int:
        return self.wi.shape[0]

    def hidden(self, up: Array, gate: Array | None) -> Array:
        """The hidden activations from the input projections: `act(gate) * up` or `act(up)`."""
        return hidden_activations(self.activation, up, gate)

    def batched(self, x: Array) -> Array:
        """`[E, C, d]` -> `[E, C, d]`: expert e applied to buffer e."""
        up = jnp.einsum("ecd,edf->ecf", x, self.wi)
        gate = None if self.wi_gate is None else jnp.einsum("ecd,edf->ecf", x, self.wi_gate)
        return jnp.einsum("ecf,efd->ecd", self.hidden(up, gate), self.wo)

    def grouped(self, x: Array, group_sizes: Array, gmm: GroupedMatmul) -> Array:
        """`[M, d]` rows sorted by expert, `group_sizes [E]` -> `[M, d]`."""
        up = gmm(x, self.wi, group_sizes)
        gate = None if self.wi_gate is None else gmm(x, self.wi_gate, group_sizes)
        return gmm(self.hidden(up, gate), self.wo, group_sizes)

    def all_experts(self, x: Array) -> Array:
        """`[T, d]` -> `[E, T, d]`: every expert on every token."""
        return self.batched(jnp.broadcast_to(x, (self.num_experts,) + x.shape))

    def single(self, expert: int, x: Array) -> Array:
        """Expert `expert` on `[T, d]` tokens, for per-expert loop references."""
        up = x @ self.wi[expert]
        gate = None if self.wi_gate is None else x @ self.wi_gate[expert]
        return self.hidden(up, gate) @ self.wo[expert]
