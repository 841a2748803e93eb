"""A greend run seen epoch by epoch, shared by the training-loop callbacks: one phase per epoch, its
figures as flat metrics for a trainer's logs, and no exception ever reaching the training loop."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from greend.track import Footprint, Phase, Run

log = logging.getLogger("greend")

PREFIX = "greend/"


def metrics(fp: Footprint, prefix: str = PREFIX) -> dict[str, float]:
    """A footprint as the flat float metrics trainers log: energy (IT, facility) in J, carbon in g
    CO2e, on-site and off-site water in L, elapsed time in s."""
    return {
        f"{prefix}energy_j": float(fp.it_energy_j),
        f"{prefix}facility_energy_j": float(fp.facility_energy_j),
        f"{prefix}carbon_g": float(fp.carbon_g),
        f"{prefix}water_site_l": float(fp.water_site_l),
        f"{prefix}water_offsite_l": float(fp.water_offsite_l),
        f"{prefix}elapsed_s": float(fp.elapsed_s),
    }


def total_metrics(fp: Footprint) -> dict[str, float]:
    """The run's totals, under their own keys so that no logger mistakes them for an epoch's."""
    return metrics(fp, prefix=f"{PREFIX}total_")


def guarded(what: str):
    """A callback's hook that never raises into the training loop: a failure goes to the
    callback's `books.failed` (one warning)."""

    def wrap(hook):
        @functools.wraps(hook)
        def guarded_hook(self, *args, **kwargs):
            try:
                return hook(self, *args, **kwargs)
            except Exception as exc:
                self.books.failed(what, exc)
                return None

        return guarded_hook

    return wrap


class EpochBooks:
    """Opens a greend run (or uses the caller's), a phase per epoch, and hands back each epoch's
    metrics. Every call swallows greend's own errors: a failure is logged once and the books go on
    without it (the footprint's `degraded`/`provenance` say what is missing)."""

    def __init__(self, run: Run | None = None, *, name: str | None = None, project: str | None = None,
                 interval_s: float = 1.0, record: bool = True):
        self.run = run
        self.owns_run = run is None
        self._track_args = {"name": name, "project": project, "interval_s": interval_s, "record": record}
        self.phase: Phase | None = None
        self.epochs: list[dict[str, float]] = []
        """Each finished epoch's metrics, in order."""
        self.totals: dict[str, float] = {}
        """The run's totals, once training has ended (empty before)."""
        self.footprint: Footprint | None = None
        """The run's final footprint, once training has ended."""
        self._warned = False

    def failed(self, what: str, exc: BaseException) -> None:
        """greend (or the trainer's logging of its figures) failed at `what`: say so, never raise."""
        # One warning per callback: a counter that fails every epoch must not flood the training log.
        if not self._warned:
            self._warned = True
            log.warning("greend: %s failed (%s: %s); training goes on without it", what,
                        type(exc).__name__, exc)
        else:
            log.debug("greend: %s failed again", what, exc_info=exc)

    def begin(self, default_name: str) -> None:
        """Training starts: open the run unless the caller gave one."""
        self.epochs, self.totals, self.footprint, self.phase = [], {}, None, None
        try:
            if self.owns_run:  # a new run for each training (trainer.train() may be called again)
                from greend.track import track

                args = dict(self._track_args)
                args["name"] = args["name"] or default_name
                self.run = track(**args)
            self.run.start()  # idempotent: a run the caller gave may already be running
        except Exception as exc:
            self.failed("starting the run", exc)

    def epoch_begin(self, epoch: int) -> None:
        try:
            if self.run is not None:
                self.phase = self.run.phase(f"epoch {epoch}")
        except Exception as exc:
            self.phase = None
            self.failed(f"opening epoch {epoch}", exc)

    def epoch_end(self) -> dict[str, float]:
        """The epoch ends: its metrics, or {} when greend could not measure it."""
        phase, self.phase = self.phase, None
        if phase is None:
            return {}
        try:
            phase.end()
            m = metrics(phase.footprint)
        except Exception as exc:
            self.failed("closing the epoch", exc)
            return {}
        self.epochs.append(m)
        return m

    def end(self) -> dict[str, float]:
        """Training ends: close an epoch left open, stop the run if it is ours; its totals or {}."""
        if self.phase is not None:
            self.epoch_end()
        if self.run is None:
            return {}
        try:
            fp = self.run.stop() if self.owns_run else self.run.footprint
            self.footprint = fp
            self.totals = total_metrics(fp)
        except Exception as exc:
            self.failed("stopping the run", exc)
        return self.totals


class EpochCallback:
    """What the training-loop callbacks share: their `EpochBooks` and the figures read from them.
    Mixed in before the framework's callback class."""

    def __init__(self, name: str | None = None, *, project: str | None = None, run=None,
                 interval_s: float = 1.0, record: bool = True):
        super().__init__()
        self.books = EpochBooks(run, name=name, project=project, interval_s=interval_s, record=record)

    @property
    def footprint(self) -> Footprint | None:
        """The run's final `greend.Footprint` once training has ended, else None."""
        return self.books.footprint

    @property
    def epochs(self) -> list[dict[str, float]]:
        """Each finished epoch's metrics, in order."""
        return self.books.epochs
