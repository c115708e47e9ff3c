"""A small tmpfs for tests of a full disk: a real file system that really fills up."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ci import IN_CI


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. "2m") at `mount` for the block; skipped where not allowed.

    Mounting needs root (CI and the development machines run as root); without it the test is
    skipped, except in CI, where it must run.
    """
    mount.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs for a disk-full test: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file in `directory` until the file system is full; returns it."""
    filler = directory / "filler"
    # Unbuffered, and in ever smaller pieces: to the last byte, whatever space is left.
    with open(filler, "wb", buffering=0) as handle:
        chunk = 65536
        while chunk:
            try:
                handle.write(b"\0" * chunk)
            except OSError:
                chunk //= 2
    return filler


class Ext4Image:
    """A small ext4 file system on a loop device, mounted with `errors=remount-ro`."""

    def __init__(self, image: Path, mount: Path) -> None:
        self.image = image
        self.mount = mount
        self.device = ""

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def attach(self) -> None:
        """Attach the image to a loop device and mount it read-write."""
        attached = self._run("losetup", "--find", "--show", str(self.image))
        if attached.returncode != 0:
            raise OSError(f"losetup: {attached.stderr.strip()}")
        self.device = attached.stdout.strip()
        self._run("blockdev", "--setrw", self.device)  # a loop device may keep an old ro flag
        mounted = self._run("mount", "-o", "errors=remount-ro", self.device, str(self.mount))
        if mounted.returncode != 0:
            self._run("losetup", "-d", self.device)
            raise OSError(f"mount: {mounted.stderr.strip()}")

    def make_read_only(self) -> None:
        """Turn the mounted file system read-only under its open files, as a disk error does.

        ext4's own test hook records a file-system error; with `errors=remount-ro` the kernel
        then remounts it read-only at once, whatever is open for writing (a plain
        `mount -o remount,ro` is refused while files are open for writing).
        """
        name = Path(self.device).name
        Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("segmapd test\n")
        # The kernel remounts from a work queue: wait for it.
        deadline = time.monotonic() + 10
        while not self.is_read_only():
            if time.monotonic() > deadline:
                raise OSError(f"{self.mount} did not turn read-only")
            time.sleep(0.05)

    def is_read_only(self) -> bool:
        """Whether the kernel has the file system mounted read-only now."""
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if fields[1] == str(self.mount):
                # Recent kernels mark an ext4 error as `emergency_ro`, leaving the mount's `rw`.
                options = fields[3].split(",")
                return "ro" in options or "emergency_ro" in options
        raise OSError(f"{self.mount} is not mounted")

    def repair(self) -> None:
        """Unmount, check and repair (as an operator would after the error), mount again."""
        self.detach()
        checked = self._run("e2fsck", "-fy", str(self.image))
        if checked.returncode not in (0, 1):  # 1: errors corrected
            raise OSError(f"e2fsck: {checked.returncode} {checked.stdout} {checked.stderr}")
        self.attach()

    def detach(self) -> None:
        """Unmount and release the loop device."""
        if self.device:
            # Lazily, so that a process still holding a file there cannot keep it mounted;
            # the loop device then goes away with the last user.
            self._run("umount", "-l", str(self.mount))
            self._run("losetup", "-d", self.device)
            self.device = ""


@contextlib.contextmanager
def ext4_image(directory: Path, size_mb: int = 32) -> Iterator[Ext4Image]:
    """A fresh ext4 file system mounted at `directory/mnt`; skipped where loop devices are not
    allowed, except in CI, where the test must run."""
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "ext4.img"
    mount = directory / "mnt"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(size_mb * 1024 * 1024)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True, check=False
    )
    disk = Ext4Image(image, mount)
    try:
        if made.returncode != 0:
            raise OSError(f"mkfs.ext4: {made.stderr.strip()}")
        disk.attach()
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"cannot mount an ext4 image for a read-only test: {exc}")
        pytest.skip(f"cannot mount an ext4 image here: {exc}")
    try:
        yield disk
    finally:
        disk.detach()
