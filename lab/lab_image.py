"""Lab images: Debian bookworm from debootstrap, imported into the local Docker engine.

There is no registry to pull from, so images are built here: the node image (lab/image/)
and the workload images that run inside nodes or in tests (lab/workload_images/<name>/).
A tag is a hash of its recipe (package list, suite, every recipe file), so an image is
built once and rebuilt only when its recipe changes; the .deb files are cached in
.lab/cache/ for the rebuilds.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
import yaml

RECIPE_DIR = Path(__file__).resolve().parent / "image"
OVERLAY_DIR = RECIPE_DIR / "rootfs"
SUITE = "bookworm"
VARIANT = "minbase"
REPOSITORY = "netloom-lab/node"
RECIPE_LABEL = "netloom.lab.recipe"
APT_SOURCES = Path("/etc/apt")
STATE_DIR = Path(__file__).resolve().parents[1] / ".lab"
WORKLOADS_DIR = Path(__file__).resolve().parent / "workload_images"
WORKLOAD_REPOSITORY = "netloom-lab"
WORKLOAD_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# image.yml keys -> how each becomes a `docker import --change` instruction
# (the instructions `docker import --change` accepts; STOPSIGNAL, for one, is refused)
IMAGE_KEYS = {"cmd", "entrypoint", "expose", "env", "workdir", "user", "labels", "volumes"}


class ImageError(Exception):
    """The node image cannot be built; the message says which step failed and why."""


@dataclass(frozen=True)
class Recipe:
    """One image recipe: packages.txt, optional configure.sh and rootfs/, the import changes."""

    name: str
    directory: Path
    repository: str
    changes: tuple[str, ...]

    @property
    def tag(self) -> str:
        return f"{self.repository}:{recipe_hash(self.directory)}"


NODE_RECIPE = Recipe("node", RECIPE_DIR, REPOSITORY, ('CMD ["/sbin/init"]',))


def workload_names(directory: Path | None = None) -> list[str]:
    """The workload image recipes in lab/workload_images/ (a directory with a packages.txt)."""
    return sorted(path.parent.name for path in (directory or WORKLOADS_DIR).glob("*/packages.txt")
                  if WORKLOAD_NAME.match(path.parent.name))


def workload_recipe(name: str, directory: Path | None = None) -> Recipe:
    """The recipe of workload image `name`, with its image.yml checked and turned into changes."""
    directory = directory or WORKLOADS_DIR
    recipe_dir = directory / name
    if not WORKLOAD_NAME.match(name) or not (recipe_dir / "packages.txt").is_file():
        raise ImageError(f"workload image {name!r}: no recipe {recipe_dir}/packages.txt "
                         f"(known: {', '.join(workload_names(directory)) or 'none'})")
    spec_path = recipe_dir / "image.yml"
    try:
        spec = yaml.safe_load(spec_path.read_text()) if spec_path.exists() else {}
    except yaml.YAMLError as exc:
        raise ImageError(f"workload image {name}: {spec_path}: {exc}") from None
    changes = image_changes(str(spec_path), spec or {})
    return Recipe(name, recipe_dir, f"{WORKLOAD_REPOSITORY}/{name}", changes)


def image_changes(where: str, spec: Any) -> tuple[str, ...]:
    """`docker import --change` instructions from an image.yml mapping (Dockerfile syntax)."""
    if not isinstance(spec, dict) or set(spec) - IMAGE_KEYS:
        raise ImageError(f"{where}: must be a mapping with keys from {', '.join(sorted(IMAGE_KEYS))}")
    changes = []
    for key in ("entrypoint", "cmd"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, list) or not value or not all(isinstance(word, str) for word in value):
                raise ImageError(f"{where}: {key}: {value!r}: must be a non-empty list of strings "
                                 "(exec form)")
            changes.append(f"{key.upper()} {json.dumps(value)}")
    for port in spec.get("expose", []):
        if not re.fullmatch(r"[0-9]{1,5}(/(tcp|udp))?", str(port)):
            raise ImageError(f"{where}: expose: {port!r}: must be PORT or PORT/tcp|udp")
        changes.append(f"EXPOSE {port}")
    for key in ("env", "labels"):
        mapping = spec.get(key, {})
        if not isinstance(mapping, dict):
            raise ImageError(f"{where}: {key}: {mapping!r}: must be a mapping")
        for name, value in mapping.items():
            changes.append(f"{'ENV' if key == 'env' else 'LABEL'} {name}={json.dumps(str(value))}")
    volumes = spec.get("volumes", [])
    if not isinstance(volumes, list) or not all(isinstance(v, str) and v.startswith("/") for v in volumes):
        raise ImageError(f"{where}: volumes: {volumes!r}: must be a list of absolute paths")
    if volumes:
        changes.append(f"VOLUME {json.dumps(volumes)}")
    for key in ("workdir", "user"):
        if key in spec:
            if not isinstance(spec[key], (str, int)) or not str(spec[key]).strip():
                raise ImageError(f"{where}: {key}: {spec[key]!r}: must be a non-empty string")
            changes.append(f"{key.upper()} {spec[key]}")
    return tuple(changes)


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


def ensure_image(client: docker.DockerClient, state_dir: Path, say: Callable[[str], None],
                 recipe: Recipe = NODE_RECIPE) -> str:
    """Return the current tag of `recipe`'s image, building it first if the engine does not have it."""
    tag = recipe.tag
    if client.images.list(name=tag):
        return tag
    with file_lock(state_dir / "locks" / f"image-{recipe.name}.lock"):
        if client.images.list(name=tag):  # built by a concurrent run while we waited
            return tag
        build(client, tag, state_dir, say, recipe)
        prune_old_images(client, tag, say, recipe.repository)
    return tag


def workload_image(name: str, client: docker.DockerClient | None = None, state_dir: Path = STATE_DIR,
                   say: Callable[[str], None] = print) -> str:
    """Build workload image `name` unless the engine has it; tag it :latest too; return the hash tag."""
    recipe = workload_recipe(name)
    client = client or docker.from_env(version="auto", timeout=600)
    tag = ensure_image(client, state_dir, say, recipe)
    image = client.images.get(tag)
    latest = f"{recipe.repository}:latest"
    if latest not in image.tags:
        image.tag(recipe.repository, "latest")
    return tag


def build(client: docker.DockerClient, tag: str, state_dir: Path, say: Callable[[str], None],
          recipe: Recipe = NODE_RECIPE) -> None:
    """debootstrap + overlay files + configure.sh in a chroot, then `docker import`."""
    mirror = host_mirror()
    packages = read_packages(recipe.directory / "packages.txt")
    build_dir = state_dir / "build"
    cache_dir = state_dir / "cache" / "debootstrap"
    build_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-", dir=build_dir))
    rootfs = work / "rootfs"
    log_path = build_dir / f"{tag.rpartition(':')[2]}.log"
    started = time.monotonic()
    try:
        say(f"image {tag}: debootstrap {SUITE} from {mirror} ({len(packages)} packages, log {log_path})")
        with log_path.open("w") as log:
            _run(["debootstrap", f"--variant={VARIANT}", f"--cache-dir={cache_dir}",
                  f"--include={','.join(packages)}", SUITE, str(rootfs), mirror],
                 log, log_path, "debootstrap")
            _install_overlay(rootfs, recipe.directory / "rootfs")
            configure = recipe.directory / "configure.sh"
            if configure.is_file():
                with configure.open("rb") as script:
                    _run(["chroot", str(rootfs), "/bin/sh", "-s"], log, log_path, "configure.sh",
                         stdin=script, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
        say(f"image {tag}: rootfs ready after {time.monotonic() - started:.0f} s, importing")
        _import(client, rootfs, tag, recipe.changes)
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


def _install_overlay(rootfs: Path, overlay: Path = OVERLAY_DIR) -> None:
    """Copy the recipe's rootfs/ into the new rootfs, never through a symlink that leaves it."""
    root = rootfs.resolve()
    for source in sorted(overlay.rglob("*")):
        if not source.is_file() or "__pycache__" in source.parts:
            continue
        target = rootfs / source.relative_to(overlay)
        existing = target.parent  # check before creating anything below it
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
        if not existing.resolve().is_relative_to(root) or target.is_symlink():
            raise ImageError(f"{target} would be written outside the image rootfs")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)


def _import(client: docker.DockerClient, rootfs: Path, tag: str, changes: tuple[str, ...]) -> None:
    repository, _, version = tag.partition(":")
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        client.api.import_image(src=tar.stdout, repository=repository, tag=version,
                                changes=[*changes, f"LABEL {RECIPE_LABEL}={version}"])
    except docker.errors.APIError as exc:  # the engine stops reading: tar then dies of SIGPIPE
        raise ImageError(f"docker import of {tag} failed: {exc.explanation}") from None
    finally:
        tar.stdout.close()
        tar.wait()
    if tar.returncode != 0:
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


def prune_old_images(client: docker.DockerClient, keep: str, say: Callable[[str], None],
                     repository: str = REPOSITORY) -> None:
    """Remove images of older recipes of this repository that no container uses any more."""
    used = {container.attrs["Image"] for container in client.containers.list(all=True)}
    for image in client.images.list(name=repository):
        if keep in image.tags or image.id in used:
            continue
        for old_tag in image.tags:
            try:
                client.images.remove(old_tag)
            except docker.errors.APIError as exc:  # still in use after all: keep it
                say(f"image {old_tag}: kept ({exc.explanation})")
            else:
                say(f"image {old_tag}: removed (older recipe, unused)")
