"""Emergency checkpoint policy: what to save on a preemption notice, given the time left.

The policy only decides; the coordinator acts (see ``Coordinator._emergency_checkpoint``):

1. A save in flight is finished if its shards are written before the deadline (minus
   ``margin_s`` for the commit), and abandoned otherwise: never committed, so the
   previous checkpoint stays the latest.
2. Then, if the current step is not committed yet, the tier that fits the time left:

   * ``storage``: a full checkpoint, when the last saves' duration (``estimate_s``)
     plus the margin fits; also when there is no estimate yet (the first save), since
     the wait for it is bounded by the deadline anyway;
   * ``memory``: a memory checkpoint (``peer_memory``) whose copies sit on nodes that stay,
     when only some nodes are drained: the workers on them move elsewhere from those copies
     and the job goes on (``Coordinator.evacuate``; no exit);
   * ``none``: nothing new; the latest committed checkpoint is the resume point and the
     steps since are recomputed on resume.
"""

from __future__ import annotations

import dataclasses
import enum

MARGIN_S = 1.0  # the commit (index + state file) and the shutdown after the shards are written


class Tier(str, enum.Enum):
    STORAGE = "storage"
    MEMORY = "memory"
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class EmergencyPlan:
    tier: Tier
    reason: str


def plan_emergency(seconds_left: float | None, estimate_s: float | None, memory_ok: bool = False,
                   margin_s: float = MARGIN_S) -> EmergencyPlan:
    """The tier of the emergency checkpoint (see module docstring)."""
    if seconds_left is None:
        return EmergencyPlan(Tier.STORAGE, "no deadline")
    usable = seconds_left - margin_s
    if estimate_s is None and usable > 0:
        return EmergencyPlan(Tier.STORAGE, f"{seconds_left:.1f} s left, no save timed yet")
    if estimate_s is not None and estimate_s <= usable:
        return EmergencyPlan(Tier.STORAGE, f"a save takes about {estimate_s:.2f} s, {seconds_left:.1f} s left")
    took = f"a save takes about {estimate_s:.2f} s" if estimate_s is not None else "no time"
    if memory_ok:
        return EmergencyPlan(Tier.MEMORY, f"{took} but only {seconds_left:.1f} s are left: peer memory")
    return EmergencyPlan(Tier.NONE, f"{took} but only {seconds_left:.1f} s are left: "
                                    f"the latest committed checkpoint is the resume point")
