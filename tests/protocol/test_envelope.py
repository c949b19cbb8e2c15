"""Signed envelopes (PROTOCOL b.3): what is accepted, and every way a change is refused."""

import msgspec
import pytest

from protocol.directory import Peer, PeerDirectory
from protocol.envelope import (
    Envelope,
    Wire,
    created_at_skew_ms,
    decode_batch,
    decode_envelope,
    encode_batch,
    encode_envelope,
    open_envelope,
    seal,
)
from protocol.errors import (
    BadSignature,
    MalformedMessage,
    ProtocolError,
    RevokedKey,
    SignatureError,
    UnknownKey,
    WrongRecipient,
)
from protocol.keys import revoke_key, rotate_keyset, sign_keyset
from protocol.messages import MessageType, body_hash, encode_body
from tests.protocol.factories import (
    T0_MS,
    A,
    B,
    C,
    fixed_id,
    keyset_of,
    make_accept,
    make_prepare,
    node_key,
    root_key,
)

PREPARE = make_prepare()
ACCEPT = make_accept(PREPARE)
KEY_A = node_key(A)
MSG_ID = fixed_id(42)
RECV_MS = T0_MS + 150


def peer(node: str) -> Peer:
    root = root_key(node)
    return Peer(node=node, url="http://127.0.0.1:8000", root_kid=root.kid, root_pub=root.public_b64)


def directory_at_b() -> PeerDirectory:
    directory = PeerDirectory([peer(A), peer(B), peer(C)])
    for node in (A, B, C):
        directory.install(node, sign_keyset(keyset_of(node), root_key(node)))
    return directory


def prepare_envelope() -> Envelope:
    return seal(PREPARE, MessageType.PREPARE, A, B, KEY_A, T0_MS, msg_id=MSG_ID)


def open_at_b(
    raw: bytes | Envelope, directory: PeerDirectory | None = None, now_ms: int = RECV_MS
) -> object:
    d = directory if directory is not None else directory_at_b()
    return open_envelope(raw, B, d.verifying_key, now_ms)


# --- acceptance ---------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_sealed_envelope_opens_at_the_recipient_with_the_same_body(wire: Wire) -> None:
    env = prepare_envelope()
    opened = open_envelope(encode_envelope(env, wire), B, directory_at_b().verifying_key, RECV_MS)
    assert opened.envelope == env
    assert opened.body == PREPARE
    assert (env.v, env.typ, env.from_node, env.to_node, env.kid, env.created_at_ms) == (
        1,
        "PREPARE",
        A,
        B,
        KEY_A.kid,
        T0_MS,
    )
    assert env.body == encode_body(PREPARE)


def test_json_wire_carries_body_and_sig_as_base64_strings() -> None:
    wire = msgspec.json.decode(encode_envelope(prepare_envelope(), "json"))
    assert isinstance(wire["body"], str) and isinstance(wire["sig"], str)


def test_outbox_bytes_keep_their_hash_when_signed_again_with_a_new_key() -> None:
    raw = encode_body(PREPARE)
    first = seal(raw, MessageType.PREPARE, A, B, KEY_A, T0_MS)
    retry = seal(raw, MessageType.PREPARE, A, B, node_key(A, 2), T0_MS + 86_400_000)
    assert body_hash(first.body) == body_hash(retry.body) and first.sig != retry.sig


def test_seal_refuses_a_body_of_another_type() -> None:
    with pytest.raises(ValueError):
        seal(PREPARE, MessageType.ACCEPT, A, B, KEY_A, T0_MS)


def test_seal_refuses_to_sign_for_another_node() -> None:
    with pytest.raises(ValueError):
        seal(PREPARE, MessageType.PREPARE, C, B, KEY_A, T0_MS)


def test_created_at_skew_is_the_absolute_difference() -> None:
    assert created_at_skew_ms(prepare_envelope(), T0_MS - 61_000) == 61_000


# --- tampering ----------------------------------------------------------------------------


def flip(raw: bytes, i: int) -> bytes:
    out = bytearray(raw)
    out[i] ^= 0x01
    return bytes(out)


def test_flipping_any_bit_of_the_body_fails_the_signature() -> None:
    env = prepare_envelope()
    directory = directory_at_b()
    for i in range(len(env.body)):
        with pytest.raises(BadSignature):
            open_at_b(msgspec.structs.replace(env, body=flip(env.body, i)), directory)


def test_flipping_any_bit_of_the_signature_fails() -> None:
    env = prepare_envelope()
    directory = directory_at_b()
    for i in range(len(env.sig)):
        with pytest.raises(BadSignature):
            open_at_b(msgspec.structs.replace(env, sig=flip(env.sig, i)), directory)


@pytest.mark.parametrize(
    "changes",
    [
        {"msg_id": fixed_id(43)},
        {"created_at_ms": T0_MS + 1},
        {"to_node": C},  # the signature binds the recipient: no replay to another node
        {"typ": MessageType.ACCEPT},  # ... nor as another type
        {"kid": "prov-11/2026-03-2"},
        {"from_node": C},  # C's keyset has no kid of A
    ],
    ids=["msg_id", "created_at_ms", "to_node", "typ", "kid", "from_node"],
)
def test_changing_any_header_field_is_refused(changes: dict[str, object]) -> None:
    directory = directory_at_b()
    other = node_key(A, 2)
    directory.install(A, sign_keyset(rotate_keyset(keyset_of(A), other, T0_MS), root_key(A)))
    env = msgspec.structs.replace(prepare_envelope(), **changes)
    with pytest.raises(SignatureError):
        open_at_b(env, directory)


def test_replaying_an_accept_as_a_decline_fails_the_signature() -> None:
    env = seal(ACCEPT, MessageType.ACCEPT, A, B, KEY_A, T0_MS)
    with pytest.raises(BadSignature):
        open_at_b(msgspec.structs.replace(env, typ=MessageType.DECLINE))


def test_other_protocol_version_is_malformed() -> None:
    with pytest.raises(MalformedMessage):
        open_at_b(msgspec.structs.replace(prepare_envelope(), v=2))


def test_envelope_for_another_node_is_refused_as_wrong_recipient() -> None:
    env = seal(PREPARE, MessageType.PREPARE, A, C, KEY_A, T0_MS)
    with pytest.raises(WrongRecipient) as caught:
        open_at_b(env)
    assert (caught.value.expected, caught.value.got) == (B, C)


def test_validly_signed_body_that_is_not_the_body_of_its_typ_is_malformed() -> None:
    env = seal(encode_body(ACCEPT), MessageType.PREPARE, A, B, KEY_A, T0_MS)
    with pytest.raises(MalformedMessage):
        open_at_b(env)


def test_no_single_byte_change_of_the_msgpack_wire_form_is_accepted_as_different_content() -> None:
    env = prepare_envelope()
    raw = encode_envelope(env, "msgpack")
    directory = directory_at_b()
    for i in range(len(raw)):
        try:
            opened = open_envelope(
                flip(raw, i), B, directory.verifying_key, RECV_MS, wire="msgpack"
            )
        except ProtocolError:
            continue
        # Only a change the signature cannot see (e.g. an integer re-typed) may pass.
        assert opened.envelope == env


# --- keys ---------------------------------------------------------------------------------


def test_unknown_kid_raises_unknown_key_and_one_keyset_refresh_lets_it_through() -> None:
    directory = directory_at_b()
    new_key = node_key(A, 2)
    rotated = rotate_keyset(
        keyset_of(A), new_key, T0_MS, activate_after_ms=0 + 1, retire_after_ms=10
    )
    env = seal(PREPARE, MessageType.PREPARE, A, B, new_key, T0_MS + 5)
    with pytest.raises(UnknownKey) as caught:
        open_at_b(env, directory)
    assert (caught.value.node, caught.value.kid) == (A, new_key.kid)
    directory.install(caught.value.node, sign_keyset(rotated, root_key(A)))  # the caller's fetch
    assert open_at_b(env, directory).body == PREPARE  # type: ignore[attr-defined]


def test_envelope_received_before_revocation_is_accepted_and_after_is_rejected() -> None:
    directory = directory_at_b()
    directory.install(
        A, sign_keyset(revoke_key(keyset_of(A), KEY_A.kid, T0_MS + 1_000), root_key(A))
    )
    env = prepare_envelope()
    assert open_at_b(env, directory, now_ms=T0_MS + 999).body == PREPARE  # type: ignore[attr-defined]
    with pytest.raises(RevokedKey):
        open_at_b(env, directory, now_ms=T0_MS + 1_000)


def test_rotation_lets_old_and_new_keys_verify_during_the_overlap() -> None:
    directory = directory_at_b()
    new_key = node_key(A, 2)
    rotated = rotate_keyset(keyset_of(A), new_key, T0_MS)
    directory.install(A, sign_keyset(rotated, root_key(A)))
    switch_ms = rotated.record(new_key.kid).not_before_ms
    old_env = seal(PREPARE, MessageType.PREPARE, A, B, KEY_A, switch_ms - 1)
    new_env = seal(PREPARE, MessageType.PREPARE, A, B, new_key, switch_ms)
    assert (
        rotated.signing_kid(switch_ms - 1) == KEY_A.kid
        and rotated.signing_kid(switch_ms) == new_key.kid
    )
    assert open_at_b(old_env, directory, now_ms=switch_ms + 1).body == PREPARE  # type: ignore[attr-defined]
    assert open_at_b(new_env, directory, now_ms=switch_ms + 1).body == PREPARE  # type: ignore[attr-defined]


# --- batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_batch_round_trips_in_order(wire: Wire) -> None:
    envs = [prepare_envelope(), seal(ACCEPT, MessageType.ACCEPT, A, B, KEY_A, T0_MS)]
    assert decode_batch(encode_batch(envs, wire)) == envs


def test_a_bad_item_in_a_batch_is_reported_in_its_position_only() -> None:
    good = msgspec.json.decode(encode_envelope(prepare_envelope()))
    raw = msgspec.json.encode([good, {"v": 1, "typ": "NOPE"}, good])
    items = decode_batch(raw, "json")
    assert isinstance(items[0], Envelope) and isinstance(items[2], Envelope)
    assert isinstance(items[1], MalformedMessage)


def test_batch_longer_than_256_is_refused_whole() -> None:
    good = msgspec.json.decode(encode_envelope(prepare_envelope()))
    with pytest.raises(MalformedMessage):
        decode_batch(msgspec.json.encode([good] * 257))


def test_unreadable_bytes_are_malformed() -> None:
    with pytest.raises(MalformedMessage):
        decode_envelope(b"{not json")
    with pytest.raises(MalformedMessage):
        decode_batch(b"\xc1")
