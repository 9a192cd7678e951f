"""The test VM guest: Debian bookworm with the real cloud-init, sshd and a kernel, from debootstrap.

The guest is what the qemu_vm tests boot under TCG: a qcow2 root disk (ext4 on the whole
disk, made with `mkfs.ext4 -d`, so no loop mount is needed) plus the kernel and initrd taken
out of it for direct kernel boot. Like the lab node image it is built once per recipe: the
directory name is a hash of lab/guest/ (packages, configure.sh, files) and the .deb files
come from the same debootstrap cache. The build steps are lab_image's, reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lab_image

RECIPE_DIR = Path(__file__).resolve().parent / "guest"
DISK_SIZE = "2G"  # virtual size of the base disk; the file holds only what is written
# What the initrd must hold to mount the root disk: without them the guest stops in the
# initramfs shell, a failure far from its cause.
INITRD_MODULES = ("virtio_blk.ko", "virtio_pci.ko", "ext4.ko")


@dataclass(frozen=True)
class Guest:
    """Paths of one built guest (all in one directory named after the recipe hash)."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def guest_dir(state_dir: Path) -> Path:
    return state_dir / "guest" / lab_image.recipe_hash(RECIPE_DIR)


def ensure_guest(state_dir: Path, say: Callable[[str], None]) -> Guest:
    """Return the current guest, building it first if it is not in the cache."""
    guest = Guest(guest_dir(state_dir))
    if guest.disk.is_file():
        return guest
    with lab_image.file_lock(state_dir / "locks" / "guest.lock"):
        if not guest.disk.is_file():  # built by a concurrent run while we waited
            build(guest, state_dir, say)
            prune_old_guests(guest, say)
    return guest


def build(guest: Guest, state_dir: Path, say: Callable[[str], None]) -> None:
    """debootstrap + overlay files + configure.sh, then mkfs.ext4 -d and qemu-img convert."""
    mirror = lab_image.host_mirror()
    packages = lab_image.read_packages(RECIPE_DIR / "packages.txt")
    build_dir = state_dir / "build"
    cache_dir = state_dir / "cache" / "debootstrap"
    build_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="guest-", dir=build_dir))
    rootfs = work / "rootfs"
    log_path = build_dir / f"guest-{guest.directory.name}.log"
    started = time.monotonic()
    try:
        say(
            f"guest {guest.directory.name}: debootstrap {lab_image.SUITE} from {mirror} "
            f"({len(packages)} packages, log {log_path})"
        )
        with log_path.open("w") as log:
            lab_image._run(
                [
                    "debootstrap",
                    f"--variant={lab_image.VARIANT}",
                    f"--cache-dir={cache_dir}",
                    f"--include={','.join(packages)}",
                    lab_image.SUITE,
                    str(rootfs),
                    mirror,
                ],
                log,
                log_path,
                "debootstrap",
            )
            lab_image._install_overlay(rootfs, RECIPE_DIR / "rootfs")
            with (RECIPE_DIR / "configure.sh").open("rb") as script:
                lab_image._run(
                    ["chroot", str(rootfs), "/bin/sh", "-s"],
                    log,
                    log_path,
                    "configure.sh",
                    stdin=script,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
                )
            out = work / "out"
            out.mkdir()
            _take_boot_files(rootfs, out)
            check_initrd(rootfs, log, log_path)
            raw = work / "disk.raw"
            lab_image._run(
                ["mkfs.ext4", "-q", "-L", "root", "-d", str(rootfs), str(raw), DISK_SIZE],
                log,
                log_path,
                "mkfs.ext4 -d",
            )
            lab_image._run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
                log,
                log_path,
                "qemu-img convert",
            )
        guest.directory.parent.mkdir(parents=True, exist_ok=True)
        os.rename(out, guest.directory)  # the cache entry appears complete or not at all
    finally:
        lab_image._remove_tree(work)
    say(f"guest {guest.directory.name}: built in {time.monotonic() - started:.0f} s")


def _take_boot_files(rootfs: Path, out: Path) -> None:
    """Copy the guest's (only) kernel and initrd out of /boot for direct kernel boot."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise lab_image.ImageError(
            f"expected one kernel and one initrd in the guest's /boot, found "
            f"{[p.name for p in kernels]} and {[p.name for p in initrds]}"
        )
    shutil.copyfile(kernels[0], out / "vmlinuz")
    shutil.copyfile(initrds[0], out / "initrd.img")


def check_initrd(rootfs: Path, log, log_path: Path) -> None:
    """Fail the build when a module the root disk needs is neither built in nor in the initrd."""
    initrd = next((rootfs / "boot").glob("initrd.img-*"))
    listing = subprocess.run(
        ["chroot", str(rootfs), "lsinitramfs", f"/boot/{initrd.name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if listing.returncode != 0:
        raise lab_image.ImageError(f"lsinitramfs {initrd.name} failed: {listing.stderr.strip()}")
    names = {Path(line).name for line in listing.stdout.splitlines()}
    for builtin in (rootfs / "lib" / "modules").glob("*/modules.builtin"):
        names.update(Path(line).name for line in builtin.read_text().splitlines())
    missing = [module for module in INITRD_MODULES if module not in names]
    log.write(f"initrd modules checked: {', '.join(INITRD_MODULES)}; missing: {missing}\n")
    if missing:
        raise lab_image.ImageError(
            f"the guest initrd lacks {missing}: it could not mount /dev/vda (log {log_path})"
        )


def prune_old_guests(keep: Guest, say: Callable[[str], None]) -> None:
    """Remove guests of older recipes (VM overlays never point into the cache: tests copy the base)."""
    for old in keep.directory.parent.iterdir():
        if old != keep.directory and old.is_dir():
            shutil.rmtree(old)
            say(f"guest {old.name}: removed (older recipe)")
