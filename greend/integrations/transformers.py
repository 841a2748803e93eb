"""`GreendCallback` for Hugging Face `transformers.Trainer`: per-epoch energy (IT and facility),
carbon and water in the trainer's logs, the run's totals at the end (docs/python.md)."""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "greend.integrations.transformers needs Hugging Face transformers: pip install transformers"
    ) from exc

from greend.integrations.epochs import EpochCallback, guarded


class GreendCallback(EpochCallback, TrainerCallback):
    """Measures a `Trainer.train()` with greend.

    A greend run opens at train begin (or `run=` one you opened, which you stop yourself), one phase
    per epoch (`epoch 0`, `epoch 1`...). At each epoch's end, `greend/energy_j` (IT),
    `greend/facility_energy_j`, `greend/carbon_g`, `greend/water_site_l`, `greend/water_offsite_l` and
    `greend/elapsed_s` join the log the Trainer writes then (`state.log_history`, and `on_log` for
    the callbacks after this one). At train end the run's totals (`greend/total_*`) are appended to
    `state.log_history`, and `callback.footprint` holds the run's `greend.Footprint`.

    greend never raises into training: a failure is logged once (logger "greend") and the figures
    go on without it.
    """

    def __init__(self, name: str | None = None, *, project: str | None = None, run=None,
                 interval_s: float = 1.0, record: bool = True):
        super().__init__(name, project=project, run=run, interval_s=interval_s, record=record)
        self._pending: dict[str, float] = {}
        self._last_log_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._pending, self._last_log_step = {}, None
        self.books.begin(default_name=_run_name(args))

    @guarded("opening the epoch")
    def on_epoch_begin(self, args, state, control, **kwargs):
        self._flush(state)
        self.books.epoch_begin(_epoch_index(state))

    @guarded("logging the epoch")
    def on_epoch_end(self, args, state, control, **kwargs):
        m = self.books.epoch_end()
        if not m:
            return
        history = state.log_history
        step = state.global_step
        if self._last_log_step == step and history and history[-1].get("step") == step:
            # The Trainer already logged at this step and logs once a step: join that entry.
            history[-1].update(m)
        else:
            # Ask for a log now: the Trainer writes it right after this event (on_log below joins it).
            self._pending = m
            control.should_log = True

    @guarded("logging the epoch")
    def on_log(self, args, state, control, logs=None, **kwargs):
        self._last_log_step = state.global_step
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        history = state.log_history
        # The history entry is a copy of logs made before this event: update it too.
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(self._pending)
        self._pending = {}

    @guarded("logging the totals")
    def on_train_end(self, args, state, control, **kwargs):
        self._flush(state)
        totals = self.books.end()
        if totals:
            state.log_history.append({**totals, "epoch": state.epoch, "step": state.global_step})

    def _flush(self, state) -> None:
        """An epoch's metrics that no log took (the Trainer skipped it): their own history entry."""
        if self._pending:
            state.log_history.append({**self._pending, "epoch": state.epoch, "step": state.global_step})
            self._pending = {}


def _run_name(args) -> str:
    name = getattr(args, "run_name", None)
    return str(name) if name else "transformers-train"


def _epoch_index(state) -> int:
    # state.epoch is the float progress at the epoch's start (0.0, 1.0... or 1.5 after a resume).
    return int(state.epoch or 0)
