"""Benchmark: settlements at designated institutions against one real province node.

    python bench/settlements.py --institutions 200 --patients 10000 --concurrency 16

What runs (all on this machine, nothing mocked):

* a PostgreSQL server from the embedded wheel, fsync=on, synchronous_commit=on (checked);
* one node process (`python -m nodes serve`, Hebei prov-13, no PLT/1 keys: in-province
  only), which creates and migrates its own database, so the node under test decides its
  schema (`--node-root` runs another checkout's node, e.g. the base commit, for an A/B);
* a driver (this process) that loads the province straight into the database with COPY:
  `--persons` insured persons (each with a personal account; 10,000 or 1,000,000),
  `--patients` of them with open wallets and money, `--institutions` designated
  institutions with API keys, and one payment code per settlement to come. **Payment codes
  are inserted directly** (digest, person, 1 day of validity), not issued through
  `POST /app/v1/payment-codes`: issuing is a separate request, not part of a settlement;
* the measured part only uses HTTP: `POST /institution/v1/settlements` at a fixed
  concurrency over keep-alive connections (a small raw HTTP/1.1 client, so the driver's own
  CPU stays small beside the node's), optionally paced to `--rate` settlements/s;
* `pgbench -N` on the same server afterwards, in the same run, as the physical reference.

Money modes (`--money`): `own` (each patient is an employee paying from their own personal
account) or `givers` (each patient is a resident without an account, paid for by
`--givers-per-patient` in-province relatives with active relationships, RULES 19).
Cross-province quotas are not loaded (a quota needs the whole grant_in history behind it).
`--hot` sends every settlement to one institution instead of spreading them.

Node CPU per settlement comes from /proc (utime + stime of the node process and its
children, i.e. every worker process), over the measured part. Round trips and statements
per settlement are counted afterwards on a few sequential settlements with
`log_statement = all` (each logged `statement:`/`execute` line is one round trip; a simple
query with several `;`-separated statements counts once as a round trip and once per
statement; BEGIN/COMMIT count). The background work settlements cause (the push worker's
statements, the event streams' wake-ups sent after commits) is counted apart.
`--statements TOP` loads pg_stat_statements into the server and prints what the database
executed per settlement over the measured part, and the TOP statements by server time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support import (  # noqa: E402
    DB,
    OPERATOR_TOKEN,
    STATEMENTS_SETTINGS,
    add_node_root_arguments,
    cpu_s,
    create_database,
    free_port,
    pct,
    peak_rss_kb,
    pgbench,
    postmaster_pid,
    print_statements,
    resolve_node_root,
    statements_reset,
    tree,
)

from nodes.embedded_pg import EmbeddedPostgres  # noqa: E402
from wallet.idnumber import check_character  # noqa: E402

NODE_ID, PROVINCE = "prov-13", "130000"
BALANCE_FEN = 10**9  # never the bottleneck
AMOUNT_FEN = 100
CATEGORY = "outpatient"


@dataclass
class Job:
    api_key: str
    code: str
    reference: str


@dataclass
class Node:
    port: int
    server: EmbeddedPostgres
    root: Path
    python: str
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def dsn(self) -> str:
        return self.server.dsn(DB)


# --- setup -----------------------------------------------------------------------------------


def id_number(seq: int) -> str:
    """A well-formed, distinct GB 11643 number for every seq below 10,000,000."""
    first17 = f"13{(seq // 1000) % 10000:04d}19800101{seq % 1000:03d}"
    return first17 + check_character(first17)


def start_node(data: Path, node: Node, args: argparse.Namespace) -> None:
    env = {
        **os.environ,
        "PLT_NODE_ID": NODE_ID,
        "PLT_PROVINCE_CODE": PROVINCE,
        "DATABASE_URL": node.dsn,
        "PLT_PORT": str(node.port),
        "PLT_DATA_DIR": str(data),
        "PLT_KEYS_DIR": str(data / "no-keys"),
        "PLT_DIRECTORY_DIR": str(data / "no-directory"),
        "PLT_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "PLT_WORKERS_ENABLED": "true",
        "PLT_LOG_LEVEL": "WARNING",
        "PLT_DB_POOL_MIN": "2",
        "PLT_DB_POOL_MAX": str(args.pool_max),
        "PLT_OTP_SENDER": "none",
    }
    env.pop("PLT_CONFIG", None)
    if args.node_workers > 1:  # only set when asked: older nodes refuse unknown settings
        env["PLT_WORKERS"] = str(args.node_workers)
    node.log = data / "node.log"
    with node.log.open("wb") as log:
        node.process = subprocess.Popen(
            [node.python, "-m", "nodes", "serve"], cwd=node.root, env=env, stdout=log, stderr=log
        )


async def wait_up(node: Node, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client = await RawClient.open(node.port)
            try:
                status, _ = await client.request(b"GET", "/health", b"", "")
            finally:
                client.close()
            if status < 500:
                return
        except OSError:
            pass
        assert node.process is not None and node.process.poll() is None, node.log.read_text()[
            -3000:
        ]
        await asyncio.sleep(0.3)
    raise TimeoutError("the node did not come up")


async def wait_migrated(dsn: str, timeout_s: float = 120.0) -> None:
    """The node migrates its database at start; loading waits for the tables."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = await asyncpg.connect(dsn)
        try:
            if await conn.fetchval("SELECT to_regclass('payment_code') IS NOT NULL"):
                return
        finally:
            await conn.close()
        await asyncio.sleep(0.3)
    raise TimeoutError("the node did not migrate its database")


_LOAD_PEOPLE = """
INSERT INTO account (kind, code, debits_must_not_exceed_credits)
SELECT 'personal', 'personal:' || id_number, true FROM bench_person WHERE employee;
INSERT INTO insured_person (id_number, name, scheme, status, pooling_region, phone,
                            personal_account_id)
SELECT b.id_number, '人' || b.seq, CASE WHEN b.employee THEN 'employee' ELSE 'resident' END,
       'normal', substr(b.id_number, 1, 6), '139' || lpad(b.seq::text, 8, '0'), a.id
FROM bench_person b LEFT JOIN account a ON a.code = 'personal:' || b.id_number
ORDER BY b.seq;
"""
_WALLETS = """
INSERT INTO wallet (person_id, state, password_hash, opened_via, opened_at)
SELECT p.id, 'open', 'bench-no-password', 'app', now()
FROM insured_person p JOIN bench_person b ON b.id_number = p.id_number
WHERE b.seq < $1
"""
_FUND = """
INSERT INTO ledger_transfer (debit_account_id, credit_account_id, amount_fen, phase, purpose)
SELECT (SELECT id FROM account WHERE kind = 'funding'), p.personal_account_id, $2, 'single',
       'monthly_credit'
FROM insured_person p JOIN bench_person b ON b.id_number = p.id_number
WHERE b.seq < $1 AND p.personal_account_id IS NOT NULL
ORDER BY p.personal_account_id
"""
_RELATIONSHIPS = """
INSERT INTO relationship (giver_person_id, receiver_person_id, relation_type, evidence_ref, state,
                          filed_at, confirmed_at)
SELECT g.id, r.id, 'child', 'bench', 'active', now(), now()
FROM bench_person rb JOIN insured_person r ON r.id_number = rb.id_number
JOIN generate_series(1, $2) k ON true
JOIN bench_person gb ON gb.seq = $1 + (rb.seq * $2) + k - 1
JOIN insured_person g ON g.id_number = gb.id_number
WHERE rb.seq < $1
"""
_PATIENT_IDS = """
SELECT p.id FROM insured_person p JOIN bench_person b ON b.id_number = p.id_number
WHERE b.seq < $1 ORDER BY b.seq
"""


async def load(args: argparse.Namespace, dsn: str) -> tuple[list[str], list[int]]:
    """The province: persons, wallets, money, relationships, institutions. Returns the
    institutions' API keys and the patients' person ids."""
    patients, per = args.patients, args.givers_per_patient
    givers = patients * per if args.money == "givers" else 0
    persons = max(args.persons, patients + givers)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE UNLOGGED TABLE bench_person (seq int PRIMARY KEY, id_number text UNIQUE, "
            "employee bool NOT NULL)"
        )
        # Seqs [0, patients) are the patients, then their givers, then everybody else.
        resident_patients = args.money == "givers"
        await conn.copy_records_to_table(
            "bench_person",
            records=(
                (seq, id_number(seq), not (resident_patients and seq < patients))
                for seq in range(persons)
            ),
            columns=["seq", "id_number", "employee"],
        )
        async with conn.transaction():
            await conn.execute(_LOAD_PEOPLE)
            await conn.execute(_WALLETS, patients + givers)
            await conn.execute(_FUND, patients + givers, BALANCE_FEN)
            if givers:
                await conn.execute(_RELATIONSHIPS, patients, per)
        keys: list[str] = []
        async with conn.transaction():
            for i in range(args.institutions):
                code = f"H{i:05d}"
                account = await conn.fetchval(
                    "INSERT INTO account (kind, code, debits_must_not_exceed_credits) "
                    "VALUES ('institution', $1, true) RETURNING id",
                    f"institution:{code}",
                )
                key = "inst_" + secrets.token_urlsafe(32)
                await conn.execute(
                    "INSERT INTO institution (code, name, kind, categories, api_key_hash, "
                    "account_id) VALUES ($1, $2, 'hospital', $3::text[], $4, $5)",
                    code,
                    f"医院{i}",
                    [CATEGORY],
                    hashlib.sha256(key.encode()).digest(),
                    account,
                )
                keys.append(key)
        patient_ids = [r["id"] for r in await conn.fetch(_PATIENT_IDS, patients)]
        await conn.execute("DROP TABLE bench_person")
        if args.analyze:
            await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return keys, patient_ids


async def issue_codes(
    dsn: str, keys: list[str], patient_ids: list[int], count: int, hot: bool, tag: str
) -> list[Job]:
    """One payment code per settlement, inserted directly (see the module docstring)."""
    rng = random.Random(f"{tag}-{count}")
    now = dt.datetime.now(dt.UTC)
    jobs: list[Job] = []
    rows = []
    for i in range(count):
        code = f"{secrets.randbelow(10**18):018d}"
        person = rng.choice(patient_ids)
        key = keys[0] if hot else keys[i % len(keys)]
        jobs.append(Job(key, code, f"{tag}-{i}"))
        rows.append(
            (hashlib.sha256(code.encode()).digest(), person, now, now + dt.timedelta(days=1))
        )
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "payment_code",
            records=rows,
            columns=["code_hash", "person_id", "created_at", "expires_at"],
        )
    finally:
        await conn.close()
    return jobs


# --- the driver --------------------------------------------------------------------------------


class RawClient:
    """One keep-alive HTTP/1.1 connection; just enough for JSON requests to our node."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(
        self, method: bytes, path: str, body: bytes, bearer: str
    ) -> tuple[int, bytes]:
        head = (
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: node\r\n"
            b"Content-Type: application/json\r\n"
            + (b"Authorization: Bearer " + bearer.encode() + b"\r\n" if bearer else b"")
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", raw)
        length = int(match[1]) if match else 0
        return status, await self.reader.readexactly(length) if length else b""

    def close(self) -> None:
        self.writer.close()


class Pacer:
    """Open-loop arrivals at `rate`/s (0: as fast as the workers go)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next = time.perf_counter()

    async def wait(self) -> None:
        if not self.rate:
            return
        self.next += 1 / self.rate
        delay = self.next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def drive(
    port: int, jobs: list[Job], concurrency: int, rate: float
) -> tuple[list[float], float, dict[int, int]]:
    """Run every job; return latencies (s), elapsed (s) and the count per HTTP status."""
    clients = [await RawClient.open(port) for _ in range(concurrency)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    todo = iter(jobs)
    pacer = Pacer(rate)

    async def worker(client: RawClient) -> None:
        for job in todo:
            body = msgspec.json.encode(
                {
                    "payment_code": job.code,
                    "amount_fen": AMOUNT_FEN,
                    "category": CATEGORY,
                    "reference": job.reference,
                }
            )
            await pacer.wait()
            t0 = time.perf_counter()
            status, text = await client.request(
                b"POST", "/institution/v1/settlements", body, job.api_key
            )
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 201 and statuses[status] <= 3:
                print(f"  unexpected {status}: {text[:300]!r}", file=sys.stderr)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for c in clients:
            c.close()
    return latencies, time.perf_counter() - started, statuses


# --- round trips -------------------------------------------------------------------------------

_LOGGED = re.compile(r"\[(\d+)\] LOG:  (statement|execute [^:]*): (.*)")
# Statements of the node's background work caused by settlements, not made in their requests:
# the push worker's (claim, sent, failed) and the event streams' wake-ups sent after commits.
_BACKGROUND = re.compile(r"FROM notification|UPDATE notification|pg_notify\(\$1", re.IGNORECASE)


@dataclass
class RoundTrips:
    """Per settlement: round trips and statements of its request, and the round trips of
    the background work it causes (`_BACKGROUND`, with their BEGIN and COMMIT)."""

    trips: float
    statements: float
    background: float


def _classify(text: str) -> list[tuple[bool, int]]:
    """(background?, statements) of each round trip logged in `text`, in log order. A BEGIN
    or COMMIT belongs with the statement after or before it on the same backend."""
    entries: list[tuple[str, str, int]] = []  # (pid, text, statements)
    for entry in re.split(r"\n(?=\d{4}-\d\d-\d\d )", text):
        match = _LOGGED.search(entry)
        if match is None:
            continue
        body = entry[match.start(3) :]
        count = 1
        if match[2] == "statement":  # simple protocol: possibly several statements
            count = max(1, len([s for s in body.split(";") if s.strip()]))
        entries.append((match[1], body.strip().rstrip(";").upper(), count))
    background = [bool(_BACKGROUND.search(body)) for _, body, _ in entries]
    last_of: dict[str, int] = {}
    for i, (pid, body, _) in enumerate(entries):
        before = last_of.get(pid)
        if body == "COMMIT" and before is not None and background[before]:
            background[i] = True
        if before is not None and entries[before][1] == "BEGIN" and background[i]:
            background[before] = True
        last_of[pid] = i
    return [(bg, count) for bg, (_, _, count) in zip(background, entries, strict=True)]


async def count_round_trips(
    node: Node, keys: list[str], patient_ids: list[int], samples: int, hot: bool
) -> RoundTrips:
    """Round trips and statements per settlement, from `log_statement = all`."""
    jobs = await issue_codes(node.dsn, keys, patient_ids, samples, hot, "count")
    admin = await asyncpg.connect(node.server.dsn())
    log = node.server.log_file
    try:
        await admin.execute("ALTER SYSTEM SET log_statement = 'all'")
        await admin.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)
        start = log.stat().st_size
        _, _, statuses = await drive(node.port, jobs, 1, 0)
        await asyncio.sleep(1.5)  # the push worker's next pass (push.IDLE_S) included
        end = log.stat().st_size
    finally:
        await admin.execute("ALTER SYSTEM RESET log_statement")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.close()
    assert statuses == {201: samples}, statuses
    with log.open("rb") as f:
        f.seek(start)
        classified = _classify(f.read(end - start).decode(errors="replace"))
    own = [count for bg, count in classified if not bg]
    return RoundTrips(
        trips=len(own) / samples,
        statements=sum(own) / samples,
        background=sum(bg for bg, _ in classified) / samples,
    )


# --- pgbench -----------------------------------------------------------------------------------


# --- main --------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    data = (ROOT / args.data_dir).resolve()
    if data.exists():
        shutil.rmtree(data)
    node_root, python = args.node_root, args.node_python
    settings = STATEMENTS_SETTINGS if args.statements else {}
    server = EmbeddedPostgres(data / "postgres", settings=settings)
    node = Node(free_port(), server, node_root, python)
    try:
        node.server.start()
        await create_database(node.server)
        start_node(data, node, args)
        await wait_migrated(node.dsn)
        await wait_up(node)
        t = time.perf_counter()
        keys, patient_ids = await load(args, node.dsn)
        load_s = time.perf_counter() - t
        if args.warmup:
            warm = await issue_codes(node.dsn, keys, patient_ids, args.warmup, args.hot, "warm")
            await drive(node.port, warm, args.concurrency, 0)
        jobs = await issue_codes(node.dsn, keys, patient_ids, args.settlements, args.hot, "run")
        if args.statements:
            await statements_reset(node.dsn)
        assert node.process is not None
        pids = tree(node.process.pid)
        pg_pids = tree(postmaster_pid(node.server))
        cpu0, pg0 = cpu_s(pids), cpu_s(pg_pids)
        latencies, elapsed, statuses = await drive(node.port, jobs, args.concurrency, args.rate)
        node_cpu, pg_cpu = cpu_s(pids) - cpu0, cpu_s(tree(postmaster_pid(node.server))) - pg0
        rss = peak_rss_kb(pids)
        if args.statements:  # before the round-trip count and pgbench add their own
            await print_statements(node.dsn, statuses.get(201, 0), "settlement", args.statements)
        trips = (
            await count_round_trips(node, keys, patient_ids, args.count_samples, args.hot)
            if args.count_samples
            else None
        )
        conn = await asyncpg.connect(node.dsn)
        try:
            made = await conn.fetchval(
                "SELECT count(*) FROM settlement WHERE reference LIKE 'run-%'"
            )
            balanced = await books_balanced(conn)
        finally:
            await conn.close()
        tps = (
            await asyncio.to_thread(
                pgbench, node.server, args.concurrency, args.pgbench_seconds, args.pgbench_scale
            )
            if args.pgbench_seconds
            else 0.0
        )
        ok = statuses.get(201, 0)
        rate = ok / elapsed
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; node {node_root}")
        print("durability: fsync=on, synchronous_commit=on (checked)")
        print(
            f"setup: {args.persons:,} persons, {args.patients:,} patients, money {args.money}"
            + (f" ({args.givers_per_patient} givers each)" if args.money == "givers" else "")
            + f", {args.institutions} institutions{' (one hot)' if args.hot else ''}, "
            f"loaded in {load_s:.1f} s{'' if args.analyze else ', not analysed'}; concurrency "
            f"{args.concurrency}{f', paced {args.rate:g}/s' if args.rate else ''}; node "
            f"processes {len(pids)}"
        )
        print(
            f"settlements: {ok} made in {elapsed:.1f} s = {rate:.1f}/s (statuses {statuses}; "
            f"{made} in the table)"
        )
        print(
            f"latency ms: p50 {pct(latencies, 0.5) * 1000:.1f}  p95 {pct(latencies, 0.95) * 1000:.1f}"
            f"  p99 {pct(latencies, 0.99) * 1000:.1f}  max {max(latencies) * 1000:.1f}"
        )
        print(
            f"CPU per settlement: node {node_cpu / max(ok, 1) * 1000:.2f} ms, "
            f"PostgreSQL {pg_cpu / max(ok, 1) * 1000:.2f} ms"
        )
        print(
            f"peak RSS node: {max(rss) / 1024:.0f} MiB (sum over processes {sum(rss) / 1024:.0f})"
        )
        if trips:
            print(
                f"per settlement: {trips.trips:.1f} round trips, {trips.statements:.1f} "
                f"statements, and {trips.background:.1f} round trips of background work "
                f"(push, stream wake-ups) (log_statement, {args.count_samples} sequential samples)"
            )
        print(f"books balanced: {'yes' if balanced else 'NO'}")
        if tps:
            print(
                f"pgbench -N, {args.concurrency} clients, {args.pgbench_seconds} s, scale "
                f"{args.pgbench_scale}: {tps:.0f} tps; ratio {rate / tps:.3f}"
            )
    finally:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.process.kill()
        node.server.stop()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)


async def books_balanced(conn: asyncpg.Connection) -> bool:
    """The ledger's two totals agree and every account equals its transfers (as
    wallet.ledger.check_books, written out so a base-commit node's schema is enough)."""
    row = await conn.fetchrow(
        "SELECT sum(debits_posted) = sum(credits_posted) AND "
        "sum(debits_pending) = sum(credits_pending) AS ok FROM account"
    )
    return bool(row["ok"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=200)
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument(
        "--persons", type=int, default=10_000, help="insured persons loaded (>= patients)"
    )
    parser.add_argument("--money", choices=["own", "givers"], default="own")
    parser.add_argument("--givers-per-patient", type=int, default=2)
    parser.add_argument("--hot", action="store_true", help="one institution takes everything")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--settlements", type=int, default=4000, help="measured settlements")
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--rate", type=float, default=0, help="pace arrivals (per s; 0: flat out)")
    parser.add_argument("--pool-max", type=int, default=20, help="DB pool per node process")
    parser.add_argument(
        "--node-workers", type=int, default=1, help="node worker processes (PLT_WORKERS)"
    )
    add_node_root_arguments(parser)
    parser.add_argument(
        "--no-analyze", dest="analyze", action="store_false", help="skip ANALYZE after loading"
    )
    parser.add_argument("--count-samples", type=int, default=20, help="0: skip round trips")
    parser.add_argument("--pgbench-seconds", type=int, default=15, help="0: skip")
    parser.add_argument("--pgbench-scale", type=int, default=10)
    parser.add_argument(
        "--statements",
        type=int,
        default=0,
        metavar="TOP",
        help="load pg_stat_statements and print the statements per settlement and the TOP "
        "costliest (0: off; it costs some server CPU)",
    )
    parser.add_argument("--data-dir", default="data/bench-settlements")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    resolve_node_root(args, ROOT)
    if args.patients > args.persons and args.money == "own":
        args.persons = args.patients
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
