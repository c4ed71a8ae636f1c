"""Who takes part in a collective: the group every primitive (and baseline) is built on."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import secrets
from dataclasses import asdict, dataclass, field

#: Every port AggBox uses: UDP 47000-49999 for its three program families (broadcast
#: 47000-47999, allreduce 48000-48999, reduce-by-key 49000-49999) and 45000-46999 plus
#: 49500-49999 for the baselines' TCP/UDP servers and the MapReduce barrier. They lie in
#: Linux's default ephemeral range (32768-60999), so wherever AggBox runs they are
#: reserved (net.ipv4.ip_local_reserved_ports): the testbeds' namespaces reserve all of
#: them, and attaching a family reserves its own (aggbox/bpf.py); a host set up by hand or
#: by the playbooks needs ``sysctl net.ipv4.ip_local_reserved_ports=45000-49999``.
RESERVED_PORTS = (45000, 49999)


def new_job_id(bits: int = 31) -> int:
    """A fresh job id from the OS's CSPRNG: never derived from a run's seed, so two runs of
    the same bench (same seed) do not share a job id an on-path host could learn once."""
    return 1 + secrets.randbelow(2**bits - 1)


def new_token() -> int:
    """A fresh 32-bit job secret (never 0), from ``secrets`` whatever the run's seed."""
    return 1 + secrets.randbelow(2**32 - 1)


@dataclass(frozen=True)
class Member:
    rank: int
    ip: str
    mac: str = "00:00:00:00:00:00"


@dataclass(frozen=True)
class Group:
    """A collective's membership, as every participant sees it (plus its own rank).

    ``members[0]`` is the root (the broadcast sender, the allreduce aggregator host is
    separate and named by ``aggregator``). Every member listens on ``port``; ``job_id`` and
    ``token`` travel in every AggBox packet and keep concurrent jobs apart.
    """

    job_id: int
    token: int
    members: tuple[Member, ...]
    rank: int  # this process's rank
    port: int = 47000
    ifname: str = "eth0"
    group_ip: str = ""  # broadcast: the virtual destination the root sends its one copy to
    group_mac: str = "02:ab:ff:ff:ff:fe"
    root: int = 0
    aggregator: Member | None = None
    # An authenticated job's key (aggbox/auth.py), 16 bytes as 32 hex digits; "" is off.
    # A secret like the token, but one that no packet ever carries.
    auth_key: str = ""
    options: dict = field(default_factory=dict, compare=False)

    @property
    def me(self) -> Member:
        return self.members[self.rank]

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def receivers(self) -> list[Member]:
        return [m for m in self.members if m.rank != self.root]

    @property
    def key(self) -> bytes | None:
        """The job's auth key as bytes, or None for a job without authentication."""
        return bytes.fromhex(self.auth_key) if self.auth_key else None

    def with_rank(self, rank: int) -> Group:
        data = asdict(self)
        data["rank"] = rank
        return Group.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> Group:
        data = dict(data)
        data["members"] = tuple(Member(**m) for m in data["members"])
        if data.get("aggregator"):
            data["aggregator"] = Member(**data["aggregator"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Group:
        return cls.from_dict(json.loads(text))


#: Administratively scoped multicast (239/8); 213 as the testbeds' 10.213.0.0/16.
MCAST_PREFIX = "239.213"


def multicast_address(group: Group, option: str, purpose: str = "") -> str:
    """A job's IPv4 multicast group: ``group.options[option]`` if given, else
    239.213.x.y hashed from the job (and ``purpose``), so that two jobs, or two uses of
    one job, on one bridge do not share a group."""
    from aggbox.errors import AggBoxError

    explicit = group.options.get(option)
    if explicit:
        if not ipaddress.IPv4Address(explicit).is_multicast:
            raise AggBoxError(f"{option} {explicit} is not an IPv4 multicast address")
        return str(explicit)
    key = f"{purpose}{group.job_id}:{group.token}:{group.port}"
    h = hashlib.sha256(key.encode()).digest()
    return f"{MCAST_PREFIX}.{h[0]}.{h[1]}"
