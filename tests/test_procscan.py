"""The process scan: grouping (Slurm job, inherited, per user), CPU time of reaped children, pid reuse.

Grouping and bookkeeping are checked on a fixture procfs where every figure is exact; the real
/proc tests check the same things against processes the test starts.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import make_procfs
from greend.collectors import procscan
from greend.collectors.procscan import NS_PER_TICK, ProcScan, _parse_stat

PY = sys.executable


def groups(scan: ProcScan) -> dict:
    return {u.key: u for u in scan.read()}


# -- fixture procfs -------------------------------------------------------------------------------
class _OsOfAnotherPid:
    """The os module, but getpid() is above any kernel's pid_max (2**22): the fixture's pids never
    look like the scanner itself, even where the test's own pid has wrapped round to a small one."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def getpid() -> int:
        return 2**22 + 1


@pytest.fixture
def fake(tmp_path, monkeypatch):
    proc = make_procfs(tmp_path / "proc")
    monkeypatch.setattr(procscan, "os", _OsOfAnotherPid())
    proc.add_process(1, ppid=0, comm="systemd", utime=5)
    return proc


def test_parse_stat_survives_odd_command_names():
    raw = (b"42 (a (weird) proc) S 7 42 42 0 -1 0 0 0 0 0 11 12 13 14 20 0 1 0 555 100 9 "
           b"0 0 0 0\n")
    assert _parse_stat(raw) == (7, b"a (weird) proc", 23, 27, 555, 9)
    assert _parse_stat(b"garbage") is None


def test_grouping_by_job_inheritance_and_user(fake):
    slurm_env = {"SLURM_JOB_ID": "99", "SLURM_CLUSTER_NAME": "site", "SLURM_CPUS_ON_NODE": "4",
                 "SLURM_MEM_PER_NODE": "1024", "PATH": "/bin"}
    fake.add_process(60, comm="python", utime=100, stime=20, env=slurm_env, uid=1000)
    fake.add_process(61, ppid=60, comm="worker", utime=30, uid=1000)  # no SLURM env of its own
    fake.add_process(62, ppid=61, comm="worker", utime=7, uid=1000)
    fake.add_process(70, comm="vim", utime=3, uid=1000)
    fake.add_process(71, comm="bad-job-env", utime=1, env={"SLURM_JOB_ID": "x1"}, uid=1001)
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        g = groups(scan)
        assert set(g) == {"slurm/site/99", "user/0", "user/1000", "user/1001"}
        job = g["slurm/site/99"]
        assert (job.kind, job.job_id, job.uid, job.cluster) == ("slurm", "99", 1000, "site")
        assert job.cpu_time_ns == (120 + 30 + 7) * NS_PER_TICK
        assert job.alloc_cpus == 4.0 and job.alloc_mem_bytes == 1 << 30
        assert job.mem_bytes == 3 * 10 * os.sysconf("SC_PAGE_SIZE")
        assert g["user/1000"].cpu_time_ns == 3 * NS_PER_TICK
        assert g["user/1000"].kind == "user"
        assert g["user/0"].cpu_time_ns == 5 * NS_PER_TICK
    finally:
        scan.close()


def test_children_of_slurmstepd_belong_to_its_job(fake):
    # Without a readable environment, the job comes from slurmstepd's command line.
    fake.add_process(50, comm="slurmstepd", cmdline="slurmstepd: [1234.batch]")
    fake.add_process(51, ppid=50, comm="bash", utime=4, uid=1000)
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        assert groups(scan)["slurm/c1/1234"].cpu_time_ns == 4 * NS_PER_TICK
    finally:
        scan.close()


def test_job_started_under_an_already_known_slurmstepd(fake):
    fake.add_process(50, comm="slurmstepd", cmdline="slurmstepd: [1234.batch]")
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        assert "slurm/c1/1234" not in groups(scan)
        fake.add_process(51, ppid=50, comm="bash", utime=4, uid=1000)
        g = groups(scan)
        assert "user/1000" not in g
        assert g["slurm/c1/1234"].cpu_time_ns == 4 * NS_PER_TICK
    finally:
        scan.close()


def test_full_reads_only_for_new_processes(fake):
    fake.add_process(60, comm="python", env={"SLURM_JOB_ID": "99"}, uid=1000)
    fake.add_process(61, ppid=60, comm="worker", uid=1000)
    fake.add_process(70, comm="vim", uid=1000)
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        scan.read()
        assert scan.full_reads == 3  # pids 1, 60, 70; 61 inherits its parent's job
        fake.set_process(60, comm="python", utime=500)
        scan.read()
        assert scan.full_reads == 3  # nothing new: no classification read
        fake.add_process(63, ppid=60, comm="worker", uid=1000)
        scan.read()
        assert scan.full_reads == 3  # a new job process inherits without a read
        fake.add_process(72, ppid=70, comm="make", uid=1000)
        scan.read()
        assert scan.full_reads == 4  # a child of a user process may start a job: looked at once
    finally:
        scan.close()


def test_cpu_time_is_cumulative_and_reread(fake):
    fake.add_process(60, comm="python", utime=10, env={"SLURM_JOB_ID": "99"})
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        assert groups(scan)["slurm/c1/99"].cpu_time_ns == 10 * NS_PER_TICK
        fake.set_process(60, comm="python", utime=25, stime=5)
        assert groups(scan)["slurm/c1/99"].cpu_time_ns == 30 * NS_PER_TICK
    finally:
        scan.close()


def test_reaped_children_are_credited_once(fake):
    fake.add_process(60, comm="bash", utime=10, env={"SLURM_JOB_ID": "99"})
    fake.add_process(61, ppid=60, comm="cc", utime=50)
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        assert groups(scan)["slurm/c1/99"].cpu_time_ns == 60 * NS_PER_TICK
        # 61 ran 30 more ticks after it was last seen, exited and was reaped by 60.
        fake.remove_process(61)
        fake.set_process(60, comm="bash", utime=10, cutime=80)
        assert groups(scan)["slurm/c1/99"].cpu_time_ns == (10 + 80) * NS_PER_TICK
        # A child never seen at all (shorter than the scan interval): all of it is credited.
        fake.set_process(60, comm="bash", utime=10, cutime=80 + 40)
        assert groups(scan)["slurm/c1/99"].cpu_time_ns == (10 + 120) * NS_PER_TICK
    finally:
        scan.close()


def test_pid_reuse_is_a_new_process(fake):
    fake.add_process(60, comm="bash", utime=10, env={"SLURM_JOB_ID": "99"})
    fake.add_process(61, ppid=60, comm="cc", utime=50, start=2000)
    scan = ProcScan(fake.root, "c1", fd_budget=0)  # no kept descriptors: stat files re-opened
    try:
        assert groups(scan)["slurm/c1/99"].cpu_time_ns == 60 * NS_PER_TICK
        # 61 exited (reaped by 60, which saw its 50 ticks) and the pid went to someone else's
        # process, started later, with less CPU time than the old one had.
        fake.set_process(60, comm="bash", utime=10, cutime=50)
        fake.remove_process(61)
        fake.add_process(61, ppid=1, comm="sshd", utime=3, start=9000, uid=1000)
        g = groups(scan)
        assert g["slurm/c1/99"].cpu_time_ns == 60 * NS_PER_TICK  # no double count, no loss
        assert g["user/1000"].cpu_time_ns == 3 * NS_PER_TICK
        assert scan.procs[61].group == "user/1000"
    finally:
        scan.close()


def test_pid_reuse_with_kept_descriptor(fake):
    fake.add_process(61, comm="cc", utime=50, start=2000, env={"SLURM_JOB_ID": "99"})
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        groups(scan)
        fake.set_process(61, comm="sshd", utime=3, start=9000)  # same file, another process
        (fake.root / "61" / "environ").write_bytes(b"")
        g = groups(scan)
        assert "slurm/c1/99" not in g  # the job has no live process left: it ended
        assert g["user/0"].cpu_time_ns == (5 + 3) * NS_PER_TICK
    finally:
        scan.close()


def test_group_without_live_process_ends(fake):
    fake.add_process(60, comm="python", utime=10, env={"SLURM_JOB_ID": "99"})
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        assert "slurm/c1/99" in groups(scan)
        fake.remove_process(60)
        assert "slurm/c1/99" not in groups(scan)
        assert scan.fds_open == 1  # only pid 1's descriptor is left
    finally:
        scan.close()


def test_state_survives_a_restart_without_double_counting(fake):
    fake.add_process(60, comm="python", utime=10, env={"SLURM_JOB_ID": "99"})
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    groups(scan)
    state = scan.export_state()
    scan.close()
    fake.set_process(60, comm="python", utime=40)
    again = ProcScan(fake.root, "c1", fd_budget=100)
    again.import_state(state)
    try:
        assert groups(again)["slurm/c1/99"].cpu_time_ns == 40 * NS_PER_TICK
        assert again.full_reads == 0  # known processes are not classified again
    finally:
        again.close()


# -- real processes -------------------------------------------------------------------------------
def slurm_env(job: str, cluster: str = "site") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID=job, SLURM_CLUSTER_NAME=cluster)
    return env


@pytest.fixture
def spawn():
    procs: list[subprocess.Popen] = []

    def start(argv, **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_for(pred, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def test_real_cpu_bound_job_is_grouped_with_growing_cpu_time(spawn):
    p = spawn([PY, "-c", "while True: pass"], env=slurm_env("777"))

    def own_cpu_ns() -> int:  # the child's CPU time as the kernel reports it
        return _parse_stat(Path(f"/proc/{p.pid}/stat").read_bytes())[2] * NS_PER_TICK

    scan = ProcScan(Path("/proc"), "c1")
    try:
        # On a loaded host the child may not be scheduled yet at the first scan: scan until seen.
        assert wait_for(lambda: "slurm/site/777" in groups(scan))
        first = groups(scan)["slurm/site/777"]
        assert first.kind == "slurm" and first.cluster == "site" and first.uid == os.getuid()
        assert wait_for(lambda: own_cpu_ns() > first.cpu_time_ns + 300_000_000)
        lo = own_cpu_ns()
        later = groups(scan)["slurm/site/777"]
        hi = own_cpu_ns()
        assert lo <= later.cpu_time_ns <= hi
        assert later.cpu_time_ns - first.cpu_time_ns > 300_000_000
    finally:
        scan.close()


def test_real_children_inherit_the_job(spawn):
    parent = ("import subprocess, sys, time\n"
              "time.sleep(0.3)\n"
              "subprocess.run(['sleep', '30'], env={})\n")
    p = spawn([PY, "-c", parent], env=slurm_env("778"))
    scan = ProcScan(Path("/proc"), "c1")
    try:
        groups(scan)  # the parent is known before its child starts

        def child() -> int | None:
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        stat = Path(f"/proc/{d}/stat").read_bytes()
                    except OSError:
                        continue
                    if _parse_stat(stat)[0] == p.pid:
                        return int(d)
            return None

        assert wait_for(lambda: child() is not None)
        pid = child()
        assert Path(f"/proc/{pid}/environ").read_bytes() == b""
        groups(scan)
        assert scan.procs[pid].group == "slurm/site/778"
    finally:
        scan.close()


def test_real_short_lived_children_are_credited_through_their_parent(spawn):
    # Five busy children of ~0.15 s each, run one after the other by a shell in the job, and
    # scanned every 0.4 s: most exit unseen. The shell then becomes `sleep` (exec keeps its
    # children's CPU time in cutime), so the scan sees the final figure.
    busy = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.15: pass')"
    script = f'for i in 1 2 3 4 5; do {PY} -c "{busy}"; done; exec sleep 30'
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = spawn(["/bin/sh", "-c", script], env=slurm_env("779"))
    scan = ProcScan(Path("/proc"), "c1")
    try:
        last = 0

        def done() -> bool:
            nonlocal last
            g = groups(scan).get("slurm/site/779")
            last = g.cpu_time_ns if g is not None else last
            return Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep"

        assert wait_for(done, timeout=30, step=0.4)
        last = groups(scan)["slurm/site/779"].cpu_time_ns
    finally:
        scan.close()
    p.kill()
    p.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    truth_ns = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1e9
    assert truth_ns > 0.7e9
    assert last == pytest.approx(truth_ns, rel=0.2)


def test_real_processes_outside_jobs_are_grouped_per_user(spawn):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if os.geteuid() == 0:
        spawn(["sleep", "30"], env=env, user=65534, group=65534)
        uid = 65534
    else:
        spawn(["sleep", "30"], env=env)
        uid = os.getuid()
    scan = ProcScan(Path("/proc"), "c1")
    try:
        g = groups(scan)
        u = g[f"user/{uid}"]
        assert u.kind == "user" and u.uid == uid
        assert not any(k.startswith("slurm/") and v.uid == uid for k, v in g.items())
    finally:
        scan.close()


def test_unchanged_processes_keep_their_figures(fake):
    # A sleeping process's stat line does not change: later scans reuse what was parsed.
    fake.add_process(60, comm="python", utime=10, rss_pages=7, env={"SLURM_JOB_ID": "99"})
    scan = ProcScan(fake.root, "c1", fd_budget=100)
    try:
        first = groups(scan)["slurm/c1/99"]
        for _ in range(3):
            again = groups(scan)["slurm/c1/99"]
            assert (again.cpu_time_ns, again.mem_bytes) == (first.cpu_time_ns, first.mem_bytes)
        fake.set_process(60, comm="python", utime=12, rss_pages=9)
        moved = groups(scan)["slurm/c1/99"]
        assert moved.cpu_time_ns == 12 * NS_PER_TICK
        assert moved.mem_bytes == 9 * os.sysconf("SC_PAGE_SIZE")
        fake.set_process(60, comm="python", utime=12, rss_pages=4)
        assert groups(scan)["slurm/c1/99"].mem_bytes == 4 * os.sysconf("SC_PAGE_SIZE")
    finally:
        scan.close()
