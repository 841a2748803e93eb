"""The national cluster reached through the user's own SSH to its login node (docs/slurm.md,
"Transports"), on the real testbed with a real OpenSSH server:

- a private sshd (Debian's openssh-server) on a loopback port, with its own host key and config,
  stands for the centre's login node: it accepts only the test user's key, and its sessions get
  SLURM_CONF of the testbed's national cluster (sshd_config SetEnv), so `sbatch` there is national's;
- greend runs as the test user (greendtest, uid 4242) with that user's key pair and known_hosts,
  named in ssh_options; a job routed to national runs as that user (squeue, sacct, the job's own
  `id -un`);
- an unknown host key, a refused key, a login node that is down or hangs are clear errors that name
  the cluster's keys; greend as root never logs in.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import test_policies_slurm as tps
import test_transport as tt
from slurmbed import TEST_USER, Testbed
from test_policies_slurm import greend, job_script, write_config
from test_transport import greend_as_user, rewrite

# The fixtures of the Slurm policy and REST tests: the testbed, jobs cancelled around, a working
# directory the test user owns.
tb, clean, user_work = tps.tb, tps.clean, tt.user_work

PORT_BASE = int(os.environ.get("GREEND_TESTBED_PORT_BASE", "16800"))
SSH_PORT = PORT_BASE + 90
SSHD = Path("/usr/sbin/sshd")


class LoginNode:
    """A private sshd on 127.0.0.1:port: its own host key, config and authorized keys (PAM only for
    the account check, as Debian's sshd does), sessions with SLURM_CONF of the national cluster."""

    def __init__(self, base: Path, tb: Testbed, port: int):
        self.base, self.port = base, port
        self.host_key = base / "host_key"
        keys = base / "authorized"
        keys.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)
        # The test user's own key pair, owned by the user (ssh refuses a private key others can read).
        self.user_key = base / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", TEST_USER, "-f",
                        str(self.user_key)], check=True)
        shutil.copy(f"{self.user_key}.pub", keys / TEST_USER)
        self.known_hosts = base / "known_hosts"
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
        for p in (self.user_key, self.known_hosts):
            shutil.chown(p, TEST_USER, TEST_USER)
        self.user_key.chmod(0o600)
        self.config = base / "sshd_config"
        self.config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{port}", f"HostKey {self.host_key}", f"PidFile {base / 'sshd.pid'}",
            f"AuthorizedKeysFile {keys}/%u", f"AllowUsers {TEST_USER}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            # The test user's password is locked ("!"): without PAM's account check sshd refuses
            # such an account even for a key. /tmp is world-writable: StrictModes would refuse it.
            "UsePAM yes", "StrictModes no",
            f"SetEnv SLURM_CONF={tb.conf('national')}", "LogLevel VERBOSE", ""]))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.log = open(self.base / "sshd.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("sshd exited: " + (self.base / "sshd.log").read_text()) from None
                time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        self.log.close()

    def options(self, key: Path | None = None, known_hosts: Path | None = None) -> list[str]:
        return [f"IdentityFile={key or self.user_key}", "IdentitiesOnly=yes",
                f"UserKnownHostsFile={known_hosts or self.known_hosts}", "GlobalKnownHostsFile=/dev/null"]


@pytest.fixture(scope="module")
def login(tb):
    if not SSHD.exists() or not shutil.which("ssh"):
        pytest.skip("needs OpenSSH (Debian's openssh-server and openssh-client; bin/test installs them)")
    base = Path(tempfile.mkdtemp(prefix="greend-sshd-", dir="/tmp"))
    base.chmod(0o755)
    node = LoginNode(base, tb, SSH_PORT)
    node.start()
    yield node
    node.stop()
    shutil.rmtree(base, ignore_errors=True)


def ssh_config(user_work: Path, tb: Testbed, login: LoginNode, **slurm) -> Path:
    cfg = write_config(user_work, tb, name="ssh.toml")

    def ssh(data):
        for c in data["clusters"].values():
            c["slurm"].pop("bin_dir", None)  # greend itself runs as the test user here
        n = data["clusters"]["national"]["slurm"]
        n.pop("conf")
        n.update({"transport": "ssh", "ssh_host": "127.0.0.1", "ssh_port": login.port,
                  "ssh_options": login.options(), "timeout_s": 10.0, **slurm})

    rewrite(cfg, ssh)
    for p in user_work.iterdir():
        shutil.chown(p, TEST_USER, TEST_USER)
    return cfg


def national_of(decision: dict) -> dict:
    return next(c for c in decision["candidates"] if c["cluster"] == "national")


def test_national_job_goes_through_the_users_ssh(tb, login, user_work, clean):
    """An 8-CPU job routed to national is submitted on the login node through the test user's own
    ssh and runs as that user: squeue, the job's own `id -un` and sacct show greendtest."""
    cfg = ssh_config(user_work, tb, login)
    who = user_work / "whoami.txt"
    script = job_script(user_work, "ssh-national",
                        f"#SBATCH -c 8\n#SBATCH -t 10\n#SBATCH -A proj-green\nid -un > {who}")
    shutil.chown(script, TEST_USER, TEST_USER)
    p = greend_as_user(user_work, cfg, "submit", "--json", script)
    assert p.returncode == 0, p.stderr + p.stdout
    out = json.loads(p.stdout)
    sub, d = out["submission"], out["decision"]
    assert sub["outcome"] == "submitted" and sub["cluster"] == "national", sub
    cmd = sub["command"]
    assert cmd[:3] == ["ssh", "-o", "BatchMode=yes"] and "127.0.0.1" in cmd, cmd
    assert cmd[-1].startswith("sbatch --parsable --comment=greend-"), cmd
    assert d["transport"]["transport"] == "ssh" and d["transport"]["ssh_port"] == login.port
    assert "own ssh" in d["transport"]["why"] and "127.0.0.1" in d["transport"]["why"]
    # national's live state came through the same ssh: its one 8-CPU node
    national = national_of(d)
    assert national["state"]["ok"] is True and national["state"]["total_cpus"] == 8, national
    assert national["transport"]["transport"] == "ssh"
    job = tb.wait_state("national", sub["job_id"], "RUNNING", timeout=30)
    assert job["user_name"] == TEST_USER
    assert job["name"] == "ssh-national" and job["cpus"] == 8
    assert sub["token"] in job["comment"]
    assert tt.wait_text(who, 20) == TEST_USER
    tb.run("national", "scancel", str(sub["job_id"]))
    acct = tt.accounted_user(tb, "national", sub["job_id"], "ssh-national")
    assert f"ssh-national|{TEST_USER}" in acct, acct
    # The login node's sshd saw the test user's key, nobody else's.
    log = (login.base / "sshd.log").read_text()
    assert f"Accepted publickey for {TEST_USER}" in log and "for root" not in log


def test_dry_run_shows_the_ssh_command(tb, login, user_work, clean):
    cfg = ssh_config(user_work, tb, login, ssh_user=TEST_USER)
    script = job_script(user_work, "ssh-dry", "#SBATCH -c 8\n#SBATCH -t 10\n#SBATCH -A proj-green")
    shutil.chown(script, TEST_USER, TEST_USER)
    p = greend_as_user(user_work, cfg, "submit", "--dry-run", script)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "transport: ssh: another administrative domain: its login node greendtest@127.0.0.1" in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("would run: "))
    assert line.startswith(f"would run: ssh -o BatchMode=yes -o ConnectTimeout=30 -p {login.port} "
                           f"-l {TEST_USER} -o IdentityFile={login.user_key}"), line
    argv = shlex.split(line.removeprefix("would run: ").removesuffix(f" < {script}"))
    assert argv[-2:] == ["127.0.0.1", "sbatch --parsable '--comment=greend-<token>' --job-name=ssh-dry "
                                      "--partition=debug"], argv
    assert not [j for j in tb.jobs("national") if j["name"] == "ssh-dry"]


def test_unknown_host_key_is_a_clear_error(tb, login, user_work, clean):
    """A login node whose host key is not in the user's known_hosts is never trusted on first use
    (BatchMode): national is down in the decision, with the reason and the keys to check."""
    empty = user_work / "empty_known_hosts"
    empty.write_text("")
    cfg = ssh_config(user_work, tb, login, ssh_options=login.options(known_hosts=empty))
    script = job_script(user_work, "ssh-hostkey", "#SBATCH -c 8\n#SBATCH -t 10\n#SBATCH -A proj-green")
    shutil.chown(script, TEST_USER, TEST_USER)
    p = greend_as_user(user_work, cfg, "submit", "--json", script)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr + p.stdout
    out = json.loads(p.stdout)
    national = national_of(out["decision"])
    assert national["state"]["ok"] is False
    err = national["state"]["error"]
    assert "host key is unknown or has changed" in err and "clusters.national.slurm.ssh_host" in err, err
    assert out["submission"]["outcome"] == "no_cluster"
    assert empty.read_text() == ""  # nothing was accepted on the user's behalf
    assert not [j for j in tb.jobs("national") if j["name"] == "ssh-hostkey"]


def test_refused_key_is_a_clear_error(tb, login, user_work, clean):
    other = user_work / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    cfg = ssh_config(user_work, tb, login, ssh_options=login.options(key=other))
    shutil.chown(other, TEST_USER, TEST_USER)
    p = greend_as_user(user_work, cfg, "route", "--json", "-c", "8", "-t", "10", "-A", "proj-green")
    assert "Traceback" not in p.stderr, p.stderr
    d = json.loads(p.stdout)
    err = national_of(d)["state"]["error"]
    assert "authentication refused" in err and "Permission denied" in err, err
    assert "clusters.national.slurm.ssh_user" in err and "clusters.national.slurm.ssh_options" in err, err


def test_login_node_down_or_hanging_is_bounded(tb, login, user_work, clean):
    """A port nobody listens on is 'cannot reach'; a login node that accepts the connection and
    never speaks is cut at timeout_s: greend answers in bounded time either way."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    cfg = ssh_config(user_work, tb, login, ssh_port=free)
    p = greend_as_user(user_work, cfg, "route", "--json", "-c", "8", "-t", "10", "-A", "proj-green")
    err = national_of(json.loads(p.stdout))["state"]["error"]
    assert "cannot reach the login node" in err and "Connection refused" in err, err

    with socket.socket() as silent:  # accepts (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = ssh_config(user_work, tb, login, ssh_port=silent.getsockname()[1], timeout_s=2.0)
        t0 = time.monotonic()
        p = greend_as_user(user_work, cfg, "route", "--json", "-c", "8", "-t", "10",
                           "-A", "proj-green")
        took = time.monotonic() - t0
    err = national_of(json.loads(p.stdout))["state"]["error"]
    # greend's own limit, or ssh's ConnectTimeout (the same 2 s) during the connection or the
    # banner exchange: which one fires first is a race; each names the cluster's settings.
    assert ("did not answer within 2 s" in err or "timed out during banner exchange" in err
            or ("cannot reach the login node" in err and "timed out" in err)), err
    assert "clusters.national.slurm" in err, err
    assert took < 10, took


def test_root_never_logs_in_for_a_user(tb, login, user_work, clean):
    """greend run as root (the daemon's route API is) does not use ssh at all: root's keys are
    not the user's. The cluster is down in the decision, with the reason."""
    cfg = ssh_config(user_work, tb, login)
    before = (login.base / "sshd.log").read_text()
    p = greend(user_work, cfg, "route", "--json", "-c", "8", "-t", "10", "-A", "proj-green")
    err = national_of(json.loads(p.stdout))["state"]["error"]
    assert "never as root" in err and "clusters.national.slurm" in err, err
    assert (login.base / "sshd.log").read_text() == before  # no connection was even tried
