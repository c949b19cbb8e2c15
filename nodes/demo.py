"""A scripted walk through one province node, over real HTTP, on embedded PostgreSQL.

It starts a node on a free loopback port with fresh demo data (under `data/demo/`), then
plays the people involved: the operator imports the roster and posts monthly credits and
registers a pharmacy; a father and his child open wallets; the father files the
relationship and the child confirms it; the child pays at the pharmacy with the father's
shared money; the pharmacy refunds part of it; the books are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from rich.console import Console
from rich.table import Table

from nodes.app import create_app
from nodes.settings import Settings
from wallet.idnumber import check_character
from wallet.otp import RecordingOtpSender

OPERATOR_TOKEN = "demo-operator-token"
PASSWORD_FATHER = "246813"
PASSWORD_CHILD = "975312"


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
CHILD = {
    "id_number": _id_number("130102", "20020611", "062"),
    "name": "张小明",
    "scheme": "resident",
    "status": "normal",
    "pooling_region": "130100",
    "phone": "13800000002",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


@contextlib.asynccontextmanager
async def serve_node(settings: Settings, otp: RecordingOtpSender) -> AsyncIterator[str]:
    """Run the node's app with uvicorn on loopback for the duration of the block."""
    app = create_app(settings, otp_sender=otp)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=settings.port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # re-raise why it stopped
            raise RuntimeError("the node stopped during start-up")
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        await task


class Walk:
    def __init__(self, http: httpx.AsyncClient, console: Console, otp: RecordingOtpSender):
        self.http = http
        self.console = console
        self.otp = otp
        self.operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

    def step(self, text: str) -> None:
        self.console.rule(f"[bold]{text}")

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    async def open_wallet(self, who: dict[str, str], password: str) -> dict[str, str]:
        challenge = await self.call(
            "POST",
            "/app/v1/otp",
            json={"id_number": who["id_number"], "name": who["name"], "purpose": "open_wallet"},
        )
        opened = await self.call(
            "POST",
            "/app/v1/wallets",
            json={
                "otp_id": challenge["otp_id"],
                "otp_code": self.otp.last[who["phone"]],
                "payment_password": password,
            },
        )
        self.console.print(
            f"{who['name'][0]}** opened a wallet (code sent to {challenge['phone_masked']})"
        )
        return {"Authorization": f"Bearer {opened['token']}"}

    async def balance(self, headers: dict[str, str]) -> int:
        wallet = await self.call("GET", "/app/v1/wallet", headers=headers)
        account = wallet["personal_account"]
        return int(account["available_fen"]) if account else 0


async def walk(http: httpx.AsyncClient, console: Console, otp: RecordingOtpSender) -> bool:
    w = Walk(http, console, otp)

    w.step("1. The operator imports the roster and posts March's monthly credits")
    await w.call(
        "POST", "/operator/v1/roster", json={"persons": [FATHER, CHILD]}, headers=w.operator
    )
    await w.call(
        "POST",
        "/operator/v1/credit-batches",
        headers=w.operator,
        json={
            "batch_id": "demo-2026-03",
            "month": "2026-03",
            "credits": [{"id_number": FATHER["id_number"], "amount_fen": 50_000}],
        },
    )
    console.print(
        f"father (employee scheme) credited {_yuan(50_000)}; "
        "the child is in the resident scheme and has no personal account"
    )

    w.step("2. The operator registers a designated pharmacy")
    pharmacy = await w.call(
        "POST",
        "/operator/v1/institutions",
        headers=w.operator,
        json={
            "code": "PH-0001",
            "name": "仁心大药房",
            "kind": "pharmacy",
            "categories": ["pharmacy_drug", "medical_device", "medical_consumable"],
        },
    )
    pharmacy_headers = {"Authorization": f"Bearer {pharmacy['api_key']}"}
    console.print(f"pharmacy {pharmacy['code']} registered; API key shown once")

    w.step("3. Father and child open wallets (roster match, SMS code, payment password)")
    father = await w.open_wallet(FATHER, PASSWORD_FATHER)
    child = await w.open_wallet(CHILD, PASSWORD_CHILD)

    w.step("4. The father files the relationship; the child confirms it")
    filed = await w.call(
        "POST",
        "/app/v1/relationships",
        headers=father,
        json={
            "receiver_id_number": CHILD["id_number"],
            "receiver_name": CHILD["name"],
            "relation_type": "child",
            "evidence_ref": "HUKOU-1301-778899",
            "payment_password": PASSWORD_FATHER,
        },
    )
    confirmed = await w.call(
        "POST",
        f"/app/v1/relationships/{filed['id']}/confirm",
        headers=child,
        json={"payment_password": PASSWORD_CHILD},
    )
    console.print(f"relationship {filed['id']}: {filed['state']} -> {confirmed['state']}")

    w.step("5. The child pays ¥88.50 for drugs at the pharmacy with their own payment code")
    code = await w.call("POST", "/app/v1/payment-codes", headers=child)
    settled = await w.call(
        "POST",
        "/institution/v1/settlements",
        headers=pharmacy_headers,
        json={
            "payment_code": code["code"],
            "amount_fen": 8_850,
            "category": "pharmacy_drug",
            "reference": "RX-20260316-0001",
        },
    )
    table = Table("source", "from", "amount")
    for source in settled["sources"]:
        table.add_row(
            source["source"],
            source.get("giver_name_masked") or "own account",
            _yuan(source["amount_fen"]),
        )
    console.print(table)

    w.step("6. The pharmacy refunds ¥20.00 of it; the money goes back where it came from")
    await w.call(
        "POST",
        "/institution/v1/settlements/RX-20260316-0001/refunds",
        headers=pharmacy_headers,
        json={"reference": "RF-0001", "amount_fen": 2_000},
    )
    father_fen = await w.balance(father)
    console.print(f"father's personal account: {_yuan(father_fen)} (= 500.00 - 88.50 + 20.00)")
    records = await w.call("GET", "/app/v1/wallet/records", headers=father)
    table = Table("direction", "amount", "purpose", "counterpart")
    for record in records["records"]:
        table.add_row(
            record["direction"],
            _yuan(record["amount_fen"]),
            record["purpose"],
            str(record.get("counterpart") or ""),
        )
    console.print(table)

    w.step("7. The books")
    books = await w.call("GET", "/operator/v1/ledger/check", headers=w.operator)
    ok = father_fen == 50_000 - 8_850 + 2_000 and bool(books["balanced"])
    console.print(
        "[green]balanced, every fen accounted for[/green]"
        if ok
        else f"[red]unexpected: {books}[/red]"
    )
    return ok


async def run_demo(base: Settings, console: Console) -> int:
    data_dir = Path(base.data_dir) / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)  # demo data is always fresh
    settings = Settings(
        province_code="130000",
        node_id="prov-13",
        data_dir=str(data_dir),
        port=_free_port(),
        operator_token=OPERATOR_TOKEN,
        log_level="WARNING",
    )
    otp = RecordingOtpSender()
    console.print(
        f"starting province node {settings.node_id} ({settings.province_code}) "
        "on embedded PostgreSQL ..."
    )
    async with (
        serve_node(settings, otp) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        console.print(f"node listening on {url}  (OpenAPI: {url}/schema)")
        ok = await walk(http, console, otp)
    return 0 if ok else 1
