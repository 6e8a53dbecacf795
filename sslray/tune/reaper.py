"""Free the worker placement groups of trials that Tune stopped.

When ASHA stops a trial, Tune ends the trial actor. That kills the trial's TrainController,
which owns the worker placement group, but a placement group created by a non-detached actor
lives as long as the *job* (the sweep driver). Train V2 frees it from a PlacementGroupCleaner
actor that polls the State API. Where that API cannot be reached (no dashboard, or several
Ray instances on one machine), the CPUs/GPUs of every stopped trial stay reserved, and the
sweep hangs once they are gone. The driver therefore removes the placement groups of its own
job whose creator actor is dead: no live actor can be using them.

This reads the GCS placement-group table through Ray's private state accessor (Ray is pinned
to 2.60.0 in setup.cfg). Any failure here is logged and ignored; Train's cleaner remains the
first line.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

log = logging.getLogger(__name__)


def orphaned_placement_groups() -> list:
    """Placement groups of this job, still holding resources, whose creator actor is dead."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    out = []
    for blob in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
            continue
        creator = pg.creator_actor_id
        if not creator or creator == b"\xff" * len(creator):  # made by a driver, not an actor
            continue
        if pg.creator_actor_dead and pg.creator_job_id.hex() == job:
            out.append(pg.placement_group_id)
    return out


def reap() -> int:
    """Remove the orphaned placement groups; return how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    n = 0
    for pg_id in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
            n += 1
        except Exception as e:  # noqa: BLE001 - already removed, or the GCS is busy: try next time
            log.debug("could not remove placement group %s: %s", pg_id.hex(), e)
    return n


class Reaper:
    """Calls ``reap`` at most every ``interval_s`` seconds (from the Tune driver loop)."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self._last = 0.0
        self.removed = 0

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        try:
            self.removed += reap()
        except Exception as e:  # noqa: BLE001 - never break a sweep over housekeeping
            log.warning("sslray tune: could not check for orphaned placement groups: %s", e)


class PlacementGroupReaper(Callback):
    """A Tune ``Callback``: runs the reaper on each step of the Tune driver loop."""

    def __init__(self, interval_s: float = 2.0):
        self.reaper = Reaper(interval_s)

    def on_step_begin(self, iteration, trials, **info):
        self.reaper()
