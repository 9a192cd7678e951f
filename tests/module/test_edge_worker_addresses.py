"""The edge worker network as roles/edge_compute builds it, against the real dockerd.

Each node's workers share the base subnet and gateway but take addresses only from the
node's block (ip_range). Docker hands out every address of the range that is a host of the
base, so without the reserved edges the first worker got the block's network address
(10.88.1.0 on compute1). Here the base is a free /24 of 198.18.0.0/15 and the block a /28.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from filter_plugins.netloom import netloom_edge_cni_reserved
from tests.module.test_docker_bridge_network import DockerLab, dbn, endpoint, image  # noqa: F401

pytestmark = pytest.mark.docker


@pytest.fixture
def lab(image: str) -> Iterator[DockerLab]:  # noqa: F811
    lab = DockerLab(image)
    try:
        yield lab
    finally:
        lab.cleanup()


def test_workers_get_the_first_host_of_the_node_block_not_its_network_address(lab: DockerLab) -> None:
    base = lab.subnet()
    block = list(base.subnets(new_prefix=28))[1]
    gateway = str(base.network_address + 1)
    name = lab.network_name()
    args = {"name": name, "subnet": str(base), "gateway": gateway, "ip_range": str(block)}

    # What the role did before: the first worker gets the block's network address.
    assert dbn(args)["changed"]
    first = lab.container("plain", name)
    assert endpoint(first, name)["IPAMConfig"] is None
    assert ipaddress.IPv4Address(endpoint(first, name)["IPAddress"]) == block.network_address
    lab.cleanup()

    reserved = netloom_edge_cni_reserved(str(block), str(base), gateway)
    assert reserved == {"netloom-cni-network": str(block.network_address),
                        "netloom-cni-broadcast": str(block.broadcast_address)}
    lab.networks.append(name)
    assert dbn({**args, "aux_addresses": reserved})["changed"]
    handed = [endpoint(lab.container(f"w{index}", name), name)["IPAddress"] for index in range(2)]
    assert handed == [str(block.network_address + 1), str(block.network_address + 2)]
    assert not dbn({**args, "aux_addresses": reserved})["changed"]
