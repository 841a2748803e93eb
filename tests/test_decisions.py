"""Routing decisions reach the node daemon, the controller, the job records and /metrics."""

from __future__ import annotations

import sqlite3

from greend.policies.submit import DECISIONS_SQL

from greend.ledger import MIGRATIONS, Ledger


def test_migration_3_on_a_ledger_where_submit_created_the_decisions_table(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    for i, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(script)
        db.execute(f"PRAGMA user_version = {i}")
    db.executescript(DECISIONS_SQL)
    db.execute("INSERT INTO decisions (token, t, user, uid, outcome, decision) "
               "VALUES ('x', 1, 'u', 1, 'pending', '{}')")
    db.commit()
    db.close()
    led = Ledger(path)
    assert led.schema_version == len(MIGRATIONS) == 3
    assert led.db.execute("SELECT token FROM decisions").fetchall()[0][0] == "x"
    led.close()
    fresh = Ledger(tmp_path / "fresh.sqlite")
    cols = [r[1] for r in fresh.db.execute("PRAGMA table_info(decisions)")]
    assert cols[:3] == ["id", "token", "t"] and cols[-1] == "decision"
    fresh.close()
