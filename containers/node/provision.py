"""Provision a province node container before `plt-node serve` (run by the entrypoint).

1. Keys: `data_dir/<node_id>/keys` is created on first start (as `plt-node keys init`) and
   kept on the node's volume afterwards.
2. Directory: the node publishes its peer entry (node, URL, root key: public data only) to
   the exchange folder `PROVISION_EXCHANGE_DIR`, waits for the entries of `PROVISION_PEER_NODES`
   (comma-separated node ids) and writes its peers.json and regions.json from them. The
   exchange folder stands in for the operators' out-of-band exchange of root keys; key sets
   are fetched from the peers themselves and verified against the pinned root keys.
3. Database: waits until `DATABASE_URL` answers, so the node's start does not race it.

Every wait is bounded (`PROVISION_WAIT_S`, default 120 s); on timeout the container
exits non-zero with the reason.

Replicas of one province share the node's volume (keys, pepper, directory): the first to
start makes the keys under an exclusive lock on the volume, the others find them there and
load them, so every replica signs as the same node.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec

from nodes.settings import load_settings
from protocol.directory import Peer
from wallet.plt import node as plt_node


class Entry(msgspec.Struct, frozen=True):
    node: str
    url: str
    root_kid: str
    root_pub: str
    province: str


def say(message: str) -> None:
    print(f"provision: {message}", file=sys.stderr, flush=True)


def main() -> int:
    settings = load_settings()
    wait_s = float(os.environ.get("PROVISION_WAIT_S", "120"))
    deadline = time.monotonic() + wait_s
    keys_dir = settings.plt_keys_dir
    with volume_lock(Path(settings.data_dir)):
        if (keys_dir / "keyset.json").exists():
            keys = plt_node.NodeKeys.load(keys_dir)
        else:
            keys = plt_node.init_keys(keys_dir, settings.node_id, time.time_ns() // 1_000_000)
            say(f"created keys for {keys.node_id}")
    exchange = os.environ.get("PROVISION_EXCHANGE_DIR", "")
    peer_nodes = [n for n in os.environ.get("PROVISION_PEER_NODES", "").split(",") if n.strip()]
    if exchange:
        folder = Path(exchange)
        own = Entry(
            node=keys.node_id,
            url=settings.plt_public_url,
            root_kid=keys.root.kid,
            root_pub=keys.root.public_b64,
            province=settings.province_code,
        )
        tmp = folder / f".{keys.node_id}.json.tmp"
        tmp.write_bytes(msgspec.json.encode(own))
        tmp.replace(folder / f"{keys.node_id}.json")
        entries: dict[str, Entry] = {}
        while True:
            for node in peer_nodes:
                path = folder / f"{node.strip()}.json"
                if path.exists():
                    entries[node.strip()] = msgspec.json.decode(path.read_bytes(), type=Entry)
            missing = [n.strip() for n in peer_nodes if n.strip() not in entries]
            if not missing:
                break
            if time.monotonic() > deadline:
                say(f"gave up waiting for the peer entries of {', '.join(missing)}")
                return 1
            time.sleep(0.5)
        peers = [Peer(node=e.node, url=e.url, root_kid=e.root_kid, root_pub=e.root_pub) for e in entries.values()]
        regions = {e.province: e.node for e in entries.values()}
        with volume_lock(Path(settings.data_dir)):
            plt_node.write_directory(settings.plt_directory_dir, peers, regions)
        say(f"directory: {', '.join(sorted(entries)) or 'no peers'}")
    if settings.database_url:
        asyncio.run(
            wait_for_database(settings.database_url, settings.db_target_session_attrs, deadline)
        )
    return 0


@contextlib.contextmanager
def volume_lock(data_dir: Path) -> Iterator[None]:
    """An exclusive lock shared by every replica mounting this volume (flock on a file)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / ".provision.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


async def wait_for_database(dsn: str, target_session_attrs: str, deadline: float) -> None:
    """Until a server of `dsn` the node may write to answers (a primary, not a standby)."""
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5, target_session_attrs=target_session_attrs)
        # OSError: refused, unknown host, timed out; InternalClientError: no host is writable.
        except (OSError, asyncpg.PostgresError, asyncpg.InternalClientError) as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"provision: the database does not answer: {exc}") from exc
            await asyncio.sleep(1)
            continue
        await conn.close()
        return


if __name__ == "__main__":
    sys.exit(main())
