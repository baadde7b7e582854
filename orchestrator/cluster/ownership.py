"""Which worker owns which variable (ZeRO-style sharding of parameters and optimizer state).

Each variable and its optimizer slots live on exactly one worker, its *owner*, which
applies the optimizer to it and writes it into its checkpoint shard. The map is a pure
function of the variables' sizes and the number of workers, so every worker, the
coordinator, and a job resuming with a different M all compute the same answer without
talking to each other.

Balancing is greedy largest-first: variables sorted by bytes (descending, ties by name)
each go to the currently least-loaded worker (ties by lowest rank). The load of a variable
counts its slots too, because that is what the owner holds and writes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
from orchestrator.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class OwnershipMap:
    """``owner[name] -> rank`` for ``num_workers`` workers, plus each rank's bytes."""

    num_workers: int
    owner: Mapping[str, int]
    load_bytes: tuple[int, ...]

    def owned_by(self, rank: int) -> list[str]:
        """Names owned by ``rank``, sorted, so iteration order is the same everywhere."""
        return sorted(name for name, r in self.owner.items() if r == rank)

    def imbalance(self) -> float:
        """max load / mean load (1.0 is perfect balance)."""
        mean = sum(self.load_bytes) / self.num_workers
        return max(self.load_bytes) / mean if mean else 1.0


def assign_owners(
    sizes: Mapping[str, int], num_workers: int, slots_per_variable: int = 0
) -> OwnershipMap:
    """Balance variables over ``num_workers`` by bytes (variable + ``slots_per_variable`` copies).

    Raises ValueError for ``num_workers < 1`` or a negative size.
    """
    if num_workers < 1:
        raise InvalidArgumentError(f"num_workers must be >= 1, got {num_workers}")
    loads = [0] * num_workers
    owner: dict[str, int] = {}
    for name, nbytes in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        if nbytes < 0:
            raise InvalidArgumentError(f"variable {name!r} has a negative size {nbytes}")
        rank = min(range(num_workers), key=lambda r: (loads[r], r))
        owner[name] = rank
        loads[rank] += nbytes * (1 + slots_per_variable)
    return OwnershipMap(num_workers, owner, tuple(loads))
