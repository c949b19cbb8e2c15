"""A seeded, deterministic simulator of PLT/1 between a giver node A and a receiver node B.

It drives the pure state machines (`protocol.giver`, `protocol.receiver`) the way the
wallet layer will: each delivery or timer is ONE atomic step (states, ledger postings and
outbox rows change together or not at all), and a thin model of each node executes the
effects on a tiny in-memory ledger:

    A: giver (personal account), due_to:B, funding        B: due_from:A, quota (receiver)

A seeded scheduler drops, duplicates, reorders and delays messages, crashes a node before
or after a step commits (a crash after commit loses the reply), restarts it, moves and
skews both clocks, runs the outbox senders, A's sweeper and B's resolver (STATUS_REQ /
STATUS), lets the receiver accept or decline at random times (some after 06:00), and, in
envelope mode, seals and opens every message with real Ed25519 keys and rotates them.

Invariants are checked after every action (`World.check`), at rest after healing
(`World.check_at_rest`), and by replaying the whole message log (`World.check_replay`).
`run_seed(seed)` is the entry point; any failure raises SimulationFailure naming the seed.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import giver, receiver
from protocol.clock import next_0600, window_id
from protocol.directory import Peer, PeerDirectory
from protocol.effects import (
    Alert,
    AlertKind,
    Effect,
    FreezePeer,
    HoldGiver,
    HoldQuota,
    PostHold,
    QueryPeer,
    Reply,
    ReportStatus,
    Send,
    StopRetries,
    VoidHold,
)
from protocol.envelope import Opened, Wire, encode_envelope, open_envelope, seal
from protocol.errors import ErrorCode, ProtocolError, UnknownKey
from protocol.giver import GiverState, GiverTransfer
from protocol.ids import uuid7
from protocol.keys import KeySet, SigningKey, initial_keyset, rotate_keyset, sign_keyset
from protocol.messages import (
    Accept,
    Acceptance,
    Ack,
    Body,
    Decision,
    Decline,
    GiverRef,
    MessageType,
    Prepare,
    Received,
    ReceiverRef,
    RelationRef,
    RelationType,
    Status,
    StatusItem,
    StatusReq,
    UserAuth,
    body_hash,
    decode_body,
    encode_body,
)
from protocol.receiver import IN_DOUBT, ReceiverState, ReceiverTransfer

A = "prov-11"
B = "prov-13"
HOUR_MS = 3_600_000
DAY0_MS = 1_773_504_000_000  # 2026-03-15 00:00 Asia/Shanghai
GIVER_BALANCE_FEN = 150_000
CLOCK_SKEW_MS_MAX = 5 * 60_000
HEAL_ROUNDS_MAX = 60
ALLOWED_ALERTS = frozenset({AlertKind.IN_DOUBT})


class SimulationFailure(AssertionError):
    """An invariant failed; the message names the seed and how to replay it."""

    def __init__(self, message: str, trace: list[str]) -> None:
        super().__init__(message)
        self.trace = trace


# --- messages on the wire ----------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    """One message in flight: a request, or the synchronous reply to one."""

    src: str
    dst: str
    typ: MessageType
    body: bytes
    is_reply: bool
    wire: bytes | None = None  # the sealed envelope, in envelope mode


# --- ledger ------------------------------------------------------------------------------


@dataclass
class Account:
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted)


class Ledger:
    """Double entry with pending (held) and posted amounts, as in PROTOCOL b.1."""

    def __init__(self, names: list[str]) -> None:
        self.accounts = {name: Account() for name in names}

    def hold(self, debit: str, credit: str, amount_fen: int) -> None:
        self.accounts[debit].debits_pending += amount_fen
        self.accounts[credit].credits_pending += amount_fen

    def post(self, debit: str, credit: str, amount_fen: int) -> None:
        d, c = self.accounts[debit], self.accounts[credit]
        d.debits_pending -= amount_fen
        d.debits_posted += amount_fen
        c.credits_pending -= amount_fen
        c.credits_posted += amount_fen

    def void(self, debit: str, credit: str, amount_fen: int) -> None:
        self.accounts[debit].debits_pending -= amount_fen
        self.accounts[credit].credits_pending -= amount_fen

    def snapshot(self) -> dict[str, tuple[int, int, int, int]]:
        return {name: acc.as_tuple() for name, acc in self.accounts.items()}

    def balanced(self) -> bool:
        accs = self.accounts.values()
        pending = sum(a.credits_pending - a.debits_pending for a in accs)
        posted = sum(a.credits_posted - a.debits_posted for a in accs)
        return pending == 0 and posted == 0


# --- one node's durable store and its effect executor ------------------------------------


@dataclass
class Tx:
    """The writes of one atomic step."""

    states: dict[str, Any] = field(default_factory=dict)
    effects: list[tuple[str, Effect]] = field(default_factory=list)
    transitions: list[tuple[str, Any, Any, Any]] = field(
        default_factory=list
    )  # key, old, new, event


class Node:
    """What survives a crash: transfers, ledger, outbox. Everything else is recomputed."""

    def __init__(self, name: str, peer: str, ledger: Ledger, debit: str, credit: str) -> None:
        self.name = name
        self.peer = peer
        self.ledger = ledger
        self.debit, self.credit = debit, credit  # the two legs of this side's hold
        self.transfers: dict[str, Any] = {}
        self.outbox: dict[tuple[str, MessageType], tuple[bytes, bool]] = {}  # -> (body, done)
        self.alerts: list[Alert] = []
        self.up = True
        self.offset_ms = 0

    def current(self, tx: Tx, key: str) -> Any:
        return tx.states[key] if key in tx.states else self.transfers.get(key)

    def run(
        self,
        tx: Tx,
        key: str,
        event: Any,
        step: Callable[[Any, Any], tuple[Any, tuple[Effect, ...]]],
    ) -> tuple[Effect, ...]:
        old = self.current(tx, key)
        new, effects = step(old, event)
        if new is not None and new is not old:
            tx.states[key] = new
        tx.effects.extend((key, e) for e in effects)
        tx.transitions.append((key, old, new, event))
        return effects

    def commit(self, tx: Tx) -> None:
        for key, effect in tx.effects:
            self.apply(key, effect)
        self.transfers.update(tx.states)

    def apply(self, key: str, effect: Effect) -> None:
        match effect:
            case HoldGiver(amount_fen=amount) | HoldQuota(amount_fen=amount):
                self.ledger.hold(self.debit, self.credit, amount)
            case PostHold(amount_fen=amount):
                self.ledger.post(self.debit, self.credit, amount)
            case VoidHold(amount_fen=amount):
                self.ledger.void(self.debit, self.credit, amount)
            case Send(typ=typ, body=body):
                self.outbox[(key, typ)] = (encode_body(body), False)
            case StopRetries(typ=typ):
                if (key, typ) in self.outbox:
                    self.outbox[(key, typ)] = (self.outbox[(key, typ)][0], True)
            case Alert():
                self.alerts.append(effect)
            case FreezePeer():
                self.alerts.append(Alert(kind=AlertKind.EQUIVOCATION, detail="freeze"))
            case _:
                pass  # replies are collected by the caller; evidence and notices need no model

    def observable(self) -> tuple[Any, ...]:
        """What replaying old messages must not change (ledger, outcomes, outbox)."""
        outcomes = {k: (t.state, t.decision_hash) for k, t in self.transfers.items()}
        return (self.ledger.snapshot(), outcomes, dict(self.outbox))

    def full(self) -> tuple[Any, ...]:
        return (self.ledger.snapshot(), dict(self.transfers), dict(self.outbox))


# --- the world ---------------------------------------------------------------------------


class World:
    """Two nodes, a network, a clock; every action is deterministic given the seed."""

    def __init__(
        self,
        seed: int,
        *,
        envelopes: bool = False,
        transfers: int = 4,
        b_reject_rate: float = 0.06,
        start_ms: int | None = None,
    ) -> None:
        self.seed = seed
        self.b_reject_rate = b_reject_rate
        self.rng = random.Random(seed)
        self.envelopes = envelopes
        self.transfers_max = transfers
        # Start somewhere in the day, often shortly before 06:00 so deadlines bite.
        start = self.rng.choice(
            [self.rng.randrange(0, 24 * HOUR_MS), 5 * HOUR_MS + self.rng.randrange(0, HOUR_MS)]
        )
        self.t_ms = DAY0_MS + start if start_ms is None else start_ms
        self.a = Node(A, B, Ledger(["giver", "due_to", "funding"]), "giver", "due_to")
        self.b = Node(B, A, Ledger(["due_from", "quota"]), "due_from", "quota")
        self.a.ledger.accounts["giver"].credits_posted = GIVER_BALANCE_FEN
        self.a.ledger.accounts["funding"].debits_posted = GIVER_BALANCE_FEN
        self.exposure_cap_fen = self.rng.choice([60_000, 120_000, 10**9])
        self.in_flight: list[Msg] = []
        self.log: list[Msg] = []  # every message ever sent
        self.processed: list[Msg] = []  # every delivery that committed
        self.trace: list[str] = []
        self.created: list[str] = []
        self.dropped_by_crypto = 0
        if envelopes:
            self._setup_keys()

    # --- clocks and helpers

    def node(self, name: str) -> Node:
        return self.a if name == A else self.b

    def now(self, node: Node) -> int:
        return self.t_ms + node.offset_ms

    def note(self, text: str) -> None:
        self.trace.append(f"t={self.t_ms - DAY0_MS:>11} {text}")

    def fail(self, message: str) -> None:
        tail = "\n".join(self.trace[-40:])
        raise SimulationFailure(
            f"seed {self.seed}{' (envelopes)' if self.envelopes else ''}: {message}\n"
            f"replay: PLT_SIM_SEED={self.seed} python -m pytest tests/protocol/test_simulation.py -k every_seed -s\n"
            f"last actions:\n{tail}",
            self.trace,
        )

    # --- keys (envelope mode)

    def _setup_keys(self) -> None:
        self.signing: dict[str, dict[str, SigningKey]] = {}
        self.keysets: dict[str, KeySet] = {}
        self.roots: dict[str, SigningKey] = {}
        peers = []
        for name in (A, B):
            key = SigningKey.from_seed(f"{name}/2026-03-1", self.rng.randbytes(32))
            root = SigningKey.from_seed(f"{name}/root-1", self.rng.randbytes(32))
            self.signing[name] = {key.kid: key}
            self.keysets[name] = initial_keyset(name, key, DAY0_MS - HOUR_MS)
            self.roots[name] = root
            peers.append(
                Peer(node=name, url="http://sim", root_kid=root.kid, root_pub=root.public_b64)
            )
        self.directories = {name: PeerDirectory(peers) for name in (A, B)}
        for holder in (A, B):
            for name in (A, B):
                self.directories[holder].install(
                    name, sign_keyset(self.keysets[name], self.roots[name])
                )

    def rotate_key(
        self, name: str, activate_ms: int | None = None, retire_ms: int | None = None
    ) -> None:
        node = self.node(name)
        n = len(self.signing[name]) + 1
        key = SigningKey.from_seed(f"{name}/2026-03-{n}", self.rng.randbytes(32))
        activate = self.rng.randrange(0, 2 * HOUR_MS) if activate_ms is None else activate_ms
        retire = (
            activate + self.rng.randrange(HOUR_MS, 6 * HOUR_MS) if retire_ms is None else retire_ms
        )
        self.keysets[name] = rotate_keyset(
            self.keysets[name],
            key,
            self.now(node),
            activate_after_ms=activate,
            retire_after_ms=retire,
        )
        self.signing[name][key.kid] = key
        self.note(
            f"{name} rotates to {key.kid} (active in {activate} ms); peers learn it on first use"
        )

    # --- the wire

    def send(self, src: str, dst: str, typ: MessageType, body: bytes, *, is_reply: bool) -> None:
        wire = None
        if self.envelopes:
            node = self.node(src)
            kid = self.keysets[src].signing_kid(self.now(node))
            env = seal(
                body,
                typ,
                src,
                dst,
                self.signing[src][kid],
                self.now(node),
                msg_id=uuid7(self.now(node), self.rng.randbytes(10)),
            )
            fmt: Wire = self.rng.choice(["json", "msgpack"])
            wire = encode_envelope(env, fmt)
        msg = Msg(src, dst, typ, body, is_reply, wire)
        self.in_flight.append(msg)
        self.log.append(msg)

    def open_wire(self, raw: bytes, dst: str) -> Opened | None:
        """Verify an envelope at `dst`, refreshing the sender's keyset once on an unknown kid
        (PROTOCOL b.11); None when the bytes are refused (e.g. the old key expired in flight)."""
        directory = self.directories[dst]
        now = self.now(self.node(dst))
        try:
            return open_envelope(raw, dst, directory.verifying_key, now)
        except UnknownKey as exc:
            directory.install(exc.node, sign_keyset(self.keysets[exc.node], self.roots[exc.node]))
        except ProtocolError:
            self.dropped_by_crypto += 1
            return None
        try:
            return open_envelope(raw, dst, directory.verifying_key, now)
        except ProtocolError:
            self.dropped_by_crypto += 1
            return None

    def receive(self, msg: Msg) -> tuple[MessageType, Body, str] | None:
        """Verify (envelope mode) and decode; None when the receiver refuses the bytes."""
        if msg.wire is None:
            return msg.typ, decode_body(msg.typ, msg.body), body_hash(msg.body)
        opened = self.open_wire(msg.wire, msg.dst)
        if opened is None:
            return None
        return opened.envelope.typ, opened.body, body_hash(opened.envelope.body)

    def open_decision(self, raw: bytes) -> tuple[Decision | None, str | None]:
        """The DECISION inside a STATUS item, verified as A's in envelope mode."""
        if not self.envelopes:
            body = decode_body(MessageType.DECISION, raw)
            assert isinstance(body, Decision)
            return body, body_hash(raw)
        opened = self.open_wire(raw, B)
        if opened is None:
            return None, None
        assert isinstance(opened.body, Decision) and opened.envelope.from_node == A
        return opened.body, body_hash(opened.envelope.body)

    def seal_decision(self, decision: Decision) -> bytes:
        raw = encode_body(decision)
        if not self.envelopes:
            return raw
        kid = self.keysets[A].signing_kid(self.now(self.a))
        env = seal(
            raw,
            MessageType.DECISION,
            A,
            B,
            self.signing[A][kid],
            self.now(self.a),
            msg_id=uuid7(self.now(self.a), self.rng.randbytes(10)),
        )
        return encode_envelope(env, "msgpack")

    # --- handlers: one delivery is one transaction at its destination

    def handle(self, msg: Msg) -> tuple[Node, Tx, list[tuple[MessageType, bytes]]] | None:
        received = self.receive(msg)
        if received is None:
            return None
        typ, body, digest = received
        node = self.node(msg.dst)
        now = self.now(node)
        tx = Tx()
        replies: list[tuple[MessageType, bytes]] = []
        if node is self.a:
            if typ is MessageType.STATUS_REQ:
                assert isinstance(body, StatusReq)
                items = []
                for tid in body.transfer_ids:
                    for e in node.run(
                        tx, tid, giver.StatusQuery(transfer_id=tid, now_ms=now), giver.step
                    ):
                        if isinstance(e, ReportStatus):
                            raw = self.seal_decision(e.decision) if e.decision is not None else None
                            items.append(
                                StatusItem(
                                    transfer_id=e.transfer_id,
                                    state=e.state,
                                    decision=raw,
                                    undecided_remaining_ms=e.undecided_remaining_ms,
                                    presumed=e.presumed,
                                )
                            )
                replies.append((MessageType.STATUS, encode_body(Status(items=tuple(items)))))
            elif isinstance(body, Received | Decline | Accept | Ack):
                arrived = giver.MessageArrived(body=body, body_hash=digest, now_ms=now)
                node.run(tx, body.transfer_id, arrived, giver.step)
        else:
            if typ is MessageType.PREPARE:
                assert isinstance(body, Prepare)
                prepared = receiver.PrepareArrived(
                    from_node=msg.src,
                    prepare=body,
                    prepare_hash=digest,
                    b_hold_id=uuid7(now, self.rng.randbytes(10)),
                    now_ms=now,
                    rejection=self.b_checks(body),
                )
                node.run(tx, body.transfer_id, prepared, receiver.step)
            elif typ is MessageType.DECISION:
                assert isinstance(body, Decision)
                event = receiver.DecisionArrived(
                    from_node=msg.src, decision=body, decision_hash=digest, now_ms=now
                )
                node.run(tx, body.transfer_id, event, receiver.step)
            elif typ is MessageType.STATUS:
                assert isinstance(body, Status)
                for item in body.items:
                    decision, d_hash = (
                        self.open_decision(item.decision)
                        if item.decision is not None
                        else (None, None)
                    )
                    if decision is not None and decision.transfer_id != item.transfer_id:
                        self.fail("STATUS item carries another transfer's decision")
                    ev = receiver.event_for_status(msg.src, item, decision, d_hash, now)
                    if ev is not None:
                        node.run(tx, item.transfer_id, ev, receiver.step)
        for _, effect in tx.effects:
            if isinstance(effect, Reply):
                replies.append((effect.typ, encode_body(effect.body)))
        return node, tx, replies

    def b_checks(self, prepare: Prepare) -> ErrorCode | None:
        """B's checks before it holds: wallet open (random), exposure cap on due_from:A."""
        if self.rng.random() < self.b_reject_rate:
            return ErrorCode.RECEIVER_WALLET_NOT_OPEN
        due = self.b.ledger.accounts["due_from"]
        if due.debits_posted + due.debits_pending + prepare.amount_fen > self.exposure_cap_fen:
            return ErrorCode.EXPOSURE_CAP
        return None

    def commit(self, node: Node, tx: Tx) -> None:
        node.commit(tx)
        if node is self.b:
            for key, old, new, event in tx.transitions:
                self.check_b_transition(key, old, new, event)

    # --- actions (the scheduler and the Hypothesis machine call these)

    def instruct(self, amount_fen: int) -> None:
        if not self.a.up or len(self.created) >= self.transfers_max:
            return
        now = self.now(self.a)
        tid = uuid7(now, self.rng.randbytes(10))
        decide_by = next_0600(now)
        prepare = Prepare(
            transfer_id=tid,
            giver=GiverRef(node=A, account_ref="pa-1", masked_name="张*"),
            receiver=ReceiverRef(account_id="w-1"),
            relation=RelationRef(
                relation_id=uuid7(DAY0_MS, bytes(10)), type=RelationType.CHILD, verified_by_A=True
            ),
            amount_fen=amount_fen,
            currency="CNY",
            fee_fen=0,
            accept_within_ms=decide_by - now,
            window_id=window_id(now),
            user_auth=UserAuth(method="pin", verified_at_ms=now, ref="pin"),
            a_hold_id=uuid7(now, self.rng.randbytes(10)),
        )
        giver_acc = self.a.ledger.accounts["giver"]
        available = giver_acc.credits_posted - giver_acc.debits_posted - giver_acc.debits_pending
        rejection = ErrorCode.GIVER_INSUFFICIENT_BALANCE if available < amount_fen else None
        event = giver.Instruct(
            prepare=prepare,
            request_hash=tid.replace("-", "").ljust(64, "0"),
            to_node=B,
            decide_by_ms=decide_by,
            now_ms=now,
            rejection=rejection,
        )
        tx = Tx()
        self.a.run(tx, tid, event, giver.step)
        self.a.commit(tx)
        self.created.append(tid)
        self.note(
            f"A instructs {tid[-4:]} {amount_fen} fen, decide_by +{decide_by - now} ms, {rejection or 'ok'}"
        )

    def client_retry(self, index: int) -> None:
        if not self.a.up or not self.created:
            return
        tid = self.created[index % len(self.created)]
        state: GiverTransfer = self.a.transfers[tid]
        event = giver.Instruct(
            prepare=state.prepare,
            request_hash=state.request_hash,
            to_node=B,
            decide_by_ms=state.decide_by_ms,
            now_ms=self.now(self.a),
        )
        tx = Tx()
        self.a.run(tx, tid, event, giver.step)
        if tx.effects or tid in tx.states:
            self.fail(f"a client retry of {tid} changed something: {tx.effects}")

    def deliver(self, index: int, fate: str = "ok") -> None:
        """Deliver in-flight message `index`; fate: ok, drop, dup, crash_before, crash_after."""
        if not self.in_flight:
            return
        msg = self.in_flight.pop(index % len(self.in_flight))
        dst = self.node(msg.dst)
        label = f"{msg.src}->{msg.dst} {msg.typ}{' (reply)' if msg.is_reply else ''}"
        if fate == "drop" or not dst.up:
            self.note(f"lost {label}{'' if dst.up else ' (node down)'}")
            return
        if fate == "dup":
            self.in_flight.append(msg)
        if fate == "crash_before":
            dst.up = False
            self.note(f"{msg.dst} crashes before committing {label}")
            return
        handled = self.handle(msg)
        if handled is None:
            self.note(f"refused {label} (signature/key)")
            return
        node, tx, replies = handled
        self.commit(node, tx)
        self.processed.append(msg)
        states = {k: getattr(s, "state", None) for k, s in tx.states.items()}
        self.note(f"deliver {label} -> {states} {[type(e).__name__ for _, e in tx.effects]}")
        if fate == "crash_after":
            dst.up = False
            self.note(f"{msg.dst} crashes after committing; reply lost")
            return
        if not msg.is_reply:
            if len(replies) > 1:
                self.fail(f"{label} produced {len(replies)} replies")
            for typ, raw in replies:
                self.send(msg.dst, msg.src, typ, raw, is_reply=True)

    def deliver_next(self, typ: MessageType, fate: str = "ok") -> Msg:
        """Deliver the oldest in-flight message of `typ` (scenario tests steer with this)."""
        for i, msg in enumerate(self.in_flight):
            if msg.typ is typ:
                self.deliver(i, fate)
                return msg
        raise AssertionError(f"no {typ} in flight: {[m.typ for m in self.in_flight]}")

    def outbox_tick(self, name: str) -> None:
        node = self.node(name)
        if not node.up:
            return
        sent = []
        for (key, typ), (raw, done) in sorted(node.outbox.items()):
            if not done:
                self.send(name, node.peer, typ, raw, is_reply=False)
                sent.append(f"{typ} {key[-4:]}")
        if sent:
            self.note(f"{name} outbox sends {sent}")

    def sweep(self) -> None:
        if not self.a.up:
            return
        tx = Tx()
        for tid in sorted(self.a.transfers):
            self.a.run(tx, tid, giver.Sweep(now_ms=self.now(self.a)), giver.step)
        self.a.commit(tx)
        if tx.states:
            self.note(f"A sweeps: {[k[-4:] for k in tx.states]} expire")

    def resolve(self) -> None:
        if not self.b.up:
            return
        tx = Tx()
        ids: list[str] = []
        for tid in sorted(self.b.transfers):
            for e in self.b.run(
                tx, tid, receiver.ResolverTick(now_ms=self.now(self.b)), receiver.step
            ):
                if isinstance(e, QueryPeer):
                    ids.append(e.transfer_id)
        self.b.commit(tx)
        if ids:
            self.note(f"B asks A about {[i[-4:] for i in ids]}")
            self.send(
                B,
                A,
                MessageType.STATUS_REQ,
                encode_body(StatusReq(transfer_ids=tuple(ids))),
                is_reply=False,
            )

    def receiver_acts(self, index: int, choice: str) -> None:
        """The receiver (or the relationship) acts on a pending grant: accept, decline, end."""
        pending = [
            k
            for k, s in sorted(self.b.transfers.items())
            if s.state is ReceiverState.PENDING_ACCEPT
        ]
        if not self.b.up or not pending:
            return
        tid = pending[index % len(pending)]
        now = self.now(self.b)
        event: Any
        if choice == "accept":
            event = receiver.ReceiverAccepts(
                acceptance=Acceptance(method="pin", ref="p"), now_ms=now
            )
        elif choice == "decline":
            event = receiver.ReceiverDeclines(now_ms=now)
        else:
            event = receiver.RelationEnded(now_ms=now)
        tx = Tx()
        self.b.run(tx, tid, event, receiver.step)
        self.commit(self.b, tx)
        self.note(f"receiver {choice}s {tid[-4:]} -> {self.b.transfers[tid].state}")

    def advance(self, ms: int) -> None:
        self.t_ms += ms

    def skew(self, name: str, offset_ms: int) -> None:
        self.node(name).offset_ms = offset_ms
        self.note(f"{name} clock offset {offset_ms} ms")

    def restart(self, name: str) -> None:
        node = self.node(name)
        if not node.up:
            node.up = True
            self.note(f"{name} restarts")

    # --- invariants

    def check_b_transition(
        self, tid: str, old: ReceiverTransfer | None, new: ReceiverTransfer | None, event: Any
    ) -> None:
        """B changes to COMMITTED or ABORTED only on A's valid, signed DECISION."""
        if new is None or (old is not None and old.state is new.state):
            return
        if new.state in (ReceiverState.COMMITTED, ReceiverState.ABORTED):
            a_state = self.a.transfers.get(tid)
            if not isinstance(event, receiver.DecisionArrived):
                self.fail(f"B moved {tid} to {new.state} on {type(event).__name__}, not a DECISION")
            if a_state is None or a_state.decision_hash != event.decision_hash:
                self.fail(f"B applied a DECISION for {tid} that A never made")

    def check(self) -> None:
        """Invariants after every action."""
        a, b = self.a, self.b
        if not a.ledger.balanced() or not b.ledger.balanced():
            self.fail("a ledger does not balance (fen created or lost)")
        g = a.ledger.accounts["giver"]
        if g.credits_posted - g.debits_posted - g.debits_pending < 0:
            self.fail("giver balance is negative")
        a_held = sum(t.amount_fen for t in a.transfers.values() if t.state is GiverState.PREPARED_A)
        a_posted = sum(
            t.amount_fen for t in a.transfers.values() if t.state is GiverState.COMMITTED
        )
        if (g.debits_pending, g.debits_posted) != (a_held, a_posted):
            self.fail(f"A ledger {g} disagrees with A states: held {a_held}, posted {a_posted}")
        q = b.ledger.accounts["quota"]
        b_held = sum(t.amount_fen for t in b.transfers.values() if t.state in IN_DOUBT)
        b_posted = sum(
            t.amount_fen for t in b.transfers.values() if t.state is ReceiverState.COMMITTED
        )
        if (q.credits_pending, q.credits_posted) != (b_held, b_posted):
            self.fail(f"B ledger {q} disagrees with B states: held {b_held}, posted {b_posted}")
        if q.credits_posted > a.ledger.accounts["due_to"].credits_posted:
            self.fail("B's spendable quota exceeds what A froze for it")
        for tid, bt in b.transfers.items():
            at = a.transfers.get(tid)
            if at is None or at.state is GiverState.REJECTED:
                self.fail(f"B has {tid} that A never prepared")
            assert at is not None
            if bt.state is ReceiverState.COMMITTED and at.state is not GiverState.COMMITTED:
                self.fail(f"B committed {tid} but A is {at.state}")
            if at.state is GiverState.COMMITTED and bt.state not in (
                ReceiverState.ACCEPTED,
                ReceiverState.COMMITTED,
            ):
                self.fail(f"A committed {tid} without B's binding ACCEPT (B is {bt.state})")
        for tid, at in a.transfers.items():
            if at.state is GiverState.COMMITTED and tid not in b.transfers:
                self.fail(f"A committed {tid} that B never saw")
            if (
                at.decision is not None
                and at.state is GiverState.COMMITTED
                and at.decision.decided_at_ms > at.decide_by_ms
            ):
                self.fail(f"A committed {tid} after its deadline (RULES 12)")
        for node in (a, b):
            bad = [al for al in node.alerts if al.kind not in ALLOWED_ALERTS]
            if bad:
                self.fail(f"{node.name} raised {bad}")
        if any(m.typ is MessageType.ERROR for m in self.in_flight):
            self.fail(
                f"an ERROR reply was sent: {[m for m in self.in_flight if m.typ is MessageType.ERROR]}"
            )

    def heal(self) -> None:
        """Stop faults, let every deadline pass, and run workers until nothing moves."""
        for node in (self.a, self.b):
            node.up = True
        self.advance(26 * HOUR_MS)
        self.note("heal: +26 h, no more faults")
        for _ in range(HEAL_ROUNDS_MAX):
            self.sweep()
            self.resolve()
            self.outbox_tick(A)
            self.outbox_tick(B)
            while self.in_flight:
                self.deliver(0)
                self.check()
            self.advance(60_000)
            active = [k for k, (_, done) in self.a.outbox.items() if not done]
            active += [k for k, (_, done) in self.b.outbox.items() if not done]
            in_doubt = [k for k, t in self.b.transfers.items() if t.state in IN_DOUBT]
            if not active and not in_doubt:
                return
        self.fail(f"no quiescence after healing: outbox {active}, in doubt {in_doubt}")

    def check_at_rest(self) -> None:
        """After healing: both sides agree on every transfer; nothing is held or queued."""
        for tid, at in self.a.transfers.items():
            bt = self.b.transfers.get(tid)
            b_state = bt.state if bt is not None else None
            if at.state is GiverState.PREPARED_A:
                self.fail(f"{tid} still PREPARED_A long after its deadline")
            if at.state is GiverState.REJECTED and bt is not None:
                self.fail(f"rejected {tid} reached B")
            if (at.state is GiverState.COMMITTED) != (b_state is ReceiverState.COMMITTED):
                self.fail(f"at rest A is {at.state} but B is {b_state} for {tid}")
            if at.state is GiverState.ABORTED and b_state not in (
                ReceiverState.ABORTED,
                ReceiverState.DECLINED,
                None,
            ):
                self.fail(f"A aborted {tid} but B is {b_state}")
            if at.state in giver.DECIDED and not at.acked:
                self.fail(f"A's decision for {tid} was never acknowledged")
        for node in (self.a, self.b):
            if any(
                acc.debits_pending or acc.credits_pending for acc in node.ledger.accounts.values()
            ):
                self.fail(f"{node.name} still holds pending amounts at rest")
        if (
            self.a.ledger.accounts["due_to"].credits_posted
            != self.b.ledger.accounts["due_from"].debits_posted
        ):
            self.fail("due_to:B at A and due_from:A at B disagree at rest")

    def check_replay(self) -> None:
        """Replaying every delivered message changes nothing; replaying every message ever
        sent (dropped ones too) changes no balance, outcome or outbox row."""
        before = (self.a.full(), self.b.full())
        for msg in list(self.processed):
            self._replay(msg)
        if (self.a.full(), self.b.full()) != before:
            self.fail("replaying the delivered messages changed state")
        observable = (self.a.observable(), self.b.observable())
        for msg in list(self.log):
            self._replay(msg)
        if (self.a.observable(), self.b.observable()) != observable:
            self.fail("replaying every message ever sent changed balances, outcomes or the outbox")
        self.check()

    def _replay(self, msg: Msg) -> None:
        handled = self.handle(msg)
        if handled is not None:
            node, tx, _ = handled
            self.commit(node, tx)


# --- the seeded scheduler ----------------------------------------------------------------

FATES = ["ok"] * 80 + ["drop"] * 7 + ["dup"] * 6 + ["crash_before"] * 3 + ["crash_after"] * 4


def random_action(world: World) -> None:
    """One scheduler step, chosen by the world's RNG."""
    rng = world.rng
    roll = rng.randrange(100)
    if roll < 8:
        world.instruct(rng.randint(1, 50) * 1_000)
    elif roll < 45:
        world.deliver(rng.randrange(1 << 30), rng.choice(FATES))
    elif roll < 53:
        world.outbox_tick(rng.choice([A, B]))
    elif roll < 57:
        world.sweep()
    elif roll < 61:
        world.resolve()
    elif roll < 69:
        world.receiver_acts(
            rng.randrange(1 << 30), rng.choice(["accept"] * 14 + ["decline"] * 5 + ["end"])
        )
    elif roll < 85:
        kind = rng.randrange(20)
        if kind < 12:
            world.advance(rng.randrange(0, 5_000))
        elif kind < 19:
            world.advance(rng.randrange(60_000, 1_800_000))
        else:
            world.advance(rng.randrange(HOUR_MS, 12 * HOUR_MS))  # often across 06:00
    elif roll < 88:
        world.skew(rng.choice([A, B]), rng.randrange(-CLOCK_SKEW_MS_MAX, CLOCK_SKEW_MS_MAX + 1))
    elif roll < 95:
        world.restart(rng.choice([A, B]))
    elif roll < 97:
        world.client_retry(rng.randrange(1 << 30))
    elif world.envelopes and roll < 98:
        name = rng.choice([A, B])
        if len(world.signing[name]) < 3:
            world.rotate_key(name)


def run_seed(seed: int, *, steps: int = 150, envelopes: bool | None = None) -> World:
    """Run one seed: random actions with checks after each, then heal, rest and replay checks.

    Every 20th seed uses real envelopes (Ed25519, both wire forms, key rotation).
    """
    world = World(
        seed, envelopes=(seed % 20 == 0) if envelopes is None else envelopes, transfers=3 + seed % 4
    )
    for _ in range(steps):
        random_action(world)
        world.check()
    world.heal()
    world.check_at_rest()
    world.check_replay()
    return world
