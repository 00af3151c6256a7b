"""`speedy admin compact` and `speedy admin garbage`: deleted space, per chunkserver."""
from __future__ import annotations

import argparse
import sys

from speedy.client.chunkconn import ChunkError, format_addr
from speedy.common.config import fraction as threshold_arg


def add_commands(cmd, asub) -> None:
    """The two admin subcommands (cmd: main.build_parser's helper)."""
    from speedy.cli.main import group_id, server_addr
    sp = cmd("compact", cmd_compact, "compact the chunks of a group's servers whose garbage "
             "(deleted records) reaches a fraction of their used bytes", asub)
    sp.add_argument("group", type=group_id, metavar="GROUP")
    sp.add_argument("--server", type=server_addr, metavar="HOST:PORT",
                    help="only this chunkserver (default: every server of the group)")
    sp.add_argument("--threshold", type=threshold_arg, metavar="F",
                    help="fraction 0..1 (default: each server's --compact_threshold; "
                         "0 compacts every chunk with any garbage)")
    sp.add_argument("--wait", action="store_true",
                    help="wait until done and print the bytes freed")
    sp = cmd("garbage", cmd_garbage, "garbage (bytes of deleted records) per chunk of a "
             "group's servers", asub)
    sp.add_argument("group", type=group_id, metavar="GROUP")
    sp.add_argument("--server", type=server_addr, metavar="HOST:PORT",
                    help="only this chunkserver (default: every server of the group)")


def targets(client, ns: argparse.Namespace) -> list[tuple[str, int]]:
    """The servers a command goes to."""
    from speedy.cli.main import UsageError
    if ns.server:
        return [ns.server]
    found = [s.addr for s in client.servers() if s.group_id == ns.group]
    if not found:
        raise UsageError(f"group {ns.group} has no registered chunkserver")
    return found


def cmd_compact(ns: argparse.Namespace) -> int:
    """admin compact GROUP [--server] [--threshold F] [--wait]."""
    from speedy.cli.main import EXIT_CLUSTER, EXIT_OK, human, make_client, warn
    failed = 0
    total = 0
    with make_client(ns) as client:
        for addr in targets(client, ns):
            try:
                n, freed = client.pool.compact(addr, ns.threshold, ns.wait)
            except ChunkError as e:
                warn(str(e))
                failed += 1
                continue
            total += freed
            if ns.wait:
                print(f"{format_addr(addr)}: {n} chunks compacted, {human(freed)} freed "
                      f"({freed} bytes)")
            else:
                print(f"{format_addr(addr)}: {n} chunks queued for compaction")
    if ns.wait and not ns.server:
        print(f"total: {human(total)} freed ({total} bytes)")
    sys.stdout.flush()
    return EXIT_CLUSTER if failed else EXIT_OK


def cmd_garbage(ns: argparse.Namespace) -> int:
    """admin garbage GROUP [--server]: a table, one line per chunk."""
    from speedy.cli.main import EXIT_CLUSTER, EXIT_OK, human, make_client, warn
    failed = 0
    rows = [["SERVER", "CHUNK", "GARBAGE", "USED", "FREE", "GARBAGE%", ""]]
    with make_client(ns) as client:
        for addr in targets(client, ns):
            try:
                compacting, chunks = client.pool.garbage(addr)
            except ChunkError as e:
                warn(str(e))
                failed += 1
                continue
            for c in chunks:
                pct = 100.0 * c.garbage_bytes / c.used_bytes if c.used_bytes else 0.0
                rows.append([format_addr(addr), str(c.chunk_id), human(c.garbage_bytes),
                             human(c.used_bytes), human(c.avail_space), f"{pct:.1f}",
                             "compacting" if c.chunk_id == compacting else ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows if len(rows) > 1 else []:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return EXIT_CLUSTER if failed else EXIT_OK
