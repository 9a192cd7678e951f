"""Docker bridge networks as plain data: validation, normalisation, comparison, requests.

Docker cannot edit a network in place, so the module's whole decision is "is the live
network the wanted one, field by field?". Both sides are reduced to one normalised
config (a JSON-able dict) here, without any Docker client, so the comparison is unit
tested and the module only reads, plans and calls the API. Nothing here imports the
docker SDK: the requests it builds are the Engine API's own JSON, which docker 5.0.3
(Debian's python3-docker) and 7.x both pass through unchanged.
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.netloom.common import InputError, ifname, int_range, ipv4_address, ipv4_network

MANAGED_LABEL = "netloom.managed"
MANAGED_VALUE = "true"
PREDEFINED_NETWORKS = ("bridge", "host", "none")
MTU_MIN, MTU_MAX = 68, 65535

# Where every netloom module finds the Engine API unless told otherwise (docker_host_address).
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
OPT_BRIDGE_NAME = "com.docker.network.bridge.name"
OPT_MTU = "com.docker.network.driver.mtu"
OPT_ICC = "com.docker.network.bridge.enable_icc"
OPT_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
# Friendly option name -> the driver option Docker stores it as.
FRIENDLY_OPTIONS = {
    "bridge_name": OPT_BRIDGE_NAME,
    "mtu": OPT_MTU,
    "icc": OPT_ICC,
    "masquerade": OPT_MASQUERADE,
}

# Compared in this order; the differences list and the diff follow it.
COMPARED_FIELDS = ("driver", "bridge_name", "mtu", "icc", "masquerade", "driver_options", "internal",
                   "subnet", "gateway", "ip_range", "aux_addresses", "extra_pools", "labels")
# Left out of the wanted config, Docker picks these itself; whatever it picked is accepted.
DOCKER_CHOOSES = ("subnet", "gateway")

# Go's strconv.ParseBool, which the bridge driver uses for its boolean options.
_GO_TRUE = ("1", "t", "true")
_GO_FALSE = ("0", "f", "false")


def option_text(value: Any) -> str:
    """Docker options and labels are strings; YAML booleans become Docker's spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def docker_bool(field_name: str, value: Any) -> bool:
    text = option_text(value).strip().lower()
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise InputError(field_name, value, "not a boolean (true/false)")


def network_name(value: Any) -> str:
    text = "" if value is None else str(value)
    if not text.strip():
        raise InputError("name", value, "a network name must not be empty")
    if any(char.isspace() for char in text):
        raise InputError("name", value, "a network name must not contain whitespace")
    if text in PREDEFINED_NETWORKS:
        raise InputError("name", value, "is one of Docker's predefined networks, which netloom never manages")
    return text


def _canonical_options(options: Mapping[str, str], field_of: Mapping[str, str] | None) -> dict[str, Any]:
    """Split driver options into the friendly fields and the rest, parsed and validated.

    Used for the live network and for the wanted one alike, so "1450" and 1450, "1" and
    true, or a name given via driver_options or via bridge_name compare equal. Wanted
    options (`field_of` maps each to the option the user set it with) must be valid; a
    live value netloom cannot parse is kept as Docker's text, so it simply differs.
    """
    def parse(key: str, parser: Callable[[str, str], Any]) -> Any:
        value = options[key]
        if field_of is not None:
            return parser(field_of.get(key, key), value)
        try:
            return parser(key, value)
        except InputError:
            return value

    rest = {key: value for key, value in options.items() if key not in FRIENDLY_OPTIONS.values()}
    return {
        "bridge_name": parse(OPT_BRIDGE_NAME, ifname) if OPT_BRIDGE_NAME in options else None,
        "mtu": parse(OPT_MTU, lambda name, value: int_range(name, value, MTU_MIN, MTU_MAX))
        if OPT_MTU in options else None,
        # Docker's defaults when the option is absent: both on.
        "icc": parse(OPT_ICC, docker_bool) if OPT_ICC in options else True,
        "masquerade": parse(OPT_MASQUERADE, docker_bool) if OPT_MASQUERADE in options else True,
        "driver_options": dict(sorted(rest.items())),
    }


def _host_address(field_name: str, value: Any, subnet: ipaddress.IPv4Network) -> str:
    """An address Docker can reserve in `subnet`: inside it and not its network/broadcast address."""
    address = ipv4_address(field_name, value)
    if address not in subnet:
        raise InputError(field_name, value, f"is outside the subnet {subnet}")
    if subnet.prefixlen < 31 and address in (subnet.network_address, subnet.broadcast_address):
        raise InputError(field_name, value, f"is the network or broadcast address of {subnet}")
    return str(address)


def _wanted_ipam(params: Mapping[str, Any]) -> dict[str, Any]:
    aux_in = params.get("aux_addresses") or {}
    if params.get("subnet") in (None, ""):
        for dependent in ("gateway", "ip_range"):
            if params.get(dependent) not in (None, ""):
                raise InputError(dependent, params[dependent], "needs a subnet")
        if aux_in:
            raise InputError("aux_addresses", aux_in, "needs a subnet")
        return {"subnet": None, "gateway": None, "ip_range": None, "aux_addresses": {}}
    subnet = ipv4_network("subnet", params["subnet"])
    gateway = None
    if params.get("gateway") not in (None, ""):
        gateway = _host_address("gateway", params["gateway"], subnet)
    ip_range = None
    if params.get("ip_range") not in (None, ""):
        ip_range_net = ipv4_network("ip_range", params["ip_range"])
        if not ip_range_net.subnet_of(subnet):
            raise InputError("ip_range", params["ip_range"], f"is not inside the subnet {subnet}")
        ip_range = str(ip_range_net)
    if not isinstance(aux_in, Mapping):
        raise InputError("aux_addresses", aux_in, "must be a mapping of name to IPv4 address")
    aux: dict[str, str] = {}
    owner_of: dict[str, str] = {} if gateway is None else {gateway: "the gateway"}
    for aux_name, value in aux_in.items():
        label = f"aux_addresses.{aux_name}"
        if not str(aux_name).strip():
            raise InputError("aux_addresses", aux_in, "names must not be empty")
        address = _host_address(label, value, subnet)
        if address in owner_of:
            raise InputError(label, value, f"collides with {owner_of[address]}")
        owner_of[address] = f"aux_addresses.{aux_name}"
        aux[str(aux_name)] = address
    return {"subnet": str(subnet), "gateway": gateway, "ip_range": ip_range,
            "aux_addresses": dict(sorted(aux.items()))}


def _wanted_labels(labels_in: Any) -> dict[str, str]:
    labels_in = labels_in or {}
    if not isinstance(labels_in, Mapping):
        raise InputError("labels", labels_in, "must be a mapping of label to value")
    labels: dict[str, str] = {}
    for key, value in labels_in.items():
        if not str(key).strip():
            raise InputError("labels", labels_in, "label names must not be empty")
        labels[str(key)] = option_text(value)
    if labels.get(MANAGED_LABEL, MANAGED_VALUE) != MANAGED_VALUE:
        raise InputError(f"labels.{MANAGED_LABEL}", labels[MANAGED_LABEL],
                         f"is netloom's ownership label and is always {MANAGED_VALUE!r}")
    labels[MANAGED_LABEL] = MANAGED_VALUE
    return dict(sorted(labels.items()))


def wanted_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the module's options and return the normalised config they describe.

    Raises InputError naming the first bad field; nothing has been read or changed then.
    """
    driver_options = params.get("driver_options") or {}
    if not isinstance(driver_options, Mapping):
        raise InputError("driver_options", driver_options, "must be a mapping of option to value")
    options: dict[str, str] = {}
    field_of: dict[str, str] = {}
    for key, value in driver_options.items():
        if not str(key).strip():
            raise InputError("driver_options", driver_options, "option names must not be empty")
        options[str(key)] = option_text(value)
        field_of[str(key)] = f"driver_options.{key}"
    for friendly, key in FRIENDLY_OPTIONS.items():
        value = params.get(friendly)
        if value is None:
            continue
        if key in options:
            raise InputError(friendly, value, f"is also set as driver_options.{key}; set it only once")
        options[key] = option_text(value)
        field_of[key] = friendly
    config: dict[str, Any] = {"driver": "bridge"}
    config.update(_canonical_options(options, field_of))
    config["internal"] = bool(params.get("internal"))
    config.update(_wanted_ipam(params))
    config["extra_pools"] = []
    config["labels"] = _wanted_labels(params.get("labels"))
    return config


def _ipv4_or_none(text: Any) -> str | None:
    if text in (None, ""):
        return None
    return str(ipaddress.ip_interface(str(text)).ip) if "/" in str(text) else str(ipaddress.ip_address(text))


def _network_or_none(text: Any) -> str | None:
    return str(ipaddress.ip_network(str(text), strict=False)) if text else None


def live_config(inspect: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise `docker network inspect` output to the same shape as wanted_config.

    The first IPv4 IPAM pool becomes subnet/gateway/ip_range/aux_addresses; any other
    pool (IPv6, a second IPv4 range) is listed in extra_pools, which netloom never wants.
    """
    options = {str(k): str(v) for k, v in (inspect.get("Options") or {}).items()}
    config: dict[str, Any] = {"driver": inspect.get("Driver")}
    config.update(_canonical_options(options, None))
    config["internal"] = bool(inspect.get("Internal"))
    pools = list((inspect.get("IPAM") or {}).get("Config") or [])
    ipv4_pool: Mapping[str, Any] | None = None
    for pool in pools:
        subnet = pool.get("Subnet")
        if subnet and isinstance(ipaddress.ip_network(subnet, strict=False), ipaddress.IPv4Network):
            ipv4_pool = pool
            break
    pool = ipv4_pool or {}
    config["subnet"] = _network_or_none(pool.get("Subnet"))
    config["gateway"] = _ipv4_or_none(pool.get("Gateway"))
    config["ip_range"] = _network_or_none(pool.get("IPRange"))
    aux = pool.get("AuxiliaryAddresses") or {}
    config["aux_addresses"] = {str(k): str(_ipv4_or_none(v)) for k, v in sorted(aux.items())}
    config["extra_pools"] = sorted(str(p.get("Subnet")) for p in pools if p is not ipv4_pool)
    config["labels"] = {str(k): str(v) for k, v in sorted((inspect.get("Labels") or {}).items())}
    return config


def is_managed(inspect: Mapping[str, Any]) -> bool:
    return (inspect.get("Labels") or {}).get(MANAGED_LABEL) == MANAGED_VALUE


def differences(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every compared field whose live value is not the wanted one, as {field, current, wanted}."""
    found = []
    for name in COMPARED_FIELDS:
        if name in DOCKER_CHOOSES and wanted.get(name) is None:
            continue
        if current.get(name) != wanted.get(name):
            found.append({"field": name, "current": current.get(name), "wanted": wanted.get(name)})
    return found


def create_request(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for APIClient.create_network (all but the name) from a config.

    The IPAM block is the Engine API's JSON, which docker.types.IPAMConfig would build too.
    """
    options = dict(config.get("driver_options") or {})
    if config.get("bridge_name") is not None:
        options[OPT_BRIDGE_NAME] = config["bridge_name"]
    if config.get("mtu") is not None:
        options[OPT_MTU] = str(config["mtu"])
    options[OPT_ICC] = option_text(config.get("icc", True))
    options[OPT_MASQUERADE] = option_text(config.get("masquerade", True))
    ipam = None
    if config.get("subnet"):
        pool: dict[str, Any] = {"Subnet": config["subnet"]}
        if config.get("gateway"):
            pool["Gateway"] = config["gateway"]
        if config.get("ip_range"):
            pool["IPRange"] = config["ip_range"]
        if config.get("aux_addresses"):
            pool["AuxiliaryAddresses"] = dict(config["aux_addresses"])
        ipam = {"Driver": "default", "Config": [pool], "Options": {}}
    return {"driver": config.get("driver") or "bridge", "options": dict(sorted(options.items())),
            "ipam": ipam, "internal": bool(config.get("internal")),
            "labels": dict(config.get("labels") or {})}


def address_conflicts(name: str, wanted: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse, before anything is removed, what Docker would refuse at create time.

    `others` maps the names of all other networks to their live configs. Docker rejects a
    subnet that overlaps another network's and a bridge another network already uses;
    finding that out only after the old network is gone would leave containers stranded.
    """
    subnet = ipaddress.ip_network(wanted["subnet"]) if wanted.get("subnet") else None
    for other_name, other in sorted(others.items()):
        if other_name == name:
            continue
        other_subnet = ipaddress.ip_network(other["subnet"]) if other.get("subnet") else None
        if subnet is not None and other_subnet is not None and subnet.overlaps(other_subnet):
            raise InputError("subnet", wanted["subnet"],
                             f"overlaps Docker network {other_name!r} ({other['subnet']})")
        if wanted.get("bridge_name") and other.get("bridge_name") == wanted["bridge_name"]:
            raise InputError("bridge_name", wanted["bridge_name"],
                             f"is already the bridge of Docker network {other_name!r}")


@dataclass
class Attachment:
    """A container's membership of the network, as needed to reconnect it identically."""

    container_id: str
    name: str
    ipv4_address: str | None
    aliases: list[str] = field(default_factory=list)

    def describe(self, address: str | None) -> dict[str, Any]:
        return {"ipv4_address": address, "aliases": list(self.aliases)}


def attachment_of(container: Mapping[str, Any], network: str, network_id: str) -> Attachment | None:
    """Read a container's endpoint settings for network `network` (id `network_id`) from `docker inspect`.

    A running container has its live IPAddress; a stopped one only the address it asked
    for (IPAMConfig), and no network id at all if it never ran. A stopped container still
    holding the id of an earlier network of the same name is not on this one. Docker adds
    the short container id as an alias on every user network by itself, so it is not
    carried over as if the user had set it.
    """
    settings = ((container.get("NetworkSettings") or {}).get("Networks") or {}).get(network)
    if settings is None or settings.get("NetworkID") not in (None, "", network_id):
        return None
    requested = (settings.get("IPAMConfig") or {}).get("IPv4Address")
    address = _ipv4_or_none(requested or settings.get("IPAddress"))
    short_id = str(container.get("Id", ""))[:12]
    aliases = [str(alias) for alias in settings.get("Aliases") or [] if alias != short_id]
    return Attachment(container_id=str(container.get("Id")), name=str(container.get("Name", "")).lstrip("/"),
                      ipv4_address=address, aliases=aliases)


def default_gateway(config: Mapping[str, Any]) -> str | None:
    """The gateway Docker takes when none is given: the first free address of the range/subnet."""
    if config.get("gateway"):
        return str(config["gateway"])
    if not config.get("subnet"):
        return None
    subnet = ipaddress.IPv4Network(config["subnet"])
    pool = ipaddress.IPv4Network(config["ip_range"]) if config.get("ip_range") else subnet
    first = pool.network_address
    if first == subnet.network_address and subnet.prefixlen < 31:
        first += 1
    return str(first)


def kept_address(address: str | None, config: Mapping[str, Any]) -> str | None:
    """The address a container can be reconnected at in the network `config`, or None.

    Docker only accepts a requested address on a network with a configured subnet, inside
    it, and not one it has reserved (gateway, auxiliary addresses). None means the
    container is reconnected with an address Docker assigns.
    """
    if address is None or not config.get("subnet"):
        return None
    subnet = ipaddress.IPv4Network(config["subnet"])
    ip = ipaddress.IPv4Address(address)
    if ip not in subnet:
        return None
    if subnet.prefixlen < 31 and ip in (subnet.network_address, subnet.broadcast_address):
        return None
    reserved = {default_gateway(config), *(config.get("aux_addresses") or {}).values()}
    return None if address in reserved else address


def reconnect_order(attachments: list[Attachment],
                    config: Mapping[str, Any]) -> list[tuple[Attachment, str | None]]:
    """Each attachment with the address it gets back, containers keeping an address first.

    A container reconnected without an address takes whatever Docker hands out next; doing
    those last keeps Docker from handing out an address another container is about to reclaim.
    """
    pairs = [(attachment, kept_address(attachment.ipv4_address, config)) for attachment in attachments]
    return sorted(pairs, key=lambda pair: (pair[1] is None, pair[0].name))


def docker_host_address(option: str | None) -> str:
    """The Engine API address: the module's docker_host option, else DOCKER_HOST, else the local socket."""
    return option or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
