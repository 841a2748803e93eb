"""What the integration tests share: a private state directory and configuration for greend's
runs, a counter that can be broken mid-run, and the log entries that carry greend's figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fixtures import make_rapl, write_in_place


def greend_env(monkeypatch, tmp_path: Path) -> Path:
    """Runs record into tmp_path/state, never into the host's state directory."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    monkeypatch.setenv("GREEND_STATE_DIR", str(state))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # a CI inside Slurm would ask the daemon
    return state


@dataclass
class BreakableRapl:
    files: list[Path]

    def break_counters(self) -> None:
        # In place (the collector keeps its descriptors open): the next read cannot be parsed.
        for f in self.files:
            write_in_place(f, "garbage\n")


def broken_rapl_config(monkeypatch, tmp_path: Path) -> BreakableRapl:
    """A configuration whose sysfs is a fake RAPL tree; break_counters() makes its counters unreadable."""
    rapl = make_rapl(tmp_path / "sys", packages=1, dram=False, mmio=False, psys=False)
    cfg = tmp_path / "greend.toml"
    cfg.write_text(f'[paths]\nsysfs = "{tmp_path / "sys"}"\n')
    monkeypatch.setenv("GREEND_CONFIG", str(cfg))
    return BreakableRapl(list(rapl.files.values()))


def epoch_entries(history: list[dict], key: str) -> list[dict]:
    return [h for h in history if key in h]
