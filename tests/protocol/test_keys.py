"""Node keys, keysets, rotation, revocation and the peer directory (PROTOCOL b.11)."""

from pathlib import Path

import msgspec
import pytest

from protocol.directory import Peer, PeerDirectory, encode_peers, load_directory
from protocol.errors import BadKeySet, ExpiredKey, RevokedKey, UnknownKey, UnknownPeer
from protocol.keys import (
    DAY_MS,
    KeySet,
    SigningKey,
    b64url_encode,
    initial_keyset,
    new_kid,
    open_keyset_document,
    revoke_key,
    rotate_keyset,
    sign_keyset,
)
from tests.protocol.factories import T0_MS, A, B, keyset_of, node_key, root_key


def peer(node: str) -> Peer:
    root = root_key(node)
    return Peer(
        node=node,
        url=f"http://127.0.0.1:80{node[-2:]}",
        root_kid=root.kid,
        root_pub=root.public_b64,
    )


def test_key_ids_count_up_within_a_utc_month() -> None:
    assert new_kid("prov-13", T0_MS) == "prov-13/2026-03-1"
    assert (
        new_kid("prov-13", T0_MS, ["prov-13/2026-03-1", "prov-13/2026-03-2", "prov-13/2026-02-7"])
        == "prov-13/2026-03-3"
    )


def test_private_key_round_trips_through_pem_with_its_kid() -> None:
    key = node_key(A)
    loaded = SigningKey.from_pem(key.to_pem())
    assert (loaded.kid, loaded.seed, loaded.public_b64) == (key.kid, key.seed, key.public_b64)


def test_plain_pem_needs_the_kid_given() -> None:
    pem = node_key(A).to_pem().split(b"\n", 1)[1]
    with pytest.raises(ValueError):
        SigningKey.from_pem(pem)
    assert SigningKey.from_pem(pem, kid="prov-11/2026-03-9").kid == "prov-11/2026-03-9"


def test_keyset_refuses_a_kid_of_another_node() -> None:
    with pytest.raises(ValueError):
        KeySet(node=A, seq=1, keys=(node_key(B).record(not_before_ms=T0_MS),))


def test_rotation_publishes_the_new_key_a_day_ahead_and_retires_the_old_in_seven_days() -> None:
    old, new = node_key(A, 1), node_key(A, 2)
    rotated = rotate_keyset(initial_keyset(A, old, T0_MS), new, T0_MS + 10)
    assert rotated.seq == 2
    assert rotated.record(old.kid).not_after_ms == T0_MS + 10 + 7 * DAY_MS
    assert rotated.record(new.kid).not_before_ms == T0_MS + 10 + DAY_MS
    assert rotated.signing_kid(T0_MS + 10 + DAY_MS - 1) == old.kid
    assert rotated.signing_kid(T0_MS + 10 + DAY_MS) == new.kid


def test_old_key_verifies_until_not_after_then_is_expired() -> None:
    old, new = node_key(A, 1), node_key(A, 2)
    rotated = rotate_keyset(initial_keyset(A, old, T0_MS), new, T0_MS)
    rotated.verifying_key(old.kid, T0_MS + 7 * DAY_MS)
    with pytest.raises(ExpiredKey):
        rotated.verifying_key(old.kid, T0_MS + 7 * DAY_MS + 1)


def test_revoked_key_is_refused_from_revoked_at_and_accepted_before() -> None:
    keyset = revoke_key(keyset_of(A), node_key(A).kid, T0_MS + 1_000)
    keyset.verifying_key(node_key(A).kid, T0_MS + 999)
    with pytest.raises(RevokedKey):
        keyset.verifying_key(node_key(A).kid, T0_MS + 1_000)


def test_unknown_kid_raises_unknown_key_naming_node_and_kid() -> None:
    with pytest.raises(UnknownKey) as caught:
        keyset_of(A).verifying_key("prov-11/2030-01-1", T0_MS)
    assert (caught.value.node, caught.value.kid) == (A, "prov-11/2030-01-1")


def test_keyset_document_opens_with_the_pinned_root() -> None:
    doc = sign_keyset(keyset_of(A), root_key(A))
    root = root_key(A)
    assert open_keyset_document(
        doc, root_kid=root.kid, root_pub=root.public_b64, expected_node=A
    ) == keyset_of(A)


@pytest.mark.parametrize("field", ["keyset_bytes", "sig"])
def test_keyset_document_with_a_flipped_bit_is_refused(field: str) -> None:
    doc = sign_keyset(keyset_of(A), root_key(A))
    raw = bytearray(getattr(doc, field))
    raw[len(raw) // 2] ^= 0x01
    root = root_key(A)
    with pytest.raises(BadKeySet):
        open_keyset_document(
            msgspec.structs.replace(doc, **{field: bytes(raw)}),
            root_kid=root.kid,
            root_pub=root.public_b64,
            expected_node=A,
        )


def test_keyset_signed_by_another_nodes_root_is_refused() -> None:
    doc = sign_keyset(keyset_of(B), root_key(B))
    root = root_key(A)
    with pytest.raises(BadKeySet):
        open_keyset_document(doc, root_kid=root.kid, root_pub=root.public_b64, expected_node=A)


def test_directory_installs_a_keyset_and_serves_keys() -> None:
    directory = PeerDirectory([peer(A), peer(B)])
    directory.install(A, sign_keyset(keyset_of(A), root_key(A)))
    public = directory.verifying_key(A, node_key(A).kid, T0_MS)
    assert b64url_encode(public.public_bytes_raw()) == node_key(A).public_b64
    assert directory.keyset(A) == keyset_of(A)


def test_directory_without_a_cached_keyset_raises_unknown_key_so_the_caller_fetches_it() -> None:
    with pytest.raises(UnknownKey):
        PeerDirectory([peer(A)]).verifying_key(A, node_key(A).kid, T0_MS)


def test_directory_refuses_nodes_it_does_not_list() -> None:
    with pytest.raises(UnknownPeer):
        PeerDirectory([peer(A)]).verifying_key("prov-99", "prov-99/2026-03-1", T0_MS)


def test_directory_refuses_an_older_keyset_so_a_revocation_cannot_be_rolled_back() -> None:
    directory = PeerDirectory([peer(A)])
    first = keyset_of(A)
    revoked = revoke_key(first, node_key(A).kid, T0_MS)
    directory.install(A, sign_keyset(revoked, root_key(A)))
    with pytest.raises(BadKeySet):
        directory.install(A, sign_keyset(first, root_key(A)))


def test_directory_refuses_two_different_keysets_with_the_same_seq() -> None:
    directory = PeerDirectory([peer(A)])
    directory.install(A, sign_keyset(keyset_of(A), root_key(A)))
    with pytest.raises(BadKeySet):
        directory.install(A, sign_keyset(keyset_of(A, now_ms=T0_MS + 1), root_key(A)))


def test_load_directory_reads_peers_and_verified_keysets(tmp_path: Path) -> None:
    (tmp_path / "peers.json").write_bytes(encode_peers([peer(A), peer(B)]))
    (tmp_path / "keysets").mkdir()
    doc = sign_keyset(keyset_of(B), root_key(B))
    (tmp_path / "keysets" / f"{B}.json").write_bytes(msgspec.json.encode(doc))
    directory = load_directory(tmp_path)
    assert directory.nodes == [A, B]
    assert directory.keyset(B) == keyset_of(B)
    assert directory.keyset(A) is None
