"""Benchmark: complete cross-province grant cycles between two real province nodes.

    python bench/grant_cycles.py --pairs 64 --concurrency 16 --cycles 600 --scrypt-n 16384
    python bench/grant_cycles.py ... --auth password     # the payment-password path instead

What runs (all on this machine, nothing mocked):

* two PostgreSQL servers from the embedded wheel (one per province), fsync=on,
  synchronous_commit=on (checked and printed);
* two node processes (`python -m nodes serve`), Hebei prov-13 (givers, node A) and Shanghai
  prov-31 (receivers, node B), with their own keys and peer directories, workers on (the
  outbox sender delivers every message: PREPARE, RECEIVED, ACCEPT, DECISION, ACK);
* a driver (this process) that loads N giver/receiver pairs straight into the two databases
  (people, wallets with scrypt payment passwords, sessions, monthly credits, confirmed cross
  relationships, and one registered P-256 device key per person, held by the driver the way
  a phone holds it), then runs grant cycles at a chosen concurrency over HTTP: the giver
  instructs (signed on the giver's "phone"), the receiver accepts as soon as B offers the
  grant (signed on the receiver's "phone"), and the cycle ends when A has B's ACK;
  `--auth password` confirms both with the payment password instead (scrypt on the node);
* `pgbench -N` on server A in the same run, as the physical reference.

Per-phase latencies come from the nodes' own timestamps (grant rows and the `plt_message`
evidence log), plus the two HTTP calls and the whole cycle as the driver sees them.

A benchmark, not a test: the 3-grants-a-day limit and the 22:00-06:00 blackout are lifted
in the nodes' settings so cycles can repeat at any hour; every other rule and check runs.
With `--auth password` the payment-password KDF dominates on small machines: each cycle
verifies two passwords (giver and receiver), so `--scrypt-n` is a flag and is printed with
the results. With device keys (the default) each cycle verifies two ECDSA P-256 signatures
at the nodes (and B and A re-verify them from the PREPARE and the ACCEPT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from support import (  # noqa: E402
    DB,
    OPERATOR_TOKEN,
    STATEMENTS_SETTINGS,
    add_node_root_arguments,
    cpu_s,
    create_database,
    free_port,
    pct,
    pgbench,
    postmaster_pid,
    print_statements,
    resolve_node_root,
    statements_reset,
    tree,
)

from nodes.embedded_pg import EmbeddedPostgres  # noqa: E402
from nodes.migrate import migrate  # noqa: E402
from protocol import device_auth  # noqa: E402
from protocol.ids import uuid7  # noqa: E402
from wallet import ledger  # noqa: E402
from wallet.credentials import (  # noqa: E402
    PEPPER_FILE,
    Pepper,
    create_pepper,
    digest,
    hash_password_sync,
)
from wallet.idnumber import check_character  # noqa: E402
from wallet.plt.node import NodeKeys, write_directory  # noqa: E402

A, B = "prov-13", "prov-31"
PROVINCE = {A: "130000", B: "310000"}
PASSWORD = "135790"
GIVER_BALANCE_FEN = 10**9  # never the bottleneck
GRANT_FEN = 10_000
POLL_S = 0.02  # the driver polls the databases for the next step at this pace


@dataclass
class Phone:
    """A person's device key, as the phone holds it, and what it signs as."""

    key: ec.EllipticCurvePrivateKey
    kid: str
    person: str  # `p-<id>` for the giver, `w-<id>` for the receiver

    def sign(self, action: device_auth.Action, node: str, ids: dict[str, str]) -> dict[str, str]:
        what = device_auth.instruction(
            action,
            node=node,
            person=self.person,
            ids=ids,
            amount_fen=GRANT_FEN,
            created_at_ms=time.time_ns() // 1_000_000,
        )
        signed, sig = device_auth.sign(self.key, what)
        return {
            "kid": self.kid,
            "signed": device_auth.b64url(signed),
            "sig": device_auth.b64url(sig),
        }


@dataclass
class Pair:
    giver_token: str
    receiver_token: str
    relation_id: str
    giver_phone: Phone
    receiver_phone: Phone


@dataclass
class Cycle:
    transfer_id: str
    instruct_s: float = 0.0
    accept_s: float = 0.0
    total_s: float = 0.0


@dataclass
class Node:
    node_id: str
    port: int
    server: EmbeddedPostgres
    process: subprocess.Popen[bytes] | None = None
    peak_rss_kb: int = 0
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dsn(self) -> str:
        return self.server.dsn(DB)


# --- setup -----------------------------------------------------------------------------------


def id_number(seq: int, region: str) -> str:
    first17 = f"{region}19800101{seq % 1000:03d}"
    return first17 + check_character(first17)


async def create_migrated_database(server: EmbeddedPostgres, node_root: Path) -> None:
    """A database migrated by the node's own migrations (`--node-root` may be an older
    checkout, whose node refuses a database migrated further than it knows)."""
    await create_database(server)
    conn = await asyncpg.connect(server.dsn(DB))
    try:
        await migrate(conn, Path(node_root) / "migrations")
    finally:
        await conn.close()


def write_keys(data: Path, nodes: dict[str, Node]) -> dict[str, Pepper]:
    """Each node's keys, directory and password pepper (beside the keys, as keys init does)."""
    now_ms = time.time_ns() // 1_000_000 - 60_000
    keys = {n: NodeKeys.generate(n, now_ms) for n in nodes}
    peppers: dict[str, Pepper] = {}
    for n in nodes:
        keys[n].save(data / n / "keys")
        peppers[n] = create_pepper(data / n / "keys" / PEPPER_FILE)
        others = [o for o in nodes if o != n]
        write_directory(
            data / n / "directory",
            [keys[o].peer_entry(nodes[o].url) for o in others],
            {PROVINCE[o]: o for o in others},
        )
        (data / n / "directory" / "keysets").mkdir(parents=True, exist_ok=True)
        for o in others:
            (data / n / "directory" / "keysets" / f"{o}.json").write_bytes(
                msgspec.json.encode(keys[o].document)
            )
    return peppers


def start_node(data: Path, node: Node, args: argparse.Namespace) -> None:
    env = {
        **os.environ,
        "PLT_NODE_ID": node.node_id,
        "PLT_PROVINCE_CODE": PROVINCE[node.node_id],
        "DATABASE_URL": node.dsn,
        "PLT_PORT": str(node.port),
        "PLT_DATA_DIR": str(data),
        "PLT_KEYS_DIR": str(data / node.node_id / "keys"),
        "PLT_DIRECTORY_DIR": str(data / node.node_id / "directory"),
        "PLT_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "PLT_WORKERS_ENABLED": "true",
        "PLT_LOG_LEVEL": "WARNING",
        "PLT_DB_POOL_MIN": "2",
        "PLT_DB_POOL_MAX": str(args.pool_max),
        "PLT_OTP_SENDER": "none",
        "PLT_RULES__GRANTS_PER_GIVER_PER_DAY": "100000000",
        "PLT_RULES__GRANT_BLACKOUT_START_HOUR": "0",
        "PLT_RULES__GRANT_BLACKOUT_END_HOUR": "0",
        "PLT_RULES__SESSION_TTL_S": "86400",
    }
    node.log = data / f"{node.node_id}.log"
    with node.log.open("wb") as log:
        node.process = subprocess.Popen(
            [args.node_python, "-m", "nodes", "serve"],
            cwd=args.node_root,
            env=env,
            stdout=log,
            stderr=log,
        )


async def wait_up(node: Node, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                response = await http.get(node.url + "/plt/v1/keyset")
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert node.process is not None and node.process.poll() is None, node.log.read_text()[
                -3000:
            ]
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{node.node_id} did not come up")


_PERSON = """
INSERT INTO insured_person (id_number, name, scheme, status, pooling_region, phone)
VALUES ($1, $2, $3, 'normal', $4, $5) RETURNING id
"""
_SET_ACCOUNT = "UPDATE insured_person SET personal_account_id = $2 WHERE id = $1"
_WALLET = """
INSERT INTO wallet (person_id, state, password_hash, opened_via, opened_at)
VALUES ($1, 'open', $2, 'app', $3)
"""
_DEVICE = """
INSERT INTO device_key (person_id, kid, alg, public_key, label, created_at)
VALUES ($1, $2, 'ES256', $3, 'bench phone', $4)
"""
_SESSION = """
INSERT INTO app_session (token_hash, person_id, created_at, expires_at) VALUES ($1, $2, $3, $4)
"""
_GIVER_SIDE = """
INSERT INTO cross_relationship
    (relation_id, side, peer_node, person_id, other_name, other_id_number, other_ref,
     other_province, relation_type, evidence_ref, state, request_hash, filed_at, delivered_at,
     confirmed_at)
VALUES ($1, 'giver', $2, $3, '李四', $4, $5, $6, 'child', 'bench', 'active', $7, $8, $8, $8)
"""
_RECEIVER_SIDE = """
INSERT INTO cross_relationship
    (relation_id, side, peer_node, person_id, other_name, other_ref, relation_type, state,
     request_hash, filed_at, confirmed_at)
VALUES ($1, 'receiver', $2, $3, '张*', $4, 'child', 'active', $5, $6, $6)
"""


async def person(
    conn: asyncpg.Connection,
    seq: int,
    scheme: str,
    region: str,
    password_hash: str,
    now: dt.datetime,
    ref_prefix: str,
) -> tuple[int, str, str, Phone]:
    """A person with an open wallet, a session and a registered device key; returns
    (id, id_number, token, phone)."""
    number = id_number(seq, region)
    pid: int = await conn.fetchval(
        _PERSON, number, f"人{seq}", scheme, region[:2] + "0100", f"139{seq:08d}"
    )
    await conn.execute(_WALLET, pid, password_hash, now)
    token = "sess_" + secrets.token_urlsafe(24)
    await conn.execute(_SESSION, digest(token), pid, now, now + dt.timedelta(days=1))
    key = device_auth.new_device_key()
    point = device_auth.sec1(key.public_key())
    kid = device_auth.key_id(point)
    await conn.execute(_DEVICE, pid, kid, point, now)
    return pid, number, token, Phone(key, kid, f"{ref_prefix}-{pid}")


async def load_pairs(
    a: Node, b: Node, count: int, scrypt_n: int, peppers: dict[str, Pepper]
) -> list[Pair]:
    """Givers at A (employee scheme, credited), receivers at B, confirmed relationships."""
    hash_a = hash_password_sync(PASSWORD, scrypt_n, peppers[A])
    hash_b = hash_password_sync(PASSWORD, scrypt_n, peppers[B])
    now = dt.datetime.now(dt.UTC)
    pairs: list[Pair] = []
    ca = await asyncpg.connect(a.dsn)
    cb = await asyncpg.connect(b.dsn)
    try:
        funding = await ca.fetchval("SELECT id FROM account WHERE kind = 'funding'")
        for i in range(count):
            relation_id = uuid7()
            request_hash = hashlib.sha256(relation_id.encode()).hexdigest()
            async with cb.transaction():
                rpid, rnumber, rtoken, rphone = await person(
                    cb, i, "resident", "310101", hash_b, now, "w"
                )
            async with ca.transaction():
                gpid, gnumber, gtoken, gphone = await person(
                    ca, 500 + i, "employee", "130102", hash_a, now, "p"
                )
                account = await ledger.open_account(ca, "personal", f"personal:{gnumber}")
                await ca.execute(_SET_ACCOUNT, gpid, account)
                await ledger.transfer(
                    ca,
                    debit_account_id=funding,
                    credit_account_id=account,
                    amount_fen=GIVER_BALANCE_FEN,
                    purpose="monthly_credit",
                )
                await ca.execute(
                    _GIVER_SIDE,
                    relation_id,
                    B,
                    gpid,
                    rnumber,
                    f"w-{rpid}",
                    PROVINCE[B],
                    request_hash,
                    now,
                )
            await cb.execute(_RECEIVER_SIDE, relation_id, A, rpid, f"p-{gpid}", request_hash, now)
            pairs.append(Pair(gtoken, rtoken, relation_id, gphone, rphone))
    finally:
        await ca.close()
        await cb.close()
    return pairs


# --- the cycles ----------------------------------------------------------------------------------


async def wait_for(
    pool: asyncpg.Pool, sql: str, *args: object, timeout_s: float = 60.0, poll_s: float = POLL_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pool.fetchval(sql, *args):
            return
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"waited {timeout_s} s for: {sql.strip()} {args}")


class Watcher:
    """Waits for transfers to reach a state in one node's database: one query every `POLL_S`
    for all the cycles waiting there (a poll per cycle in flight cost the driver a quarter
    of a core and the server as many statements)."""

    def __init__(self, conn: asyncpg.Connection, sql: str) -> None:
        self.conn, self.sql = conn, sql  # sql: $1 text[] of transfer ids -> the ids done
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.task = asyncio.create_task(self._poll())

    async def wait(self, transfer_id: str, timeout_s: float = 60.0) -> None:
        future = self.waiting[transfer_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(future, timeout_s)
        finally:
            self.waiting.pop(transfer_id, None)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if not self.waiting:
                continue
            for row in await self.conn.fetch(self.sql, list(self.waiting)):
                future = self.waiting.get(row[0])
                if future is not None and not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.conn.close()


_OFFERED = f"""
SELECT transfer_id FROM grant_in
WHERE from_node = '{A}' AND transfer_id = ANY($1::text[]) AND state = 'PENDING_ACCEPT'
"""
_ACKED = "SELECT transfer_id FROM grant_out WHERE transfer_id = ANY($1::text[]) AND acked"


async def one_cycle(
    pair: Pair,
    http_a: httpx.AsyncClient,
    http_b: httpx.AsyncClient,
    offered: Watcher,
    acked: Watcher,
    auth: str,
) -> Cycle:
    cycle = Cycle(uuid7())
    t0 = time.perf_counter()
    instruction: dict[str, object] = {
        "transfer_id": cycle.transfer_id,
        "relation_id": pair.relation_id,
        "amount_fen": GRANT_FEN,
    }
    if auth == "device":  # the phone signs (in its secure hardware) as the app sends
        ids = {"relation_id": pair.relation_id, "transfer_id": cycle.transfer_id}
        instruction["device"] = pair.giver_phone.sign("grant.instruct", A, ids)
    else:
        instruction["payment_password"] = PASSWORD
    response = await http_a.post(
        "/app/v1/grants",
        json=instruction,
        headers={"Authorization": f"Bearer {pair.giver_token}"},
    )
    cycle.instruct_s = time.perf_counter() - t0
    assert response.status_code == 202, response.text
    await offered.wait(cycle.transfer_id)
    t1 = time.perf_counter()
    answer: dict[str, object] = (
        {"device": pair.receiver_phone.sign("grant.accept", B, {"transfer_id": cycle.transfer_id})}
        if auth == "device"
        else {"payment_password": PASSWORD}
    )
    response = await http_b.post(
        f"/app/v1/grants/incoming/{cycle.transfer_id}/accept",
        json=answer,
        headers={"Authorization": f"Bearer {pair.receiver_token}"},
    )
    cycle.accept_s = time.perf_counter() - t1
    assert response.status_code == 200, response.text
    await acked.wait(cycle.transfer_id)
    cycle.total_s = time.perf_counter() - t0
    return cycle


async def run_cycles(
    a: Node, b: Node, pairs: list[Pair], concurrency: int, cycles: int, auth: str
) -> tuple[list[Cycle], float]:
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    queue: asyncio.Queue[Pair] = asyncio.Queue()
    for p in pairs:
        queue.put_nowait(p)
    done: list[Cycle] = []
    remaining = cycles
    async with (
        httpx.AsyncClient(base_url=a.url, limits=limits, timeout=60) as http_a,
        httpx.AsyncClient(base_url=b.url, limits=limits, timeout=60) as http_b,
    ):
        offered = Watcher(await asyncpg.connect(b.dsn), _OFFERED)
        acked = Watcher(await asyncpg.connect(a.dsn), _ACKED)

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                pair = await queue.get()  # a pair has one grant in flight at a time (RULES 13)
                try:
                    done.append(await one_cycle(pair, http_a, http_b, offered, acked, auth))
                finally:
                    queue.put_nowait(pair)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        await offered.close()
        await acked.close()
    return done, elapsed


# Phase durations from the nodes' own records, in ms. A and B share this machine's clock.
_PHASES_A = """
SELECT g.transfer_id,
       extract(epoch FROM (rcv.at - g.created_at)) * 1000 AS prepare_to_received,
       g.decided_at, g.vote, extract(epoch FROM (ack.at - g.decided_at)) * 1000 AS decision_to_ack
FROM grant_out g
JOIN LATERAL (SELECT min(at) AS at FROM plt_message
              WHERE dedup_key = g.transfer_id AND typ = 'RECEIVED' AND direction = 'in') rcv ON true
JOIN LATERAL (SELECT min(at) AS at FROM plt_message
              WHERE dedup_key = g.transfer_id AND typ = 'ACK' AND direction = 'in') ack ON true
WHERE g.transfer_id = ANY($1::text[])
"""
_PHASES_B = """
SELECT transfer_id, received_at, decided_at FROM grant_in
WHERE from_node = $2 AND transfer_id = ANY($1::text[])
"""


async def phases(a: Node, b: Node, done: list[Cycle], auth: str) -> dict[str, list[float]]:
    from protocol.messages import Accept, MessageType, decode_body

    ids = [c.transfer_id for c in done]
    ca, cb = await asyncpg.connect(a.dsn), await asyncpg.connect(b.dsn)
    try:
        rows_a = {r["transfer_id"]: r for r in await ca.fetch(_PHASES_A, ids)}
        rows_b = {r["transfer_id"]: r for r in await cb.fetch(_PHASES_B, ids, A)}
        created = {
            r["transfer_id"]: r["created_at"]
            for r in await ca.fetch(
                "SELECT transfer_id, created_at FROM grant_out WHERE transfer_id = ANY($1::text[])",
                ids,
            )
        }
    finally:
        await ca.close()
        await cb.close()
    out: dict[str, list[float]] = {
        f"instruct (HTTP, giver's {auth})": [c.instruct_s * 1000 for c in done],
        "PREPARE -> B holds (A commit to B commit)": [],
        "PREPARE -> RECEIVED back at A": [],
        f"accept (HTTP, receiver's {auth})": [c.accept_s * 1000 for c in done],
        "ACCEPT -> DECISION (B accept to A commit)": [],
        "DECISION -> B posts": [],
        "DECISION -> ACK back at A": [],
        "whole cycle (driver)": [c.total_s * 1000 for c in done],
    }
    for tid in ids:
        ra, rb = rows_a[tid], rows_b[tid]
        accept = decode_body(MessageType.ACCEPT, bytes(ra["vote"]))
        assert isinstance(accept, Accept)
        accepted_at = dt.datetime.fromtimestamp(accept.accepted_at_ms / 1000, dt.UTC)
        out["PREPARE -> B holds (A commit to B commit)"].append(
            (rb["received_at"] - created[tid]).total_seconds() * 1000
        )
        out["PREPARE -> RECEIVED back at A"].append(float(ra["prepare_to_received"]))
        out["ACCEPT -> DECISION (B accept to A commit)"].append(
            (ra["decided_at"] - accepted_at).total_seconds() * 1000
        )
        out["DECISION -> B posts"].append(
            (rb["decided_at"] - ra["decided_at"]).total_seconds() * 1000
        )
        out["DECISION -> ACK back at A"].append(float(ra["decision_to_ack"]))
    return out


class CpuMeter:
    """CPU seconds used by each node process, each PostgreSQL server (all its processes) and
    this driver, from now until `per` is called."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.pids: dict[str, list[int]] = {}
        for node in nodes.values():
            assert node.process is not None
            self.pids[f"node {node.node_id}"] = tree(node.process.pid)
            self.pids[f"PG {node.node_id}"] = [postmaster_pid(node.server)]
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        used = {name: cpu_s(tree(pids[0])) for name, pids in self.pids.items()}
        used["driver"] = time.process_time()
        return used

    def per(self, count: int) -> dict[str, float]:
        """ms per `count` (backends that exited in between are not counted: the pools keep
        theirs)."""
        end = self._read()
        return {name: (end[name] - self.start[name]) * 1000 / count for name in end}


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# --- the 06:00 mass expiry ---------------------------------------------------------------------

NOT_YET_DUE = dt.timedelta(days=1)
# 06:00: every loaded grant's deadline passes in one commit (the sweeper sees them together).
# The herd's deadline is set this far ahead, past the sweeper's longest idle pause (10 s), so
# the sweeper knows it before it comes, as it knows the real 06:00; time runs from it.
DEADLINE_AHEAD_S = 12.0
_DUE_AT = """
UPDATE grant_out SET decide_by = $1
WHERE state = 'PREPARED_A' AND decide_by > now()
"""
_NONE_PREPARED = "SELECT NOT EXISTS (SELECT 1 FROM grant_out WHERE state = 'PREPARED_A')"
_ALL_ACKED = "SELECT NOT EXISTS (SELECT 1 FROM grant_out WHERE state = 'ABORTED' AND NOT acked)"
EXPIRY_POLL_S = 0.2
# The grant and its hold in one statement, sent 1,000 at a time (pipelined).
_EXPIRING_GRANT = """
WITH hold AS (
    INSERT INTO ledger_transfer (debit_account_id, credit_account_id, amount_fen, phase, purpose)
    VALUES ($15, $16, $7, 'pending', 'cross_province_grant') RETURNING id
)
INSERT INTO grant_out
    (transfer_id, request_hash, relation_id, giver_person_id, to_node, receiver_account_ref,
     amount_fen, state, local_day, decide_by, hold_ref, hold_id, prepare, prepare_hash,
     window_id, created_at)
SELECT $1, $2, $3, $4, $5, $6, $7, 'PREPARED_A', $8, $9, $10, hold.id, $11, $12, $13, $14
FROM hold
"""


async def load_expiring(a: Node, count: int) -> None:
    """`count` PREPARED_A grants with a deadline a day away (`mass_expiry` moves it).

    Written straight into A's tables with real holds (the deferred checks run), each to its
    own made-up receiver at B, so B answers the ABORT fan-out with tombstones.
    """
    from protocol.clock import window_id
    from protocol.messages import (
        GiverRef,
        Prepare,
        ReceiverRef,
        RelationRef,
        RelationType,
        UserAuth,
        encode_body,
        hash_body,
    )
    from wallet.plt.quota import clearing_account, clearing_slot

    now = dt.datetime.now(dt.UTC)
    created = now - dt.timedelta(hours=20)
    decide_by = now + NOT_YET_DUE  # `mass_expiry` makes them all due at once
    conn = await asyncpg.connect(a.dsn)
    try:
        givers = await conn.fetch(
            "SELECT p.id, p.personal_account_id FROM insured_person p "
            "WHERE p.personal_account_id IS NOT NULL ORDER BY p.id"
        )
        due_to: dict[int, int] = {}  # clearing sub-account by slot
        for start in range(0, count, 1000):
            rows = []
            for i in range(start, min(count, start + 1000)):
                giver = givers[i % len(givers)]
                tid = uuid7()
                prepare = Prepare(
                    transfer_id=tid,
                    giver=GiverRef(node=A, account_ref=f"p-{giver['id']}", masked_name="张*"),
                    receiver=ReceiverRef(account_id=f"w-x{i}"),
                    relation=RelationRef(
                        relation_id=uuid7(), type=RelationType.CHILD, verified_by_A=True
                    ),
                    amount_fen=100,
                    currency="CNY",
                    fee_fen=0,
                    accept_within_ms=int((decide_by - created).total_seconds() * 1000),
                    window_id=window_id(int(created.timestamp() * 1000)),
                    user_auth=UserAuth(method="pin", verified_at_ms=0, ref="bench"),
                    a_hold_id=uuid7(),
                )
                slot = clearing_slot(tid)
                if slot not in due_to:
                    due_to[slot] = await clearing_account(conn, "due_to", B, tid)
                rows.append(
                    (
                        tid,
                        "0" * 64,
                        prepare.relation.relation_id,
                        giver["id"],
                        B,
                        f"w-x{i}",
                        100,
                        created.date(),
                        decide_by,
                        prepare.a_hold_id,
                        encode_body(prepare),
                        hash_body(prepare),
                        prepare.window_id,
                        created,
                        giver["personal_account_id"],
                        due_to[slot],
                    )
                )
            async with conn.transaction():
                await conn.executemany(_EXPIRING_GRANT, rows)
    finally:
        await conn.close()


# The sweeper's own pace: from its first abort to its last (without its idle pause).
_SWEEP_SPAN = """
SELECT extract(epoch FROM max(decided_at) - min(decided_at)) FROM grant_out
WHERE state = 'ABORTED' AND decided_at IS NOT NULL
"""


async def mass_expiry(a: Node, count: int) -> tuple[float, float, float]:
    """Seconds from the grants' common deadline until the sweeper aborted every row, and
    until every ABORT was ACKed; and the seconds from the sweeper's first abort to its last."""
    await load_expiring(a, count)
    pool = await asyncpg.create_pool(a.dsn, min_size=1, max_size=2)
    try:
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=DEADLINE_AHEAD_S)
        await pool.execute(_DUE_AT, deadline)
        await asyncio.sleep((deadline - dt.datetime.now(dt.UTC)).total_seconds())
        started = time.perf_counter()
        # Polled every 0.2 s: a scan of 100,000 rows every 20 ms would compete with the nodes.
        await wait_for(pool, _NONE_PREPARED, timeout_s=3600, poll_s=EXPIRY_POLL_S)
        swept = time.perf_counter() - started
        await wait_for(pool, _ALL_ACKED, timeout_s=3600, poll_s=EXPIRY_POLL_S)
        acked = time.perf_counter() - started
        span = float(await pool.fetchval(_SWEEP_SPAN))
    finally:
        await pool.close()
    return swept, acked, span


# --- main --------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    data = (ROOT / args.data_dir).resolve()
    if data.exists():
        shutil.rmtree(data)
    settings = STATEMENTS_SETTINGS if args.statements else {}
    nodes = {
        n: Node(n, free_port(), EmbeddedPostgres(data / n / "postgres", settings=settings))
        for n in (A, B)
    }
    try:
        for node in nodes.values():
            node.server.start()
            await create_migrated_database(node.server, args.node_root)
        peppers = write_keys(data, nodes)
        for node in nodes.values():
            start_node(data, node, args)
        for node in nodes.values():
            await wait_up(node)
        a, b = nodes[A], nodes[B]
        t = time.perf_counter()
        pairs = await load_pairs(a, b, args.pairs, args.scrypt_n, peppers)
        load_s = time.perf_counter() - t
        if args.warmup:
            await run_cycles(a, b, pairs, args.concurrency, args.warmup, args.auth)
        if args.statements:
            for node in nodes.values():
                await statements_reset(node.dsn)
        cpu = CpuMeter(nodes)
        done, elapsed = await run_cycles(a, b, pairs, args.concurrency, args.cycles, args.auth)
        cpu_ms = cpu.per(len(done))
        if args.statements:
            for node in nodes.values():
                await print_statements(
                    node.dsn, len(done), "cycle", args.statements, label=f"{node.node_id}: "
                )
        for node in nodes.values():
            assert node.process is not None
            node.peak_rss_kb = peak_rss_kb(node.process.pid)
        measured = await phases(a, b, done, args.auth)
        books = []
        for node in nodes.values():
            conn = await asyncpg.connect(node.dsn)
            try:
                books.append((node.node_id, (await ledger.check_books(conn)).balanced))
            finally:
                await conn.close()
        tps = 0.0
        if args.pgbench_seconds:
            tps = await asyncio.to_thread(
                pgbench, a.server, args.concurrency, args.pgbench_seconds, args.pgbench_scale
            )
        print_report(args, pairs, load_s, done, elapsed, measured, nodes, books, tps, cpu_ms)
        if args.expire:
            swept, acked, span = await mass_expiry(a, args.expire)
            print(
                f"06:00 expiry of {args.expire} grants: all aborted {swept:.1f} s after their "
                f"deadline (sweeper batches of 1,000, its wake-up after the deadline included; first to "
                f"last abort {span:.1f} s = {args.expire / span:.0f}/s), every ABORT "
                f"acknowledged by {B} in {acked:.1f} s"
            )
    finally:
        for node in nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                try:
                    node.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
            node.server.stop()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)


def print_report(
    args: argparse.Namespace,
    pairs: list[Pair],
    load_s: float,
    done: list[Cycle],
    elapsed: float,
    measured: dict[str, list[float]],
    nodes: dict[str, Node],
    books: list[tuple[str, bool]],
    tps: float,
    cpu_ms: dict[str, float],
) -> None:
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; node {args.node_root}")
    print("durability: fsync=on, synchronous_commit=on on both servers (checked)")
    print(
        f"setup: {len(pairs)} pairs loaded in {load_s:.1f} s; concurrency {args.concurrency}; "
        + (
            "auth device (2 ES256 device signatures per cycle, each checked at both nodes)"
            if args.auth == "device"
            else f"auth password, scrypt_n {args.scrypt_n} (2 password checks per cycle)"
        )
    )
    print(f"cycles: {len(done)} in {elapsed:.1f} s = {len(done) / elapsed:.1f} cycles/s")
    print(f"{'phase (ms)':46} {'p50':>8} {'p95':>8} {'p99':>8}")
    for name, values in measured.items():
        print(
            f"{name:46} {pct(values, 0.5):8.1f} {pct(values, 0.95):8.1f} {pct(values, 0.99):8.1f}"
        )
    for node in nodes.values():
        print(f"peak RSS {node.node_id}: {node.peak_rss_kb / 1024:.0f} MiB")
    print(
        "CPU per cycle: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu_ms.items())
        + f" (all {sum(cpu_ms.values()):.1f} ms)"
    )
    print("books balanced: " + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in books))
    if tps:
        print(
            f"pgbench -N on {A}'s server, {args.concurrency} clients, {args.pgbench_seconds} s, "
            f"scale {args.pgbench_scale}: {tps:.0f} tps; ratio {len(done) / elapsed / tps:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="giver/receiver pairs (64)")
    parser.add_argument("--concurrency", type=int, default=16, help="cycles in flight (16)")
    parser.add_argument("--cycles", type=int, default=400, help="measured cycles (400)")
    parser.add_argument("--warmup", type=int, default=32, help="unmeasured cycles first (32)")
    parser.add_argument(
        "--scrypt-n", type=int, default=2**14, help="payment-password scrypt cost (16384)"
    )
    parser.add_argument(
        "--auth",
        choices=("device", "password"),
        default="device",
        help="how giver and receiver authorise: device signatures (default) or payment password",
    )
    parser.add_argument("--pool-max", type=int, default=20, help="DB pool per node (20)")
    parser.add_argument("--pgbench-seconds", type=int, default=15, help="0: skip")
    parser.add_argument("--pgbench-scale", type=int, default=10)
    parser.add_argument(
        "--expire", type=int, default=0, help="then expire this many grants at once (0: skip)"
    )
    parser.add_argument(
        "--statements",
        type=int,
        default=0,
        metavar="TOP",
        help="load pg_stat_statements and print each database's statements per cycle and "
        "its TOP costliest (0: off; it costs some server CPU)",
    )
    add_node_root_arguments(parser)
    parser.add_argument("--data-dir", default="data/bench")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    resolve_node_root(args, ROOT)
    if args.concurrency > args.pairs:
        parser.error("--concurrency cannot exceed --pairs (one grant in flight per pair)")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
