"""The read API of a controller on a database server (docs/site-mode.md, "Reads on a server
database"): what it serves is read from the server, and answers exactly as a SQLite controller does
for the same records; what it does not serve is an explicit 501, never the controller's local,
empty SQLite ledger."""

from __future__ import annotations

import pytest
from daemonproc import token_file
from test_sitedb import TOKEN, controller, post, rec

pytest.importorskip("sqlalchemy", reason="greend[sitedb] is not installed")
pytest_plugins = ["sitedb_servers"]


def test_a_job_record_is_never_read_from_the_local_empty_ledger(server_db, tmp_path):
    tok = token_file(tmp_path / "token", TOKEN)
    with controller(tmp_path / "ctl", tok, server_db) as ctl:
        ctl.start()
        assert post(ctl.port, [rec("7", 20.0)])["accepted"] == 1
        st, d = ctl.get("/api/v1/jobs/c1/7")
        assert st == 501 and "read API is not served yet" in d["error"], d
