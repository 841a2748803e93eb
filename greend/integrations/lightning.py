"""`GreendCallback` for PyTorch Lightning: per-epoch energy (IT and facility), carbon and water logged
through `pl_module.log_dict`, the run's totals to the trainer's loggers at the end (docs/python.md).
Works with the `lightning` package; `GreendPLCallback` is the same for the older `pytorch_lightning`."""

from __future__ import annotations

from typing import Any

from greend.integrations.epochs import EpochCallback

try:
    from lightning.pytorch import Callback as _Callback
except ImportError:
    try:
        from pytorch_lightning import Callback as _Callback
    except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
        raise ImportError(
            "greend.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from exc


class _Hooks(EpochCallback):
    """The callback's body, shared by the `lightning` and `pytorch_lightning` classes."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.books.begin(default_name=type(pl_module).__name__)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.books.epoch_begin(trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = self.books.epoch_end()
        if not m:
            return
        try:
            # Epoch-level values: the loggers get them with the epoch's other metrics, and
            # trainer.callback_metrics has them (a ModelCheckpoint may monitor greend/energy_j).
            pl_module.log_dict(m, on_step=False, on_epoch=True)
        except Exception as exc:
            self.books.failed("logging the epoch", exc)

    def on_train_end(self, trainer, pl_module) -> None:
        totals = self.books.end()
        if not totals:
            return
        try:
            for logger in trainer.loggers:
                logger.log_metrics(totals, step=trainer.global_step)
        except Exception as exc:
            self.books.failed("logging the totals", exc)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Training died: stop the run (and its sampling) so that it is recorded as far as it went.
        self.books.end()


class GreendCallback(_Hooks, _Callback):
    """Measures a Lightning `Trainer.fit()` with greend: a run from train start to train end (or
    `run=` one you opened, which you stop yourself), a phase per training epoch (`epoch 0`...,
    validation inside the epoch included). At each epoch's end it logs `greend/energy_j` (IT),
    `greend/facility_energy_j`, `greend/carbon_g`, `greend/water_site_l`, `greend/water_offsite_l`,
    `greend/elapsed_s`; at train end the run's totals (`greend/total_*`) go to `trainer.loggers`
    and `callback.footprint` holds the run's `greend.Footprint`. greend never raises into training."""


def __getattr__(name: str) -> Any:
    if name == "GreendPLCallback":
        try:
            from pytorch_lightning import Callback as PLCallback
        except ImportError as exc:
            raise ImportError(
                "GreendPLCallback needs pytorch_lightning: pip install pytorch-lightning") from exc
        cls = type("GreendPLCallback", (_Hooks, PLCallback), {"__doc__": GreendCallback.__doc__,
                                                              "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
