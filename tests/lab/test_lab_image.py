"""Node image recipe: mirror detection, the recipe hash, safe overlay copy, the echo service."""
from __future__ import annotations

import ipaddress
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import lab_docker
import lab_image
import pytest

HOST_SOURCES = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""
ECHO = pathlib.Path(lab_image.OVERLAY_DIR) / "usr" / "local" / "lib" / "netloom-lab" / "echo.py"


def test_mirror_from_deb822_sources() -> None:
    assert lab_image.parse_sources({"debian.sources": HOST_SOURCES}) == "http://deb.debian.org/debian"


def test_mirror_from_one_line_sources_skips_other_suites_and_options() -> None:
    text = ("deb http://security.example/debian-security bookworm-security main\n"
            "# deb http://commented.example/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib\n")
    assert lab_image.parse_sources({"sources.list": text}) == "http://mirror.example/debian"


def test_disabled_or_foreign_sources_give_no_mirror() -> None:
    disabled = HOST_SOURCES.replace("Types: deb\n#", "Enabled: no\nTypes: deb\n#", 1)
    assert lab_image.parse_sources({"d.sources": disabled}) is None
    assert lab_image.parse_sources({"node.sources": "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\n"
                                                    "Suites: nodistro\nComponents: main\n"}) is None


def test_package_list_ignores_comments() -> None:
    packages = lab_image.read_packages()
    assert "systemd" in packages and "python3-pyroute2" in packages and "docker.io" in packages
    assert all(name and "#" not in name and " " not in name for name in packages)


def test_recipe_hash_follows_packages_and_files(tmp_path: pathlib.Path) -> None:
    recipe = tmp_path / "image"
    shutil.copytree(lab_image.RECIPE_DIR, recipe)
    original = lab_image.recipe_hash(recipe)
    assert original == lab_image.recipe_hash(lab_image.RECIPE_DIR)
    packages = recipe / "packages.txt"
    packages.write_text(packages.read_text() + "# a comment changes nothing\n")
    assert lab_image.recipe_hash(recipe) == original
    packages.write_text(packages.read_text() + "less\n")
    with_less = lab_image.recipe_hash(recipe)
    assert with_less != original
    unit = recipe / "rootfs" / "etc" / "systemd" / "system" / "netloom-lab-network.service"
    unit.write_text(unit.read_text() + "# changed\n")
    assert lab_image.recipe_hash(recipe) not in (original, with_less)


def test_overlay_is_not_written_through_a_symlink_out_of_the_rootfs(tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "host-etc"
    outside.mkdir()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "etc").symlink_to(outside)  # as an absolute symlink in a rootfs would resolve on the host
    with pytest.raises(lab_image.ImageError, match="outside the image rootfs"):
        lab_image._install_overlay(rootfs)
    assert list(outside.iterdir()) == []


def test_overlay_lands_in_the_rootfs(tmp_path: pathlib.Path) -> None:
    lab_image._install_overlay(tmp_path)
    conf = tmp_path / "etc" / "ssh" / "sshd_config.d" / "netloom-lab.conf"
    assert "PermitRootLogin prohibit-password" in conf.read_text()
    assert (tmp_path / "usr" / "local" / "lib" / "netloom-lab" / "echo.py").read_bytes() == ECHO.read_bytes()


def test_management_subnet_skips_used_ranges() -> None:
    used = [ipaddress.IPv4Network("172.16.0.0/24"), ipaddress.IPv4Network("172.16.1.128/25"),
            ipaddress.IPv4Network("10.0.0.0/8")]
    assert lab_docker.pick_management_subnet(used) == ipaddress.IPv4Network("172.16.2.0/24")
    with pytest.raises(lab_docker.LabError, match="no free /24"):
        lab_docker.pick_management_subnet([ipaddress.IPv4Network("172.16.0.0/12")])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def echo_server():
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ECHO), f"127.0.0.1:{port}"])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.05)
    yield port
    server.kill()
    server.wait()


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if request:
            sock.sendall(request)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_echo_answers_http_with_the_client_address(echo_server: int) -> None:
    reply = exchange(echo_server, b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"Content-Length: 10" in head
    assert body == b"127.0.0.1\n"
    assert exchange(echo_server, b"HEAD / HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n")


def test_echo_answers_a_plain_tcp_client_with_the_bare_address(echo_server: int) -> None:
    assert exchange(echo_server, b"hello\n") == b"127.0.0.1\n"
    assert exchange(echo_server, b"") == b"127.0.0.1\n"  # sends nothing: answered after the 2 s wait
