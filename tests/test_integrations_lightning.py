"""GreendCallback in a real Lightning `Trainer.fit`: a tiny LightningModule, 2 epochs on the CPU,
the per-epoch figures in the logger's metrics (CSVLogger) and the totals at the end."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[integrations-test]')")
pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[integrations-test]')")

import lightning.pytorch as pl
import torch
from integrations_util import broken_rapl_config, greend_env

KEYS = ("greend/energy_j", "greend/facility_energy_j", "greend/carbon_g", "greend/water_site_l",
        "greend/water_offsite_l")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, _i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, *callbacks, module=None, epochs: int = 2):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(1024, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True)),
                                       batch_size=8)
    logger = pl.loggers.CSVLogger(tmp_path / "logs", name="tiny")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger,
                         callbacks=list(callbacks), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module or Tiny(), data)
    return trainer


def logged_rows(trainer) -> list[dict]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    greend_env(monkeypatch, tmp_path)


def test_epochs_logged_to_the_logger_and_totals_at_the_end(tmp_path):
    from greend.integrations.lightning import GreendCallback

    cb = GreendCallback("tiny-lightning", project="tests")
    trainer = fit(tmp_path, cb)
    rows = logged_rows(trainer)
    epochs = [r for r in rows if r.get("greend/energy_j")]
    # One row per epoch, with the epoch's own metric (train_loss) beside greend's.
    assert [int(r["epoch"]) for r in epochs] == [0, 1]
    assert all(r["train_loss"] for r in epochs)
    for r in epochs:
        for k in KEYS:
            assert float(r[k]) > 0, (k, r)
    assert "greend/energy_j" in trainer.callback_metrics  # a ModelCheckpoint could monitor it
    totals = [r for r in rows if r.get("greend/total_energy_j")]
    assert len(totals) == 1
    total = float(totals[0]["greend/total_energy_j"])
    assert total == pytest.approx(cb.footprint.it_energy_j)
    summed = sum(float(r["greend/energy_j"]) for r in epochs)
    assert 0.8 * total <= summed <= total * 1.0001, (summed, total)


def test_a_failing_counter_never_breaks_fit(tmp_path, monkeypatch):
    from greend.integrations.lightning import GreendCallback

    rapl = broken_rapl_config(monkeypatch, tmp_path)

    class BreakAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            rapl.break_counters()

    cb = GreendCallback("broken")
    trainer = fit(tmp_path, cb, BreakAfterFirstEpoch())
    assert trainer.current_epoch == 2 and trainer.state.finished
    assert cb.footprint.degraded and "degraded" in cb.footprint.provenance
    assert len(cb.epochs) == 2


def test_a_failing_training_stops_the_run(tmp_path):
    """The model raises in its second epoch: the run is stopped, not left sampling."""
    from greend.integrations.lightning import GreendCallback

    class Fails(Tiny):
        def training_step(self, batch, i):
            if self.current_epoch == 1:
                raise RuntimeError("diverged")
            return super().training_step(batch, i)

    cb = GreendCallback()
    with pytest.raises(RuntimeError, match="diverged"):
        fit(tmp_path, cb, module=Fails())
    assert cb.footprint is not None and cb.footprint.it_energy_j > 0
    assert len(cb.epochs) == 2  # the first, and the second as far as it went


def test_pytorch_lightning_too(tmp_path):
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    from greend.integrations.lightning import GreendPLCallback

    assert isinstance(GreendPLCallback(), pytorch_lightning.Callback)
