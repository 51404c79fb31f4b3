"""Mount classification from /proc/self/mountinfo text (pure) and the live table."""

import os

import pytest

from asyncfile.mounts import MountTable, parse_mountinfo

SAMPLE = r"""
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 0:27 / /dev/shm rw - tmpfs tmpfs rw
25 22 0:50 / /mnt/my\040share rw - nfs4 server:/export rw,vers=4.2
26 22 0:51 / /mnt/fuse rw,nosuid - fuse.sshfs sshfs#host: rw
27 22 0:52 / /mnt/fuse/inner rw - ext4 /dev/sdb rw
garbage line
""".strip().splitlines()


def test_parse_mountinfo():
    mounts = parse_mountinfo(SAMPLE)
    assert [m.mount_point for m in mounts] == ["/", "/proc", "/dev/shm", "/mnt/my share", "/mnt/fuse", "/mnt/fuse/inner"]
    by_point = {m.mount_point: m for m in mounts}
    assert by_point["/mnt/my share"].slow_open and by_point["/mnt/fuse"].slow_open
    assert not by_point["/"].slow_open and by_point["/dev/shm"].memory_backed
    assert by_point["/"].dev == os.makedev(254, 0)


def test_live_table_classifies_paths_and_devices(tmp_path):
    table = MountTable()
    if table.for_path("/") is None:
        pytest.skip("no /proc/self/mountinfo")
    here = table.for_path(str(tmp_path / "x"))
    assert here is not None
    assert table.for_dev(os.stat(tmp_path).st_dev) is not None
    if os.path.ismount("/proc"):
        assert table.for_path("/proc/self/status").fstype == "proc"
    # a mount point's own path must not stand for its parent directory
    assert table.for_path("/proc").fstype == "proc"
    assert table.for_path("/prochost/x").mount_point != "/proc"
    table.close()


def test_a_mount_flips_to_slow_opens_only_after_a_streak_and_back():
    from asyncfile.engines.inline import OPEN_STREAK, SLOW_OPEN_SECONDS, InlineIO

    inline = InlineIO()
    slow, fast = SLOW_OPEN_SECONDS * 20, SLOW_OPEN_SECONDS / 10
    for _ in range(50):  # a loaded machine: an occasional preempted open among fast ones
        for seconds in [slow] * (OPEN_STREAK - 1) + [fast]:
            inline.record_open("/", seconds)
    assert "/" not in inline._slow_points
    for _ in range(OPEN_STREAK):
        inline.record_open("/", slow)
    assert "/" in inline._slow_points and inline.policy("/x/y")[0] is inline.is_slow_mount("/x/y")
    for _ in range(OPEN_STREAK - 1):
        inline.record_open("/", fast)
    inline.record_open("/", slow)  # the streak back is broken too
    assert "/" in inline._slow_points
    for _ in range(OPEN_STREAK):
        inline.record_open("/", fast)
    assert "/" not in inline._slow_points
