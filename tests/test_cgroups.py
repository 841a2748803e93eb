"""Slurm job cgroups v1 and v2: jobs found, counters re-read, allocations parsed, jobs come and go."""

from __future__ import annotations

import pytest
from fixtures import make_cgroups
from greend.collectors.base import SourceUnavailable
from greend.collectors.cgroups import SlurmCgroups, parse_cpulist


@pytest.mark.parametrize(("text", "n"), [
    ("0-3,8", 5), ("0", 1), ("0-63\n", 64), ("0-3,8,10-11", 7), ("", 0), ("2,4,6", 3),
])
def test_parse_cpulist(text, n):
    assert parse_cpulist(text) == n


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def tree(request, tmp_path):
    return make_cgroups(tmp_path / "cgroup", request.param, node="n1")


def by_key(src: SlurmCgroups):
    return {u.key: u for u in src.read()}


def test_version_is_detected(tree):
    src = SlurmCgroups(tree.root, "c1", "n1")
    assert src.version == tree.version
    src.close()


def test_job_usage_and_allocation(tree):
    tree.add_job("42", uid=1000, cpus="0-3,8", mem_limit=4 << 30, cpu_ns=5_000_000_000,
                 mem_bytes=123 << 20)
    src = SlurmCgroups(tree.root, "c1", "n1")
    try:
        (u,) = src.read()
        assert u.key == "slurm/c1/42" and u.kind == "slurm" and u.job_id == "42"
        assert u.cluster == "c1" and u.uid == 1000
        assert u.cpu_time_ns == 5_000_000_000
        assert u.mem_bytes == 123 << 20
        assert u.alloc_cpus == 5
        assert u.alloc_mem_bytes == 4 << 30
    finally:
        src.close()


def test_unlimited_memory_is_no_allocation(tree):
    tree.add_job("7", mem_limit=None)
    src = SlurmCgroups(tree.root, "c1", "n1")
    try:
        (u,) = src.read()
        assert u.alloc_mem_bytes is None
    finally:
        src.close()


def test_values_are_reread_after_the_files_change(tree):
    tree.add_job("42", cpu_ns=1_000_000_000, mem_bytes=1 << 20)
    src = SlurmCgroups(tree.root, "c1", "n1")
    try:
        assert by_key(src)["slurm/c1/42"].cpu_time_ns == 1_000_000_000
        fds = (src.jobs["42"].cpu_fd, src.jobs["42"].mem_fd)
        tree.set_cpu("42", 3_500_000_000)
        tree.set_mem("42", 9 << 20)
        u = by_key(src)["slurm/c1/42"]
        assert u.cpu_time_ns == 3_500_000_000
        assert u.mem_bytes == 9 << 20
        # the same descriptors, not reopened
        assert (src.jobs["42"].cpu_fd, src.jobs["42"].mem_fd) == fds
    finally:
        src.close()


def test_jobs_appear_and_disappear(tree):
    tree.add_job("42", cpu_ns=1_000)
    src = SlurmCgroups(tree.root, "c1", "n1")
    try:
        assert set(by_key(src)) == {"slurm/c1/42"}
        tree.add_job("43", uid=1001, cpus="4-7", cpu_ns=2_000)
        got = by_key(src)
        assert set(got) == {"slurm/c1/42", "slurm/c1/43"}
        assert got["slurm/c1/43"].alloc_cpus == 4 and got["slurm/c1/43"].uid == 1001
        tree.remove_job("42")
        assert set(by_key(src)) == {"slurm/c1/43"}
        assert set(src.jobs) == {"43"}  # the ended job's descriptors are released
        tree.remove_job("43")
        assert src.read() == []
    finally:
        src.close()


def test_v1_tree_of_another_node_is_not_ours(tmp_path):
    tree = make_cgroups(tmp_path / "cgroup", 1, node="other")
    tree.add_job("1")
    with pytest.raises(SourceUnavailable):
        SlurmCgroups(tree.root, "c1", "n1")


def test_v1_plain_slurm_directory(tmp_path):
    root = tmp_path / "cgroup"
    job = root / "cpuacct" / "slurm" / "uid_0" / "job_9"
    job.mkdir(parents=True)
    (job / "cpuacct.usage").write_text("77\n")
    src = SlurmCgroups(root, "c1", "n1")
    try:
        (u,) = src.read()
        # No memory/cpuset controller directories: usage is still read.
        assert (u.job_id, u.cpu_time_ns, u.alloc_cpus, u.mem_bytes) == ("9", 77, None, 0)
    finally:
        src.close()


def test_no_slurm_cgroups_is_unavailable(tmp_path):
    with pytest.raises(SourceUnavailable):
        SlurmCgroups(tmp_path, "c1", "n1")
