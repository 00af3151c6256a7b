"""The write placement policy (MASTER-API.md): which group may take a write, and why not.

Pure functions over the master's chunkserver objects (speedy.wire.master.ServerStatus or
a subclass), used by the client to choose a group and by the master's console to say
why a group cannot take writes now. `overhead` is the bytes a record adds to its data
on a chunkserver (speedy.format.chunkfile.RECORD_HEADER_SIZE, passed by the caller:
wire does not import format).
"""
from __future__ import annotations

import random
from typing import Iterable, Sequence

from speedy.wire.master import GlobalStatus, ServerStatus, Status

LOAD_SLACK = 4          # groups this close to the least loaded one are equally good
MIN_REPLICAS = 2        # RW servers a group needs, by default


def server_name(s: ServerStatus) -> str:
    """"ip:port" ("[ip]:port" for IPv6)."""
    return f"[{s.ip}]:{s.port}" if ":" in s.ip else f"{s.ip}:{s.port}"


def status_name(status: int) -> str:
    """INIT, RW, RO or ERR (the number itself when unknown)."""
    try:
        return Status(status).name
    except ValueError:
        return str(status)


def group_load(servers: Sequence[ServerStatus]) -> int:
    """Pending plus in-flight writes reported by a group's servers."""
    return sum(s.pending_writes + s.writing_count for s in servers)


def group_problem(servers: Sequence[ServerStatus], size: int, min_replicas: int, *,
                  overhead: int) -> str | None:
    """Why a group (its servers without the ERR ones, as the route lists them) cannot
    take a write of size bytes now, or None when it can."""
    if not servers:
        return "no servers"
    bad = [s for s in servers if s.status in (Status.INIT, Status.RO)]
    if bad:
        return ", ".join(f"{server_name(s)} is {status_name(s.status)}" for s in bad)
    if any(s.global_status == GlobalStatus.TRANSFERRING for s in servers):
        return "transferring"
    rw = [s for s in servers if s.status == Status.RW]
    if len(rw) < min_replicas:
        return f"only {len(rw)} RW server(s), need {min_replicas}"
    if min(s.max_free_space for s in rw) <= size + overhead:
        return f"no room for {size} bytes"
    return None


def choose_group(groups: dict[int, list], size: int, min_replicas: int = MIN_REPLICAS,
                 exclude: Iterable[int] = (), rng: random.Random | None = None, *,
                 overhead: int) -> int | None:
    """The group for a write of size bytes, or None.

    A candidate has no INIT or RO server, is not transferring, has at least min_replicas
    RW servers, and each RW server's MaxFreeSpace exceeds the record. Among candidates,
    the least loaded (pending + writing) win, within LOAD_SLACK; ties are broken at random.
    """
    skip = set(exclude)
    loads = {g: group_load(s) for g, s in groups.items()
             if g not in skip and group_problem(s, size, min_replicas, overhead=overhead) is None}
    if not loads:
        return None
    best = min(loads.values())
    return (rng or random).choice(sorted(g for g, l in loads.items() if l <= best + LOAD_SLACK))


def explain_no_group(groups: dict[int, list], size: int, min_replicas: int, *,
                     overhead: int) -> str:
    """One line saying why no group can take a write."""
    if not groups:
        return "the master's route is empty (no chunkserver registered?)"
    why = "; ".join(
        f"group {g}: {group_problem(s, size, min_replicas, overhead=overhead) or 'failed'}"
        for g, s in sorted(groups.items()))
    return f"no writable group for {size} bytes ({why})"
