"""Lab topology files: validation errors name the field, and what `up` renders from them."""
from __future__ import annotations

import copy
import ipaddress
import pathlib
from typing import Any

import lab_image
import lab_topology
import pytest
from lab_topology import NodeAccess, TopologyError

OVERLAY = pathlib.Path(__file__).resolve().parents[2] / "lab" / "topologies" / "overlay.yml"
KEY = pathlib.Path("/repo/.lab/ssh/id_ed25519")
KNOWN_HOSTS = pathlib.Path("/repo/.lab/ssh/known_hosts-small")

SMALL: dict[str, Any] = {
    "name": "small",
    "networks": {"lan": {"subnet": "100.127.10.0/24"}, "wan": {"subnet": "100.127.11.0/24"}},
    "defaults": {"routes": [{"to": "default", "via": "100.127.10.254"}],
                 "sysctls": {"net.ipv4.ip_forward": 1}},
    "nodes": {
        "a": {"networks": {"lan": "100.127.10.10"}, "groups": ["clients"], "vars": {"role_id": 7}},
        "b": {"networks": {"lan": "100.127.10.254", "wan": "100.127.11.10"},
              "routes": [{"to": "default", "state": "absent"}], "sysctls": {"net.ipv4.ip_forward": 0}},
    },
}


def small(**changes: Any) -> dict[str, Any]:
    """A copy of SMALL with nested keys replaced, e.g. small(**{"nodes.a.docker": "yes"})."""
    data = copy.deepcopy(SMALL)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value
    return data


def test_overlay_topology_is_the_kohakuriver_lab() -> None:
    lab = lab_topology.load(OVERLAY)
    assert lab.name == "overlay"
    assert lab.groups == {"overlay_hub": ["hub"], "overlay_runners": ["runner1", "runner2"],
                          "internet": ["outside"]}
    assert {name: str(node.addresses["underlay"]) for name, node in lab.nodes.items()} == {
        "hub": "192.0.2.10", "runner1": "192.0.2.11", "runner2": "192.0.2.12", "outside": "192.0.2.254"}
    assert [name for name, node in lab.nodes.items() if node.docker] == ["runner1", "runner2"]
    assert lab.nodes["runner2"].vars == {"overlay_runner_id": 2}
    for name in ("hub", "runner1", "runner2"):
        assert lab.nodes[name].routes == (
            lab_topology.Route("default", ipaddress.IPv4Address("192.0.2.254")),)
    outside = lab.nodes["outside"]
    assert outside.routes == (lab_topology.Route("default", present=False),)
    assert outside.sysctls == {"net.ipv4.ip_forward": "0"}
    assert outside.addresses["internet"] == ipaddress.IPv4Address("198.51.100.10")
    assert outside.echo == (lab_topology.Echo(ipaddress.IPv4Address("198.51.100.10"), 8080),)
    assert outside.echo[0].unit == "netloom-lab-echo@198.51.100.10:8080.service"


def test_node_route_replaces_the_default_route_to_the_same_destination() -> None:
    lab = lab_topology.parse(small(**{"nodes.a.routes": [{"to": "default", "via": "100.127.10.1"}],
                                      "networks.lan.gateway": "100.127.10.2"}))
    assert lab.nodes["a"].routes == (lab_topology.Route("default", ipaddress.IPv4Address("100.127.10.1")),)
    assert lab.nodes["b"].routes == (lab_topology.Route("default", present=False),)


def test_defaults_merge_and_node_values_win() -> None:
    lab = lab_topology.parse(small())
    assert lab.nodes["a"].sysctls == {"net.ipv4.ip_forward": "1"}
    assert lab.nodes["b"].sysctls == {"net.ipv4.ip_forward": "0"}
    assert lab.networks["lan"].gateway == ipaddress.IPv4Address("100.127.10.1")


@pytest.mark.parametrize(("changes", "where"), [
    ({"name": "Bad_Name"}, "name"),
    ({"color": "red"}, "topology"),
    ({"networks.lan.subnet": "100.127.10.1/24"}, "networks.lan.subnet"),
    ({"networks.lan.subnet": "100.127.10.0/30"}, "networks.lan.subnet"),
    ({"networks.wan.subnet": "100.127.10.128/25"}, "networks.wan.subnet"),
    ({"networks.mgmt": {"subnet": "100.127.12.0/24"}}, "networks"),
    ({"networks.lan.gateway": "100.127.99.1"}, "networks.lan.gateway"),
    ({"nodes.a.networks": {"lan": "100.127.11.5"}}, "nodes.a.networks.lan"),
    ({"nodes.a.networks": {"lan": "100.127.10.1"}}, "nodes.a.networks.lan"),
    ({"nodes.b.networks": {"lan": "100.127.10.10"}}, "nodes.b.networks.lan"),
    ({"nodes.b.routes": []}, "defaults.routes[0] (for node b).via"),
    ({"nodes.a.networks": {"dmz": "100.127.10.5"}}, "nodes.a.networks"),
    ({"nodes.a.networks": {}}, "nodes.a.networks"),
    ({"nodes.a.docker": "yes"}, "nodes.a.docker"),
    ({"nodes.a.groups": "clients"}, "nodes.a.groups"),
    ({"nodes.a.groups": ["all"]}, "nodes.a.groups"),
    ({"nodes.A_1": {"networks": {"lan": "100.127.10.20"}}}, "nodes"),
    ({"nodes.a.routes": [{"to": "10.0.0.0/8", "via": "100.127.11.1"}]}, "nodes.a.routes[0].via"),
    ({"nodes.a.routes": [{"to": "10.0.0.0/8", "via": "100.127.10.10"}]}, "nodes.a.routes[0].via"),
    ({"nodes.a.routes": [{"to": "10.0.0.0/8", "dev": "wan"}]}, "nodes.a.routes[0].dev"),
    ({"nodes.a.routes": [{"to": "10.0.0.0/8"}]}, "nodes.a.routes[0]"),
    ({"nodes.a.routes": [{"to": "10.0.0.1/8", "dev": "lan"}]}, "nodes.a.routes[0].to"),
    ({"nodes.a.routes": [{"to": "default", "via": "100.127.10.254", "state": "absent"}]},
     "nodes.a.routes[0]"),
    ({"nodes.a.sysctls": {"kernel.pid_max": 99999}}, "nodes.a.sysctls"),
    ({"nodes.a.sysctls": {"net.ipv4.ip_forward": {"on": 1}}}, "nodes.a.sysctls.net.ipv4.ip_forward"),
    ({"nodes.a.vars": {"ansible_port": 22}}, "nodes.a.vars"),
    ({"nodes.a.vars": {"netloom_underlay_ip": "1.2.3.4"}}, "nodes.a.vars"),
    ({"nodes.a.services": {"echo": {"address": "100.127.11.10", "port": 80}}},
     "nodes.a.services.echo[0].address"),
    ({"nodes.a.services": {"echo": {"address": "100.127.10.10", "port": 0}}},
     "nodes.a.services.echo[0].port"),
    ({"nodes.a.services": {"ftp": {}}}, "nodes.a.services"),
])
def test_bad_topology_is_rejected_naming_the_field(changes: dict[str, Any], where: str) -> None:
    with pytest.raises(TopologyError) as raised:
        lab_topology.parse(small(**changes))
    assert raised.value.where == where


def test_unreadable_or_invalid_yaml_file_is_named(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        lab_topology.load(broken)
    with pytest.raises(TopologyError, match="cannot read"):
        lab_topology.load(tmp_path / "missing.yml")


def test_network_script_sets_sysctls_then_routes() -> None:
    routes = [{"to": "default", "state": "absent"}, {"to": "10.0.0.0/8", "dev": "wan"},
              {"to": "10.1.0.0/16", "via": "100.127.11.1", "dev": "wan"}]
    lab = lab_topology.parse(small(**{"nodes.b.routes": routes}))
    script = lab_topology.render_network_script(lab, lab.nodes["b"], {"lan": "eth2", "wan": "eth1"})
    assert script.splitlines()[1:] == [
        "set -e",
        "sysctl -q -w net.ipv4.ip_forward=0",
        "ip -4 route flush exact 0.0.0.0/0",
        "ip -4 route replace 10.0.0.0/8 dev eth1",
        "ip -4 route replace 10.1.0.0/16 via 100.127.11.1 dev eth1",
    ]
    script_a = lab_topology.render_network_script(lab, lab.nodes["a"], {"lan": "eth1"})
    assert script_a.splitlines()[-1] == "ip -4 route replace default via 100.127.10.254"


def test_inventory_has_groups_connection_and_host_vars() -> None:
    lab = lab_topology.parse(small())
    access = {"a": NodeAccess(32801, {"lan": "eth1"}), "b": NodeAccess(32802, {"lan": "eth2", "wan": "eth1"})}
    inventory = lab_topology.render_inventory(lab, access, KEY, KNOWN_HOSTS)
    assert inventory["all"]["vars"] == {"netloom_lab": "small"}
    assert inventory["all"]["children"] == {"clients": {"hosts": {"a": None}}}
    assert inventory["all"]["hosts"]["a"] == {
        "ansible_host": "127.0.0.1", "ansible_port": 32801, "ansible_user": "root",
        "ansible_ssh_private_key_file": str(KEY), "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={KNOWN_HOSTS} -o StrictHostKeyChecking=yes",
        "netloom_underlay_ip": "100.127.10.10", "netloom_underlay_interface": "eth1", "role_id": 7}
    assert inventory["all"]["hosts"]["b"]["netloom_underlay_interface"] == "eth2"


def test_known_hosts_lists_every_key_at_its_published_port() -> None:
    access = {"b": NodeAccess(32802, {}, ("ssh-ed25519 AAAAB",)),
              "a": NodeAccess(32801, {}, ("ssh-ed25519 AAAAA", "ecdsa-sha2-nistp256 AAAAE"))}
    assert lab_topology.render_known_hosts(access) == (
        "[127.0.0.1]:32801 ssh-ed25519 AAAAA\n[127.0.0.1]:32801 ecdsa-sha2-nistp256 AAAAE\n"
        "[127.0.0.1]:32802 ssh-ed25519 AAAAB\n")


def test_molecule_instance_config_lists_every_node() -> None:
    lab = lab_topology.parse(small())
    access = {"a": NodeAccess(32801, {}), "b": NodeAccess(32802, {})}
    assert lab_topology.render_molecule_instances(lab, access, KEY) == [
        {"instance": "a", "address": "127.0.0.1", "user": "root", "port": 32801, "identity_file": str(KEY)},
        {"instance": "b", "address": "127.0.0.1", "user": "root", "port": 32802, "identity_file": str(KEY)},
    ]


@pytest.fixture
def workload_recipes(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A workload_images directory with one recipe, `web`."""
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "packages.txt").write_text("nginx-light\n")
    (tmp_path / "web" / "image.yml").write_text('cmd: ["nginx"]\nexpose: [80]\n')
    monkeypatch.setattr(lab_image, "WORKLOADS_DIR", tmp_path)
    return tmp_path


def test_node_images_are_workload_recipes_loaded_into_its_dockerd(workload_recipes: pathlib.Path) -> None:
    lab = lab_topology.parse(small(**{"nodes.a.docker": True, "nodes.a.images": ["web"]}))
    assert lab.nodes["a"].images == ("web",)
    assert lab.nodes["b"].images == ()


@pytest.mark.parametrize(("images", "docker", "value"), [
    ("web", True, "web"),                  # not a list
    (["db"], True, "db"),                  # no recipe
    (["../web"], True, "../web"),          # not a recipe name
    (["web", "web"], True, ["web", "web"]),
    (["web"], False, ["web"]),             # the node has no dockerd to load it into
])
def test_bad_node_images_are_rejected_naming_the_field(workload_recipes: pathlib.Path, images: Any,
                                                        docker: bool, value: Any) -> None:
    with pytest.raises(TopologyError) as raised:
        lab_topology.parse(small(**{"nodes.a.docker": docker, "nodes.a.images": images}))
    assert (raised.value.where, raised.value.value) == ("nodes.a.images", value)


def test_workload_image_yml_becomes_import_changes(workload_recipes: pathlib.Path) -> None:
    (workload_recipes / "web" / "image.yml").write_text(
        'entrypoint: ["/init"]\ncmd: ["-v"]\nexpose: [80, 53/udp]\nenv: {A: "1 2"}\nworkdir: /srv\n')
    recipe = lab_image.workload_recipe("web")
    assert recipe.repository == "netloom-lab/web"
    assert recipe.tag == f"netloom-lab/web:{lab_image.recipe_hash(workload_recipes / 'web')}"
    assert recipe.changes == ('ENTRYPOINT ["/init"]', 'CMD ["-v"]', "EXPOSE 80", "EXPOSE 53/udp",
                              'ENV A="1 2"', "WORKDIR /srv")


@pytest.mark.parametrize("text", ['cmd: "nginx -g"\n', "stopsignal: SIGTERM\n", "expose: [http]\n",
                                  "volumes: [data]\n", "- a list\n"])
def test_bad_image_yml_is_refused_before_a_build(workload_recipes: pathlib.Path, text: str) -> None:
    (workload_recipes / "web" / "image.yml").write_text(text)
    with pytest.raises(lab_image.ImageError, match=r"image\.yml"):
        lab_image.workload_recipe("web")


def test_unknown_workload_image_names_the_known_ones(workload_recipes: pathlib.Path) -> None:
    with pytest.raises(lab_image.ImageError, match=r"'db'.*known: web"):
        lab_image.workload_recipe("db")


def test_cluster_topology_has_every_role_on_subnets_no_other_lab_uses() -> None:
    """scripts/site.sh's default lab: every node role, and it can be up next to any other lab."""
    topologies = OVERLAY.parent
    cluster = lab_topology.load(topologies / "cluster.yml")
    groups = {group for node in cluster.nodes.values() for group in node.groups}
    assert {"overlay_hub", "overlay_runners", "edge_gateway", "edge_compute", "pod_hosts", "internet",
            "edge_adjacent"} <= groups
    docker_nodes = {name for name, node in cluster.nodes.items() if node.docker}
    assert docker_nodes == {"runner1", "runner2", "control", "compute1", "compute2", "podhost"}
    # Taken elsewhere (lab/README.md): tests/lab, the module tests, bench/fanout, the SSH networks.
    taken = [ipaddress.ip_network(cidr) for cidr in
             ("100.127.10.0/24", "100.127.11.0/24", "198.18.0.0/15", "198.19.255.0/24", "172.16.0.0/16")]
    for path in sorted(topologies.glob("*.yml")):
        if path.name != "cluster.yml":
            taken += [network.subnet for network in lab_topology.load(path).networks.values()]
    for network in cluster.networks.values():
        assert not [other for other in taken if network.subnet.overlaps(other)], network
