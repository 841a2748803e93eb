"""GreendCallback in a real `transformers.Trainer`: a tiny BERT built from a config (1 layer, hidden
16), 192 synthetic samples, 2 epochs on the CPU; no download from the hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[integrations-test]'")
pytest.importorskip("transformers",
                    reason="transformers is not installed: pip install -e '.[integrations-test]'")

import torch
from integrations_util import broken_rapl_config, epoch_entries, greend_env

KEYS = ("greend/energy_j", "greend/facility_energy_j", "greend/carbon_g", "greend/water_site_l",
        "greend/water_offsite_l")


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int = 192, seq: int = 8, vocab: int = 50):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.labels = (self.ids.sum(dim=1) % 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def train(tmp_path, *callbacks, logging_steps: int = 500, epochs: int = 2):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=epochs, per_device_train_batch_size=8,
        logging_strategy="steps", logging_steps=logging_steps, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=BertForSequenceClassification(cfg), args=args, train_dataset=Synthetic(),
                      callbacks=list(callbacks))
    trainer.train()
    return trainer


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    greend_env(monkeypatch, tmp_path)


def test_epochs_logged_positive_and_summing_to_the_run(tmp_path):
    from greend.integrations.transformers import GreendCallback

    cb = GreendCallback("tiny-bert", project="tests")
    trainer = train(tmp_path, cb)
    history = trainer.state.log_history
    epochs = epoch_entries(history, "greend/energy_j")
    assert [e["epoch"] for e in epochs] == [1.0, 2.0]
    # Each epoch's figures joined the log the Trainer wrote at that epoch's end (with its loss).
    assert all("loss" in e for e in epochs)
    for e in epochs:
        for k in KEYS:
            assert e[k] > 0, (k, e)
        assert e["greend/facility_energy_j"] >= e["greend/energy_j"]
    totals = [h for h in history if "greend/total_energy_j" in h]
    assert len(totals) == 1
    fp = cb.footprint
    assert totals[0]["greend/total_energy_j"] == pytest.approx(fp.it_energy_j)
    assert totals[0]["greend/total_carbon_g"] == pytest.approx(fp.carbon_g)
    # The epochs are phases of the run: they sum to its total, less the Trainer's own set-up and
    # wrap-up between train begin and the first epoch, and after the last one.
    for key in ("energy_j", "carbon_g", "water_site_l", "water_offsite_l"):
        summed = sum(e[f"greend/{key}"] for e in epochs)
        total = totals[0][f"greend/total_{key}"]
        assert 0.8 * total <= summed <= total * 1.0001, (key, summed, total)
    assert [m["greend/energy_j"] for m in cb.epochs] == [e["greend/energy_j"] for e in epochs]
    assert not fp.degraded

    # The run is in the user's ledger, as `greend jobs` shows it: named, booked to the project,
    # its epochs as phases with the figures the Trainer logged.
    out = subprocess.run([str(Path(sys.executable).with_name("greend")), "jobs", "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    [rec] = [j for j in json.loads(out.stdout) if j["job"]["name"] == "tiny-bert"]
    assert rec["job"]["account"] == "tests" and rec["job"]["state"] == "ended"
    assert [p["name"] for p in rec["phases"]] == ["epoch 0", "epoch 1"]
    for p, e in zip(rec["phases"], epochs, strict=True):
        assert p["energy_j"]["it"] == pytest.approx(e["greend/energy_j"], rel=1e-5)


def test_epoch_end_on_a_step_already_logged(tmp_path):
    """logging_steps equal to an epoch's steps: the Trainer logged at the epoch's last step, the
    epoch's figures join that entry (no second log at the same step)."""
    from greend.integrations.transformers import GreendCallback

    trainer = train(tmp_path, GreendCallback(), logging_steps=24)  # 192 samples / 8 = 24 steps an epoch
    history = trainer.state.log_history
    epochs = epoch_entries(history, "greend/energy_j")
    assert [e["step"] for e in epochs] == [24, 48]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [24, 48]  # one log a step, as the Trainer writes it


def test_a_failing_counter_never_breaks_training(tmp_path, monkeypatch):
    """The RAPL counter the run reads turns unreadable after the first epoch: training completes,
    both epochs are logged, and the footprint says it is degraded."""
    from transformers import TrainerCallback

    from greend.integrations.transformers import GreendCallback

    rapl = broken_rapl_config(monkeypatch, tmp_path)

    class BreakAfterFirstEpoch(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            rapl.break_counters()

    cb = GreendCallback("broken")
    trainer = train(tmp_path, cb, BreakAfterFirstEpoch())
    assert trainer.state.global_step == 48
    assert len(epoch_entries(trainer.state.log_history, "greend/energy_j")) == 2
    assert cb.footprint is not None and cb.footprint.degraded, cb.footprint
    assert "degraded" in cb.footprint.provenance


def test_a_broken_run_never_breaks_training(tmp_path, caplog):
    """Whatever greend raises stays out of the training loop: one warning, training completes."""
    from greend.integrations.transformers import GreendCallback

    class Broken:
        def start(self):
            raise RuntimeError("no counters at all")

        phase = stop = start

    with caplog.at_level("WARNING", logger="greend"):
        trainer = train(tmp_path, GreendCallback(run=Broken()))
    assert trainer.state.global_step == 48
    assert not epoch_entries(trainer.state.log_history, "greend/energy_j")
    warnings = [r for r in caplog.records if r.name == "greend" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no counters at all" in warnings[0].getMessage()
