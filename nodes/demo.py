"""A scripted walk through two province nodes, over real HTTP, on embedded PostgreSQL.

Two provinces run in this process on loopback ports, Hebei (130000) and Shanghai (310000),
each with its own database, keys and peer directory, with their workers on: the outbox
sender delivers signed PLT/1 messages between them by itself. The walk plays the people:

 1. each province's operator imports its roster; Hebei posts the father's monthly credit,
    Shanghai registers a pharmacy;
 2. the father (Hebei, employee scheme) and his daughter (Shanghai, resident scheme) open
    wallets and register their phones' device keys (payment password + SMS code, once);
 3. he files the relationship with her province; she confirms it from her own wallet;
 4. he grants her a ¥300 quota, signed on his phone; her phone shows the offer on its live
    event stream; she accepts, signed on hers; each node checks the other's signature;
    Hebei commits (two-phase, signed);
 5. she pays ¥88.50 at the Shanghai pharmacy with her own payment code, from the quota;
 6. he ends the relationship; Shanghai closes the quota and releases the unused ¥211.50,
    which Hebei returns to his personal account;
 7. both provinces' books are checked.

Every action after the wallets are opened is signed on the person's phone (a P-256 key the
demo holds the way a phone's secure hardware would), not confirmed with the payment password.

The demo's clock is real time shifted to 10:00 Shanghai time on the day it runs, so the
walk never falls into the 22:00-06:00 grant blackout (RULES 13).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import shutil
import zoneinfo
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from nodes.logging import configure_logging
from nodes.network import LocalNetwork, LocalNode, Province
from nodes.settings import Settings
from protocol import device_auth
from protocol.ids import uuid7
from wallet.idnumber import check_character
from wallet.otp import RecordingOtpSender

HEBEI, SHANGHAI = "prov-13", "prov-31"
SHANGHAI_TIME = zoneinfo.ZoneInfo("Asia/Shanghai")
PASSWORD_FATHER = "246813"
PASSWORD_DAUGHTER = "975312"
GRANT_FEN = 30_000
PAYMENT_FEN = 8_850
CREDIT_FEN = 50_000
WAIT_S = 20.0


def _id_number(region: str, birth: str, seq: str) -> str:
    first17 = region + birth + seq
    return first17 + check_character(first17)


FATHER = {
    "id_number": _id_number("130102", "19700315", "051"),
    "name": "张伟",
    "scheme": "employee",
    "status": "normal",
    "pooling_region": "130100",
    "phone": "13800000001",
}
DAUGHTER = {
    # Born in Hebei, insured in Shanghai: nodes route by where she is insured (RULES 22).
    "id_number": _id_number("130102", "20020611", "062"),
    "name": "张丽",
    "scheme": "resident",
    "status": "normal",
    "pooling_region": "310100",
    "phone": "13900000002",
}


class DemoClock:
    """Real time, moved to 10:00 Shanghai time of the current day (outside the blackout)."""

    def __init__(self, timezone: str = "Asia/Shanghai") -> None:
        tz = zoneinfo.ZoneInfo(timezone)
        real = dt.datetime.now(dt.UTC)
        ten = real.astimezone(tz).replace(hour=10, minute=0, second=0, microsecond=0)
        self._offset = ten.astimezone(dt.UTC) - real

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self._offset


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


class Person:
    """Somebody using their app against their own province's node."""

    def __init__(self, node: LocalNode, row: dict[str, str], password: str) -> None:
        self.node = node
        self.row = row
        self.password = password
        self.headers: dict[str, str] = {}
        # The phone's key: made in its secure hardware, never leaves it.
        self.key = device_auth.new_device_key()
        self.device: dict[str, str] = {}

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return await _call(self.node, method, path, headers=self.headers, **kwargs)

    async def open_wallet(self) -> None:
        challenge = await self.call(
            "POST",
            "/app/v1/otp",
            json={
                "id_number": self.row["id_number"],
                "name": self.row["name"],
                "purpose": "open_wallet",
            },
        )
        otp = self.node.otp
        assert isinstance(otp, RecordingOtpSender)
        opened = await self.call(
            "POST",
            "/app/v1/wallets",
            json={
                "otp_id": challenge["otp_id"],
                "otp_code": otp.last[self.row["phone"]],
                "payment_password": self.password,
            },
        )
        self.headers = {"Authorization": f"Bearer {opened['token']}"}

    async def register_phone(self) -> None:
        """Register the phone's public key: payment password and a fresh SMS code."""
        challenge = await self.call("POST", "/app/v1/devices/otp")
        otp = self.node.otp
        assert isinstance(otp, RecordingOtpSender)
        point = device_auth.sec1(self.key.public_key())
        self.device = await self.call(
            "POST",
            "/app/v1/devices",
            json={
                "otp_id": challenge["otp_id"],
                "otp_code": otp.last[self.row["phone"]],
                "payment_password": self.password,
                "public_key": device_auth.b64url(point),
                "label": "demo phone",
            },
        )

    def sign(
        self, action: device_auth.Action, ids: dict[str, str], amount_fen: int | None = None
    ) -> dict[str, str]:
        """What the app sends after the PIN or face check unlocked the key on the phone."""
        person = self.device["receiver" if action.startswith("grant.acc") else "person"]
        what = device_auth.instruction(
            action,
            node=self.device["node"],
            person=person,
            ids=ids,
            amount_fen=amount_fen,
            created_at_ms=int(self.node.ctx.clock.now().timestamp() * 1000),
        )
        signed, sig = device_auth.sign(self.key, what)
        return {
            "kid": self.device["kid"],
            "signed": device_auth.b64url(signed),
            "sig": device_auth.b64url(sig),
        }

    async def available_fen(self) -> int:
        wallet = await self.call("GET", "/app/v1/wallet")
        account = wallet["personal_account"]
        return int(account["available_fen"]) if account else 0


async def _call(node: LocalNode, method: str, path: str, **kwargs: Any) -> Any:
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        response = await http.request(method, path, **kwargs)
    if response.status_code >= 400:
        raise RuntimeError(
            f"{method} {node.node_id}{path} -> {response.status_code}: {response.text}"
        )
    return response.json() if response.content else None


async def _first_event(person: Person, kind: str, ready: asyncio.Event) -> dict[str, Any]:
    """Follow the person's live event stream (as their phone does) until an event of `kind`;
    `ready` is set once the stream is open, so nothing after that is missed."""
    headers = person.headers
    async with (
        httpx.AsyncClient(base_url=person.node.url, timeout=httpx.Timeout(30, read=None)) as http,
        http.stream("GET", "/app/v1/events", headers=headers) as response,
    ):
        event, data = "", ""
        async for line in response.aiter_lines():
            ready.set()
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                data = line.partition(":")[2].strip()
            elif line == "" and event == kind:
                found: dict[str, Any] = json.loads(data)
                return found
    raise RuntimeError(f"the event stream ended before a {kind} event")


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait for the workers to deliver (they poll every 0.1 s)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def walk(net: LocalNetwork, console: Console) -> bool:
    hebei, shanghai = net[HEBEI], net[SHANGHAI]
    operator = {"Authorization": f"Bearer {net.operator_token}"}

    def step(text: str) -> None:
        console.rule(f"[bold]{text}")

    step("1. Operators: rosters, a monthly credit in Hebei, a pharmacy in Shanghai")
    await _call(hebei, "POST", "/operator/v1/roster", json={"persons": [FATHER]}, headers=operator)
    await _call(
        shanghai, "POST", "/operator/v1/roster", json={"persons": [DAUGHTER]}, headers=operator
    )
    await _call(
        hebei,
        "POST",
        "/operator/v1/credit-batches",
        headers=operator,
        json={
            "batch_id": "demo-2026-03",
            "month": "2026-03",
            "credits": [{"id_number": FATHER["id_number"], "amount_fen": CREDIT_FEN}],
        },
    )
    pharmacy = await _call(
        shanghai,
        "POST",
        "/operator/v1/institutions",
        headers=operator,
        json={
            "code": "SH-PH-0001",
            "name": "仁心大药房",
            "kind": "pharmacy",
            "categories": ["pharmacy_drug", "medical_device"],
        },
    )
    pharmacy_headers = {"Authorization": f"Bearer {pharmacy['api_key']}"}
    console.print(
        f"Hebei credited the father {_yuan(CREDIT_FEN)}; Shanghai registered "
        f"pharmacy {pharmacy['code']} (API key shown once)"
    )

    step("2. The father (Hebei) and his daughter (Shanghai) open wallets")
    father = Person(hebei, FATHER, PASSWORD_FATHER)
    daughter = Person(shanghai, DAUGHTER, PASSWORD_DAUGHTER)
    await father.open_wallet()
    await daughter.open_wallet()
    await father.register_phone()
    await daughter.register_phone()
    console.print("roster match, SMS code and payment password, each at their own node")
    console.print(
        f"phones registered: his {father.device['kid']}, hers {daughter.device['kid']} "
        "(ECDSA P-256; from now on the phone signs, no payment password is sent)"
    )

    step("3. He files the relationship with her province; she confirms it in Shanghai")
    filed = await father.call(
        "POST",
        "/app/v1/cross-relationships",
        json={
            "receiver_province": "310000",
            "receiver_id_number": DAUGHTER["id_number"],
            "receiver_name": DAUGHTER["name"],
            "relation_type": "child",
            "evidence_ref": "HUKOU-1301-778899",
            "device": father.sign(
                "relation.file",
                {
                    "receiver_id_number": DAUGHTER["id_number"],
                    "receiver_province": "310000",
                    "relation_type": "child",
                },
            ),
        },
    )
    relation_id = filed["relation_id"]

    async def offered() -> bool:
        mine = await daughter.call("GET", "/app/v1/cross-relationships?role=receiver")
        return any(r["relation_id"] == relation_id for r in mine)

    await _until("the signed relationship request to reach Shanghai", offered)
    await daughter.call(
        "POST",
        f"/app/v1/cross-relationships/{relation_id}/confirm",
        json={"device": daughter.sign("relation.confirm", {"relation_id": relation_id})},
    )

    async def relation_active() -> bool:
        view = await father.call("GET", f"/app/v1/cross-relationships/{relation_id}")
        return bool(view["state"] == "active")

    await _until("the signed confirmation to reach Hebei", relation_active)
    console.print(f"relationship {relation_id[:8]}… is active on both nodes")

    step(f"4. He grants her a {_yuan(GRANT_FEN)} quota on his phone; she accepts on hers")
    phone_ready = asyncio.Event()
    her_phone = asyncio.create_task(_first_event(daughter, "grant.offered", phone_ready))
    await asyncio.wait_for(phone_ready.wait(), timeout=WAIT_S)
    transfer_id = uuid7()
    instructed = await father.call(
        "POST",
        "/app/v1/grants",
        json={
            "transfer_id": transfer_id,
            "relation_id": relation_id,
            "amount_fen": GRANT_FEN,
            "device": father.sign(
                "grant.instruct",
                {"relation_id": relation_id, "transfer_id": transfer_id},
                GRANT_FEN,
            ),
        },
    )
    console.print(
        f"grant {transfer_id[:8]}…: {instructed['state']} (amount held in Hebei; the PREPARE "
        "carries his signed instruction, which Shanghai checked before holding anything)"
    )

    offer = await asyncio.wait_for(her_phone, timeout=WAIT_S)
    accept_by = dt.datetime.fromisoformat(offer["deadline"]).astimezone(SHANGHAI_TIME)
    console.print(
        f"her phone (live event stream): {offer['kind']} — {_yuan(offer['amount_fen'])} from "
        f"{offer['counterpart_name_masked']} ({offer['counterpart_province']}), accept by "
        f"{accept_by:%Y-%m-%d %H:%M} Shanghai time"
    )
    await daughter.call(
        "POST",
        f"/app/v1/grants/incoming/{transfer_id}/accept",
        json={"device": daughter.sign("grant.accept", {"transfer_id": transfer_id}, GRANT_FEN)},
    )

    async def committed() -> bool:
        view = await father.call("GET", f"/app/v1/grants/{transfer_id}")
        quotas = await daughter.call("GET", "/app/v1/quotas")
        return bool(view["state"] == "COMMITTED") and quotas["available_fen"] == GRANT_FEN

    await _until("the signed COMMIT to reach Shanghai", committed)
    console.print(
        f"father's personal account: {_yuan(await father.available_fen())} "
        f"({_yuan(GRANT_FEN)} frozen for her); her quota: {_yuan(GRANT_FEN)}"
    )

    step(f"5. She pays {_yuan(PAYMENT_FEN)} at the Shanghai pharmacy with her own code")
    code = await daughter.call(
        "POST", "/app/v1/payment-codes", json={"device": daughter.sign("payment_code.issue", {})}
    )
    settled = await _call(
        shanghai,
        "POST",
        "/institution/v1/settlements",
        headers=pharmacy_headers,
        json={
            "payment_code": code["code"],
            "amount_fen": PAYMENT_FEN,
            "category": "pharmacy_drug",
            "reference": "RX-SH-0001",
        },
    )
    table = Table("source", "amount")
    for source in settled["sources"]:
        table.add_row(source["source"], _yuan(source["amount_fen"]))
    console.print(table)

    step("6. He ends the relationship; the unused quota goes back to him")
    await father.call(
        "POST",
        f"/app/v1/cross-relationships/{relation_id}/end",
        json={"device": father.sign("relation.end", {"relation_id": relation_id})},
    )
    expected_father = CREDIT_FEN - PAYMENT_FEN

    async def released() -> bool:
        return await father.available_fen() == expected_father

    await _until("the signed release to reach Hebei", released)
    console.print(
        f"father's personal account: {_yuan(expected_father)} "
        f"(= {_yuan(CREDIT_FEN)} - {_yuan(PAYMENT_FEN)} spent by her)"
    )

    step("7. The books of both provinces")
    ok = True
    for node in (hebei, shanghai):
        books = await _call(node, "GET", "/operator/v1/ledger/check", headers=operator)
        ok = ok and bool(books["balanced"])
        console.print(f"{node.node_id}: {'balanced' if books['balanced'] else books}")
    console.print(
        "[green]balanced, every fen accounted for[/green]"
        if ok
        else "[red]the books do not balance[/red]"
    )
    return ok


async def run_demo(base: Settings, console: Console) -> int:
    data_dir = Path(base.data_dir) / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)  # demo data is always fresh
    clock = DemoClock()
    # The walk narrates; the nodes' own logs would drown it, so only warnings show.
    configure_logging("WARNING", "console")
    for name in ("uvicorn", "uvicorn.error", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    console.print("starting Hebei (130000) and Shanghai (310000) on embedded PostgreSQL ...")
    network = LocalNetwork(
        provinces=(Province("130000", HEBEI), Province("310000", SHANGHAI)),
        data_dir=data_dir,
        clock=clock,
        workers=True,
    )
    async with network as net:
        for node in net.nodes.values():
            console.print(f"{node.node_id} listening on {node.url}  (OpenAPI: {node.url}/schema)")
        return 0 if await walk(net, console) else 1
