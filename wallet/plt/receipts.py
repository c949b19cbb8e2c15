"""Receipts of committed grants: both nodes' signed envelopes, verifiable offline.

A receipt is one JSON document holding the five envelopes of a committed grant exactly as
they travelled (PREPARE A->B, RECEIVED B->A, ACCEPT B->A, DECISION A->B, ACK B->A, from
`plt_message`) and the root-signed key set documents of both nodes. Anyone holding the two
nodes' pinned root keys (a peers.json) can check it with `verify_receipt`, with no network
and no database: every signature, who sent what to whom, and the hash chain

    RECEIVED.prepare_hash = ACCEPT.prepare_hash = DECISION.prepare_hash = sha256(PREPARE.body)
    DECISION.vote_hash = sha256(ACCEPT.body), DECISION.outcome = COMMIT
    ACK.decision_hash = sha256(DECISION.body), ACK.final_state = COMMITTED

The device signatures travel inside: a PREPARE whose `user_auth` is `device` carries the
giver's signed instruction, an ACCEPT whose `acceptance` is `device` the receiver's signed
acceptance; both are checked too (`protocol.device_auth`), so a receipt proves that these
two people's phones authorised exactly this grant. `giver_auth` / `receiver_auth` say how
each side authorised (`device:<kid>`, or `pin`/`face`: that node's word only).

Signatures are checked with the key valid when the envelope says it was made
(`created_at_ms`): a key rotated out since still proves old evidence (PROTOCOL b.11), and a
key revoked before that instant does not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from protocol import device_auth
from protocol.directory import Peer
from protocol.envelope import Envelope, decode_envelope, verify_signature
from protocol.errors import ProtocolError
from protocol.keys import KeySet, KeySetDocument, open_keyset_document
from protocol.messages import (
    Accept,
    Ack,
    Body,
    Decision,
    MessageType,
    Outcome,
    Prepare,
    Received,
    decode_body,
)
from wallet.context import WalletContext
from wallet.errors import ErrorCode, WalletError
from wallet.plt.grants_base import log, to_ms

RECEIPT_FORMAT = "PLT/1 grant receipt v1"
# The five envelopes of a committed grant, who sends each, in protocol order.
CHAIN: tuple[tuple[MessageType, Literal["A", "B"]], ...] = (
    (MessageType.PREPARE, "A"),
    (MessageType.RECEIVED, "B"),
    (MessageType.ACCEPT, "B"),
    (MessageType.DECISION, "A"),
    (MessageType.ACK, "B"),
)


class ReceiptEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One envelope as it travelled (JSON or msgpack wire bytes; base64 in JSON)."""

    typ: MessageType
    envelope: bytes


class Receipt(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The receipt document (`GET /app/v1/grants/{id}/receipt`)."""

    format: str
    transfer_id: str
    giver_node: str
    receiver_node: str
    amount_fen: int
    issued_by: str
    issued_at_ms: int
    envelopes: tuple[ReceiptEnvelope, ...]
    keysets: dict[str, KeySetDocument]


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What `verify_receipt` concluded. `valid` only when `problems` is empty."""

    valid: bool
    transfer_id: str | None
    giver_node: str | None
    receiver_node: str | None
    amount_fen: int | None
    outcome: str | None
    problems: tuple[str, ...]
    giver_auth: str | None = None
    receiver_auth: str | None = None


RootKeys = Mapping[str, tuple[str, str]]  # node -> (root_kid, root_pub base64url)

_receipt_json = msgspec.json.Decoder(Receipt)
_peers_json = msgspec.json.Decoder(list[Peer])


# --- building ----------------------------------------------------------------------------------

_GIVER_GRANT = """
SELECT giver_person_id, to_node, state, amount_fen, prepare_hash, vote_hash, decision_hash
FROM grant_out WHERE transfer_id = $1
"""
_RECEIVER_GRANT = """
SELECT from_node, state, amount_fen, prepare_hash, vote_hash, decision_hash
FROM grant_in WHERE transfer_id = $1 AND receiver_person_id = $2
"""
# Every logged envelope of the chain's types about this transfer between the two nodes,
# oldest first; the one whose body is the stored PREPARE / vote / DECISION is chosen.
_ENVELOPES = """
SELECT typ, body_hash, envelope FROM plt_message
WHERE dedup_key = $1 AND typ = ANY($2::text[])
  AND ((from_node = $3 AND to_node = $4) OR (from_node = $4 AND to_node = $3))
ORDER BY id
"""


async def receipt_for(ctx: WalletContext, person_id: int, transfer_id: str) -> dict[str, Any]:
    """The receipt of a committed grant, for its giver (at A) or its receiver (at B)."""
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(_GIVER_GRANT, transfer_id)
        if row is not None and row["giver_person_id"] == person_id:
            giver_node, receiver_node = ctx.node_id, row["to_node"]
        else:
            row = await conn.fetchrow(_RECEIVER_GRANT, transfer_id, person_id)
            if row is None:
                raise WalletError(ErrorCode.NOT_FOUND, f"no grant {transfer_id} of yours")
            giver_node, receiver_node = row["from_node"], ctx.node_id
        if row["state"] != "COMMITTED":
            raise WalletError(
                ErrorCode.STATE_CONFLICT,
                f"grant {transfer_id} is {row['state']}: only a committed grant has a receipt",
            )
        typs = [typ.value for typ, _ in CHAIN]
        wanted = {
            "PREPARE": row["prepare_hash"],
            "ACCEPT": row["vote_hash"],
            "DECISION": row["decision_hash"],
        }
        found: dict[str, bytes] = {}
        for r in await conn.fetch(_ENVELOPES, transfer_id, typs, giver_node, receiver_node):
            if r["typ"] not in found and wanted.get(r["typ"], r["body_hash"]) == r["body_hash"]:
                found[r["typ"]] = bytes(r["envelope"])
    missing = [t for t in typs if t not in found]
    if missing:
        raise WalletError(
            ErrorCode.STATE_CONFLICT,
            f"the receipt is not complete yet (waiting for {', '.join(missing)}); try again later",
            missing=missing,
        )
    peer = receiver_node if giver_node == ctx.node_id else giver_node
    receipt = Receipt(
        format=RECEIPT_FORMAT,
        transfer_id=transfer_id,
        giver_node=giver_node,
        receiver_node=receiver_node,
        amount_fen=row["amount_fen"],
        issued_by=ctx.node_id,
        issued_at_ms=to_ms(ctx.clock.now()),
        envelopes=tuple(ReceiptEnvelope(typ=typ, envelope=found[typ.value]) for typ, _ in CHAIN),
        keysets=await _keysets(ctx, peer),
    )
    result: dict[str, Any] = msgspec.to_builtins(receipt)
    return result


async def _keysets(ctx: WalletContext, peer: str) -> dict[str, KeySetDocument]:
    node = ctx.plt
    if node is None:
        raise WalletError(ErrorCode.SERVICE_UNAVAILABLE, "this node has no PLT/1 keys")
    docs = {node.node_id: node.keys.document}
    cached = None if node.directory_dir is None else node.directory_dir / "keysets" / f"{peer}.json"
    try:
        if cached is not None and cached.exists():
            docs[peer] = msgspec.json.decode(cached.read_bytes(), type=KeySetDocument)
        else:
            docs[peer] = await node.fetch_keyset_document(peer)
    except Exception as exc:  # the peer's key set is part of the receipt: without it, 503
        log.warning("receipt_peer_keyset_unavailable", peer=peer, error=repr(exc))
        raise WalletError(
            ErrorCode.SERVICE_UNAVAILABLE, f"the key set of {peer} is not available; try later"
        ) from exc
    return docs


# --- verifying -----------------------------------------------------------------------------------


def load_root_keys(peers_json: bytes) -> dict[str, tuple[str, str]]:
    """Pinned root keys from a peers.json (the trust anchors of an offline check)."""
    return {p.node: (p.root_kid, p.root_pub) for p in _peers_json.decode(peers_json)}


def verify_receipt_file(path: str | Path, root_keys: RootKeys) -> Verdict:
    """`verify_receipt` of a receipt saved as JSON."""
    return verify_receipt(Path(path).read_bytes(), root_keys)


def verify_receipt(doc: bytes | Mapping[str, Any] | Receipt, root_keys: RootKeys) -> Verdict:
    """Check a receipt offline against pinned root keys; never raises on bad input."""
    problems: list[str] = []
    try:
        receipt = _as_receipt(doc)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
        return _verdict(None, None, [f"not a receipt: {exc}"])
    if receipt.format != RECEIPT_FORMAT:
        problems.append(f"unknown receipt format {receipt.format!r}")
    a, b = receipt.giver_node, receipt.receiver_node
    keysets: dict[str, KeySet] = {}
    for node in (a, b):
        keysets_problem = _open_keyset(receipt, node, root_keys, keysets)
        if keysets_problem:
            problems.append(keysets_problem)
    bodies: dict[MessageType, tuple[Envelope, Body]] = {}
    if len(receipt.envelopes) != len(CHAIN):
        problems.append(f"expected {len(CHAIN)} envelopes, found {len(receipt.envelopes)}")
    for (typ, sender), item in zip(CHAIN, receipt.envelopes, strict=False):
        opened = _open(item, typ, sender, a, b, keysets, problems)
        if opened is not None:
            bodies[typ] = opened
    outcome = _check_chain(receipt, bodies, problems)
    return _verdict(receipt, outcome, problems, bodies)


def _as_receipt(doc: bytes | Mapping[str, Any] | Receipt) -> Receipt:
    if isinstance(doc, Receipt):
        return doc
    if isinstance(doc, bytes | bytearray):
        return _receipt_json.decode(bytes(doc))
    return msgspec.convert(dict(doc), Receipt, strict=False)


def _open_keyset(
    receipt: Receipt, node: str, root_keys: RootKeys, out: dict[str, KeySet]
) -> str | None:
    doc = receipt.keysets.get(node)
    if doc is None:
        return f"no key set of {node} in the receipt"
    root = root_keys.get(node)
    if root is None:
        return f"no pinned root key for {node}: cannot trust its key set"
    try:
        out[node] = open_keyset_document(
            doc, root_kid=root[0], root_pub=root[1], expected_node=node
        )
    except ProtocolError as exc:
        return f"key set of {node}: {exc.message}"
    return None


def _open(
    item: ReceiptEnvelope,
    typ: MessageType,
    sender: Literal["A", "B"],
    a: str,
    b: str,
    keysets: dict[str, KeySet],
    problems: list[str],
) -> tuple[Envelope, Body] | None:
    try:
        env = decode_envelope(item.envelope)
    except ProtocolError as exc:
        problems.append(f"{typ}: {exc.message}")
        return None
    want_from, want_to = (a, b) if sender == "A" else (b, a)
    if env.typ is not typ or item.typ is not typ:
        problems.append(f"expected {typ}, found {env.typ}")
        return None
    if env.from_node != want_from or env.to_node != want_to:
        problems.append(
            f"{typ} goes {env.from_node} -> {env.to_node}, not {want_from} -> {want_to}"
        )
        return None
    keyset = keysets.get(env.from_node)
    if keyset is None:
        problems.append(f"{typ}: no trusted key set of {env.from_node}")
        return None
    try:
        verify_signature(
            env, lambda _node, kid, at_ms: keyset.verifying_key(kid, at_ms), env.created_at_ms
        )
        body = decode_body(env.typ, env.body)
    except ProtocolError as exc:
        problems.append(f"{typ}: {exc.message}")
        return None
    return env, body


def _sha(env: Envelope) -> str:
    return hashlib.sha256(env.body).hexdigest()


def _check_chain(
    receipt: Receipt, bodies: dict[MessageType, tuple[Envelope, Body]], problems: list[str]
) -> str | None:
    if len(bodies) != len(CHAIN):
        return None
    prepare_env, prepare = bodies[MessageType.PREPARE]
    _, received = bodies[MessageType.RECEIVED]
    accept_env, accept = bodies[MessageType.ACCEPT]
    decision_env, decision = bodies[MessageType.DECISION]
    _, ack = bodies[MessageType.ACK]
    assert isinstance(prepare, Prepare) and isinstance(received, Received)
    assert isinstance(accept, Accept) and isinstance(decision, Decision) and isinstance(ack, Ack)
    ids = {b.transfer_id for b in (prepare, received, accept, decision, ack)}
    if ids != {receipt.transfer_id}:
        problems.append(f"the envelopes are about {sorted(ids)}, not {receipt.transfer_id}")
    prepare_hash = _sha(prepare_env)
    for name, value in (
        ("RECEIVED", received.prepare_hash),
        ("ACCEPT", accept.prepare_hash),
        ("DECISION", decision.prepare_hash),
    ):
        if value != prepare_hash:
            problems.append(f"{name} answers another PREPARE")
    if decision.outcome is not Outcome.COMMIT:
        problems.append(f"the decision is {decision.outcome}, not COMMIT")
    if decision.vote_hash != _sha(accept_env):
        problems.append("DECISION does not answer this ACCEPT")
    if ack.decision_hash != _sha(decision_env) or ack.final_state != "COMMITTED":
        problems.append("ACK does not acknowledge this COMMIT")
    if prepare.amount_fen != receipt.amount_fen or prepare.giver.node != receipt.giver_node:
        problems.append("the receipt's summary does not match the PREPARE")
    try:
        device_auth.check_prepare_auth(prepare, prepare_env.from_node)
    except device_auth.DeviceAuthError as exc:
        problems.append(f"PREPARE user_auth: {exc}")
    try:
        device_auth.check_accept_auth(accept, prepare, accept_env.from_node)
    except device_auth.DeviceAuthError as exc:
        problems.append(f"ACCEPT acceptance: {exc}")
    return decision.outcome.value


def _auth_of(method: str, ref: str) -> str:
    return f"device:{ref}" if method == "device" else method


def _verdict(
    receipt: Receipt | None,
    outcome: str | None,
    problems: list[str],
    bodies: dict[MessageType, tuple[Envelope, Body]] | None = None,
) -> Verdict:
    prepare = (bodies or {}).get(MessageType.PREPARE, (None, None))[1]
    accept = (bodies or {}).get(MessageType.ACCEPT, (None, None))[1]
    return Verdict(
        giver_auth=_auth_of(prepare.user_auth.method, prepare.user_auth.ref)
        if isinstance(prepare, Prepare)
        else None,
        receiver_auth=_auth_of(accept.acceptance.method, accept.acceptance.ref)
        if isinstance(accept, Accept)
        else None,
        valid=not problems,
        transfer_id=None if receipt is None else receipt.transfer_id,
        giver_node=None if receipt is None else receipt.giver_node,
        receiver_node=None if receipt is None else receipt.receiver_node,
        amount_fen=None if receipt is None else receipt.amount_fen,
        outcome=outcome,
        problems=tuple(problems),
    )
