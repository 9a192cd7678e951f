"""Workload images built on this machine, since no registry can be reached.

`busybox_image()` imports an image holding only Debian's static busybox and a symlink per
applet (sh, sleep, ip, ping, wget, httpd, ...). It is tagged by the binary's hash, so it
is built once per busybox version and then reused by every test that needs a container.
"""
from __future__ import annotations

import hashlib
import io
import pathlib
import subprocess
import tarfile

BUSYBOX = pathlib.Path("/bin/busybox")
REPOSITORY = "netloom-busybox"


def _is_static(binary: pathlib.Path) -> bool:
    """A dynamically linked busybox would not run in an image without a libc."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    return proc.returncode != 0 and "not a dynamic executable" in proc.stdout + proc.stderr


def _rootfs(binary: bytes, applets: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory, mode in (("bin", 0o755), ("tmp", 0o1777), ("etc", 0o755)):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(binary), 0o755
        tar.addfile(info, io.BytesIO(binary))
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buffer.getvalue()


def busybox_image() -> str:
    """Return the tag of the local busybox image, importing it first if it is missing."""
    if not BUSYBOX.exists() or not _is_static(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is missing or not statically linked: "
                           "apt-get install -y busybox-static")
    binary = BUSYBOX.read_bytes()
    tag = f"{REPOSITORY}:{hashlib.sha256(binary).hexdigest()[:12]}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False).returncode == 0:
        return tag
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    subprocess.run(["docker", "import", "-c", 'CMD ["/bin/sh"]', "-", tag], input=_rootfs(binary, applets),
                   capture_output=True, check=True)
    return tag
