"""Expert dispatch: capacity, slot assignment and interchangeable implementations."""

from moe.dispatch.capacity import assign_slots, expert_capacity, rank_within_expert
from moe.dispatch.dispatchers import (
    DispatchOutput,
    capacity_sort_dispatch,
    einsum_dispatch,
    expert_choice_dispatch,
    grouped_dispatch,
)
from moe.dispatch.layout import RowLayout, capacity_layout, sorted_layout
from moe.dispatch.registry import (
    available_dispatches,
    get_dispatch,
    register_dispatch,
    runnable_dispatches,
)

__all__ = [
    "DispatchOutput", "RowLayout", "assign_slots", "available_dispatches", "capacity_layout",
    "capacity_sort_dispatch", "einsum_dispatch", "expert_capacity", "expert_choice_dispatch",
    "get_dispatch", "grouped_dispatch", "rank_within_expert", "register_dispatch",
    "runnable_dispatches", "sorted_layout",
]
