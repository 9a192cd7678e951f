"""The lab node image: Debian bookworm from debootstrap, imported into the local Docker engine.

There is no registry to pull from, so the image is built here. Its tag is a hash of the
recipe (package list, suite, every file under lab/image/), so it is built once and rebuilt
only when the recipe changes; the .deb files are cached in .lab/cache/ for the rebuilds.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import docker

RECIPE_DIR = Path(__file__).resolve().parent / "image"
OVERLAY_DIR = RECIPE_DIR / "rootfs"
SUITE = "bookworm"
VARIANT = "minbase"
REPOSITORY = "netloom-lab/node"
RECIPE_LABEL = "netloom.lab.recipe"
APT_SOURCES = Path("/etc/apt")


class ImageError(Exception):
    """The node image cannot be built; the message says which step failed and why."""


def read_packages(path: Path = RECIPE_DIR / "packages.txt") -> list[str]:
    """Package names from packages.txt (one a line, # comments)."""
    names = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


def recipe_hash(recipe_dir: Path = RECIPE_DIR) -> str:
    """Hash of everything that decides the image's content: suite, variant, packages, recipe files."""
    digest = hashlib.sha256(f"{SUITE}\n{VARIANT}\n".encode())
    digest.update("\n".join(sorted(read_packages(recipe_dir / "packages.txt"))).encode())
    for path in sorted(p for p in recipe_dir.rglob("*") if p.is_file() and p.name != "packages.txt"):
        if "__pycache__" in path.parts:
            continue
        digest.update(f"\0{path.relative_to(recipe_dir)}\0{os.access(path, os.X_OK)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def image_tag(recipe_dir: Path = RECIPE_DIR) -> str:
    return f"{REPOSITORY}:{recipe_hash(recipe_dir)}"


def parse_sources(files: dict[str, str], suite: str = SUITE) -> str | None:
    """The first configured `deb` URI serving `suite` with `main`, from sources.list(.d) texts.

    `files` maps file names to contents; *.sources files are deb822, others one-line format.
    """
    for name, text in files.items():
        entries = _deb822_entries(text) if name.endswith(".sources") else _one_line_entries(text)
        for types, uris, suites, components in entries:
            if "deb" in types and suite in suites and "main" in components and uris:
                return uris[0].rstrip("/")
    return None


def _one_line_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("deb") and "[" in line:  # drop "[arch=amd64 signed-by=...]" options
            head, _, rest = line.partition("[")
            line = head + rest.partition("]")[2]
        words = line.split()
        if len(words) >= 4:
            yield [words[0]], [words[1]], [words[2]], words[3:]


def _deb822_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    paragraph: dict[str, str] = {}
    last_key = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if paragraph and paragraph.get("enabled", "yes").lower() != "no":
                yield (paragraph.get("types", "").split(), paragraph.get("uris", "").split(),
                       paragraph.get("suites", "").split(), paragraph.get("components", "").split())
            paragraph, last_key = {}, ""
        elif line[0] in " \t" and last_key:  # folded continuation of the previous field
            paragraph[last_key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            last_key = key.strip().lower()
            paragraph[last_key] = value.strip()


def host_mirror(apt_dir: Path = APT_SOURCES) -> str:
    """The Debian mirror this machine's apt uses for bookworm main."""
    candidates = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
                  *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    files = {str(path): path.read_text() for path in candidates if path.is_file()}
    mirror = parse_sources(files)
    if mirror is None:
        raise ImageError(f"no apt source for '{SUITE} main' in {apt_dir}/sources.list(.d): "
                         "the image is built from the same mirror as the host")
    return mirror


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise builds (and lab changes) between concurrent runs, e.g. molecule and a script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_image(client: docker.DockerClient, state_dir: Path, say: Callable[[str], None]) -> str:
    """Return the current node image tag, building it first if the engine does not have it."""
    tag = image_tag()
    if client.images.list(name=tag):
        return tag
    with file_lock(state_dir / "locks" / "image.lock"):
        if client.images.list(name=tag):  # built by a concurrent run while we waited
            return tag
        build(client, tag, state_dir, say)
        prune_old_images(client, tag, say)
    return tag


def build(client: docker.DockerClient, tag: str, state_dir: Path, say: Callable[[str], None]) -> None:
    """debootstrap + overlay files + configure.sh in a chroot, then `docker import`."""
    mirror = host_mirror()
    packages = read_packages()
    build_dir = state_dir / "build"
    cache_dir = state_dir / "cache" / "debootstrap"
    build_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="node-", dir=build_dir))
    rootfs = work / "rootfs"
    log_path = build_dir / f"{tag.rpartition(':')[2]}.log"
    started = time.monotonic()
    try:
        say(f"image {tag}: debootstrap {SUITE} from {mirror} ({len(packages)} packages, log {log_path})")
        with log_path.open("w") as log:
            _run(["debootstrap", f"--variant={VARIANT}", f"--cache-dir={cache_dir}",
                  f"--include={','.join(packages)}", SUITE, str(rootfs), mirror],
                 log, log_path, "debootstrap")
            _install_overlay(rootfs)
            with (RECIPE_DIR / "configure.sh").open("rb") as script:
                _run(["chroot", str(rootfs), "/bin/sh", "-s"], log, log_path, "configure.sh", stdin=script,
                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
        say(f"image {tag}: rootfs ready after {time.monotonic() - started:.0f} s, importing")
        _import(client, rootfs, tag)
    finally:
        _remove_tree(work)
    say(f"image {tag}: built in {time.monotonic() - started:.0f} s")


def _run(argv: list[str], log: IO[str], log_path: Path, step: str, stdin: IO[bytes] | None = None,
         env: dict[str, str] | None = None) -> None:
    log.write(f"$ {' '.join(argv[:3])} ...\n")
    log.flush()
    result = subprocess.run(argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, check=False, env=env)
    if result.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise ImageError(f"{step} failed (exit {result.returncode}); end of {log_path}:\n{tail}")


def _install_overlay(rootfs: Path, overlay_dir: Path = OVERLAY_DIR) -> None:
    """Copy lab/image/rootfs/ into the new rootfs, never through a symlink that leaves it."""
    root = rootfs.resolve()
    for source in sorted(overlay_dir.rglob("*")):
        if not source.is_file() or "__pycache__" in source.parts:
            continue
        target = rootfs / source.relative_to(overlay_dir)
        existing = target.parent  # check before creating anything below it
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
        if not existing.resolve().is_relative_to(root) or target.is_symlink():
            raise ImageError(f"{target} would be written outside the image rootfs")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)


def _import(client: docker.DockerClient, rootfs: Path, tag: str) -> None:
    repository, _, version = tag.partition(":")
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        client.api.import_image(src=tar.stdout, repository=repository, tag=version,
                                changes=['CMD ["/sbin/init"]', f"LABEL {RECIPE_LABEL}={version}"])
    finally:
        tar.stdout.close()
        if tar.wait() != 0:
            raise ImageError(f"tar of {rootfs} failed (exit {tar.returncode})")
    if not client.images.list(name=tag):
        raise ImageError(f"docker import did not create {tag}")


def _remove_tree(work: Path) -> None:
    """Delete a build directory, after making sure nothing (proc, sys, dev) is still mounted in it."""
    prefix = str(work.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount_point in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False)
    # --one-file-system: a mount that refused to go away is skipped, never emptied.
    subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def prune_old_images(client: docker.DockerClient, keep: str, say: Callable[[str], None]) -> None:
    """Remove node images of older recipes that no container uses any more."""
    used = {container.attrs["Image"] for container in client.containers.list(all=True)}
    for image in client.images.list(name=REPOSITORY):
        if keep in image.tags or image.id in used:
            continue
        for old_tag in image.tags:
            try:
                client.images.remove(old_tag)
            except docker.errors.APIError as exc:  # still in use after all: keep it
                say(f"image {old_tag}: kept ({exc.explanation})")
            else:
                say(f"image {old_tag}: removed (older recipe, unused)")
