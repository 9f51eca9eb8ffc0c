"""Dify's record of a run (`GET /workflows/run/{id}`), read where a run's stream alone would mislead
(services/dify/client.py follows the stream): one that brings only pings for a while ends with the record's
`workflow_finished` once the run is over, and a run streamed as `stopped` with no outputs takes the outputs its
record kept."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.dify.events import RUN_ENDED, WORKFLOW_FINISHED, DifyEvent, EventReader
from services.transport.errors import BackendError, BackendStreamCut

logger = logging.getLogger(__name__)

# A run Dify ended `stopped` with no outputs is asked of its record after each of these waits, while the record has
# none either: Dify 1.16.0 ends a resumed workflow app so and may write the End's outputs to the record a moment
# after the stream's end (a real 1.16.0 showed the stop note where its record then held the whole answer).
STOPPED_RECORD_WAITS = (0.0, 0.5, 1.0, 2.0)


class QuietRun:
    """When a run's stream that brings only pings is to be checked against Dify's record of the run: once it was
    quiet for `first` seconds (`seconds` unless the run was just resumed), then every half of `seconds` while the
    record says the run goes on."""

    __slots__ = ("seconds", "first", "follows_pauses", "checked_at")

    def __init__(self, seconds: float, follows_pauses: bool, first: float | None = None):
        self.seconds = seconds
        self.first = seconds if first is None else min(first, seconds)
        self.follows_pauses = follows_pauses  # continue_on_pause: a paused run is waited for, not re-read
        self.checked_at = float("-inf")

    def due_at(self, reader: EventReader) -> float:
        quiet_for = self.first if self.checked_at == float("-inf") else self.seconds
        return max(reader.last_event_at + quiet_for, self.checked_at + self.seconds / 2)


class RunRecords:
    """A run's stream checked against Dify's record of it, read with `read(run_id)` (the client's run_record)."""

    def __init__(self, read: Callable[[str], dict]):
        self.read = read

    def checked(self, quiet: QuietRun, reader: EventReader) -> list[DifyEvent]:
        """A run's stream brought only pings for a while: Dify's record of the run says whether it is over. Over:
        its `workflow_finished`, as the record has it (the stream ends here). Paused, where the stream would not
        follow a pause: the stream missed it, and is taken for cut (the caller re-attaches with the snapshot, which
        gives the pause's form). Going on, or unknown: nothing (asked again later).

        Raises:
            BackendStreamCut: the run paused with no word on this stream.
        """
        quiet.checked_at = time.monotonic()
        run_id = reader.run_id  # given to a re-attach, else named by the run's first events
        if not run_id:
            return []
        try:
            record = self.read(run_id)
        except BackendError as exc:
            logger.info("could not read Dify's record of the run (%s); still following its events", exc.code)
            return []
        status = record.get("status")
        silent = quiet.checked_at - reader.last_event_at
        if status in RUN_ENDED:
            logger.warning(
                "the run's events brought only pings for %.0fs although Dify's record says it ended %s: "
                "finishing from the record",
                silent,
                status,
            )
            reader.ended = True
            data = {k: record.get(k) for k in ("id", "status", "outputs", "error", "elapsed_time", "total_tokens")}
            event = {"event": WORKFLOW_FINISHED, "workflow_run_id": run_id, "data": data, "from_record": True}
            return [DifyEvent(WORKFLOW_FINISHED, event)]
        if status == "paused" and not quiet.follows_pauses:
            raise BackendStreamCut(f"the run paused with no word on its events stream ({silent:.0f}s of pings)")
        logger.info("the run's events brought only pings for %.0fs; Dify's record says %s", silent, status)
        return []

    def with_kept_outputs(self, batch: list[DifyEvent], reader: EventReader) -> list[DifyEvent]:
        """A run that ended `stopped` with no outputs (in its stream or its record when first read: Dify 1.16.0 so
        ends a resumed workflow app after making them): the outputs Dify's record keeps, asked again for a few
        seconds while it has none (`outputs_from_record`)."""
        if not reader.ended or not batch or batch[-1].kind != WORKFLOW_FINISHED:
            return batch
        body = batch[-1].body
        if body.get("status") != "stopped" or body.get("outputs") or not reader.run_id:
            return batch
        kept = self._kept_outputs(reader.run_id)
        if kept:
            logger.warning("Dify ended the run as stopped with no outputs; its record kept them")
            data = {**batch[-1].data, "data": {**body, "outputs": kept}, "outputs_from_record": True}
            batch[-1] = DifyEvent(WORKFLOW_FINISHED, data)
        return batch

    def _kept_outputs(self, run_id: str) -> dict:
        """The outputs Dify's record keeps of a run it ended `stopped`, once they are there ({} if they never
        come within STOPPED_RECORD_WAITS, or the record cannot be read)."""
        for wait in STOPPED_RECORD_WAITS:
            if wait:
                time.sleep(wait)
            try:
                kept = self.read(run_id).get("outputs")
            except BackendError as exc:
                logger.info("could not read Dify's record of the stopped run: %s", exc.code)
                continue
            if isinstance(kept, dict) and kept:
                return kept
        return {}
