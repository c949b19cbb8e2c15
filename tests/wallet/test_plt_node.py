"""A node's PLT/1 identity: keys on disk, rotation and revocation, sealing, opening with one
key set refresh, routing by province. No database and no network: peers are in memory and
HTTP is an httpx MockTransport."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import msgspec
import pytest

from protocol.directory import PeerDirectory
from protocol.envelope import encode_batch, encode_envelope
from protocol.errors import (
    BadKeySet,
    BadSignature,
    ErrorClass,
    UnknownKey,
    UnknownPeer,
    WrongRecipient,
)
from protocol.messages import MessageType, RelEnd, encode_body
from wallet.plt.node import (
    KEYSET_PATH,
    NodeKeys,
    PltNode,
    init_keys,
    revoke,
    rotate,
    write_directory,
)
from wallet.plt.transport import join_batch, split_batch

T0 = 1_773_540_000_000  # 2026-03-15 02:00 UTC
HOUR = 3_600_000
RELATION_ID = "019cf45f-1d00-703b-8ebf-f0c2c5ff3d41"
END = RelEnd(relation_id=RELATION_ID, ended_by="giver", reason="test", ended_at_ms=T0)


def pair(a_keys: NodeKeys | None = None, b_keys: NodeKeys | None = None) -> tuple[PltNode, PltNode]:
    """Two nodes that list each other, key sets installed."""
    a_keys = a_keys or NodeKeys.generate("prov-13", T0)
    b_keys = b_keys or NodeKeys.generate("prov-31", T0)
    a_dir = PeerDirectory([b_keys.peer_entry("http://b.test")])
    b_dir = PeerDirectory([a_keys.peer_entry("http://a.test")])
    a_dir.install("prov-31", b_keys.document)
    b_dir.install("prov-13", a_keys.document)
    return PltNode(a_keys, a_dir), PltNode(b_keys, b_dir)


def serving(node: PltNode, fetches: list[str]) -> httpx.AsyncClient:
    """An HTTP client whose every GET of a key set is answered by `node`."""

    def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(str(request.url))
        assert request.url.path == KEYSET_PATH
        return httpx.Response(200, content=msgspec.json.encode(node.keys.document))

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


# --- keys on disk ----------------------------------------------------------------------------


def test_init_writes_private_keys_readable_by_the_owner_only_and_load_reads_them(
    tmp_path: Path,
) -> None:
    keys = init_keys(tmp_path / "keys", "prov-13", T0)
    loaded = NodeKeys.load(tmp_path / "keys")
    assert loaded.node_id == "prov-13"
    assert loaded.root.public_b64 == keys.root.public_b64
    assert loaded.keyset == keys.keyset
    assert loaded.current(T0).kid == keys.current(T0).kid == "prov-13/2026-03-1"
    for pem in [tmp_path / "keys" / "root.pem", *(tmp_path / "keys" / "node").glob("*.pem")]:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600


def test_init_refuses_to_overwrite_existing_keys(tmp_path: Path) -> None:
    init_keys(tmp_path, "prov-13", T0)
    with pytest.raises(FileExistsError):
        init_keys(tmp_path, "prov-13", T0)


def test_rotation_publishes_the_new_key_at_once_and_signs_with_it_after_activation(
    tmp_path: Path,
) -> None:
    init_keys(tmp_path, "prov-13", T0)
    keys = rotate(tmp_path, T0 + HOUR)
    assert keys.keyset.seq == 2
    assert [k.kid for k in keys.keyset.keys] == ["prov-13/2026-03-1", "prov-13/2026-03-2"]
    assert keys.current(T0 + 2 * HOUR).kid == "prov-13/2026-03-1"  # not active for 24 h
    assert keys.current(T0 + 25 * HOUR).kid == "prov-13/2026-03-2"
    assert NodeKeys.load(tmp_path).keyset == keys.keyset


def test_revocation_is_recorded_in_the_keyset_and_the_key_is_kept(tmp_path: Path) -> None:
    init_keys(tmp_path, "prov-13", T0)
    rotate(tmp_path, T0, activate_after_ms=0, retire_after_ms=HOUR)
    keys = revoke(tmp_path, "prov-13/2026-03-1", T0 + 10)
    old = keys.keyset.record("prov-13/2026-03-1")
    assert old.revoked_at_ms == T0 + 10
    assert keys.current(T0 + 20).kid == "prov-13/2026-03-2"
    assert "prov-13/2026-03-1" in NodeKeys.load(tmp_path).signing_keys


def test_a_private_key_that_does_not_match_the_keyset_is_refused(tmp_path: Path) -> None:
    init_keys(tmp_path, "prov-13", T0)
    other = NodeKeys.generate("prov-13", T0)
    kid_file = tmp_path / "node" / "2026-03-1.pem"
    kid_file.write_bytes(other.signing_keys["prov-13/2026-03-1"].to_pem())
    with pytest.raises(BadKeySet):
        NodeKeys.load(tmp_path)


# --- sealing and opening ---------------------------------------------------------------------


async def test_an_envelope_sealed_by_one_node_opens_at_the_other_with_the_same_body() -> None:
    a, b = pair()
    env = a.seal(MessageType.REL_END, "prov-31", encode_body(END), T0)
    opened = await b.open(encode_envelope(env, "msgpack"), T0 + 5)
    assert opened.body == END
    assert (opened.envelope.from_node, opened.envelope.kid) == ("prov-13", "prov-13/2026-03-1")


async def test_an_envelope_for_another_node_is_refused_as_wrong_recipient() -> None:
    a, b = pair()
    env = a.seal(MessageType.REL_END, "prov-51", END, T0)
    with pytest.raises(WrongRecipient):
        await b.open(env, T0)


async def test_a_tampered_body_is_a_bad_signature() -> None:
    a, b = pair()
    env = a.seal(MessageType.REL_END, "prov-31", END, T0)
    forged = msgspec.structs.replace(
        env, body=encode_body(msgspec.structs.replace(END, reason="other"))
    )
    with pytest.raises(BadSignature):
        await b.open(forged, T0)


async def test_an_unknown_kid_is_learnt_with_exactly_one_keyset_fetch() -> None:
    a, b = pair()
    a.keys = a.keys.rotated(T0, activate_after_ms=0)
    fetches: list[str] = []
    b._http = serving(a, fetches)
    env = a.seal(MessageType.REL_END, "prov-31", END, T0 + 1)
    assert env.kid == "prov-13/2026-03-2"
    opened = await b.open(env, T0 + 2)
    assert opened.body == END
    assert fetches == ["http://a.test/plt/v1/keyset"]
    assert b.directory.keyset("prov-13") == a.keys.keyset
    assert b.keyset_document("prov-13") == a.keys.document


async def test_another_key_under_a_known_kid_is_a_bad_signature() -> None:
    _, b = pair()
    impostor = PltNode(NodeKeys.generate("prov-13", T0), PeerDirectory([]))
    env = impostor.seal(MessageType.REL_END, "prov-31", END, T0)
    assert env.kid == "prov-13/2026-03-1"  # the kid b knows, with another private key
    with pytest.raises(BadSignature) as caught:
        await b.open(env, T0)
    assert caught.value.code == 3105


async def test_an_unknown_kid_when_the_peer_is_unreachable_stays_temporary() -> None:
    a, b = pair()
    a.keys = a.keys.rotated(T0, activate_after_ms=0)
    b._http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(503)))
    env = a.seal(MessageType.REL_END, "prov-31", END, T0 + 1)
    with pytest.raises(UnknownKey) as caught:
        await b.open(env, T0 + 2)
    assert caught.value.error_class is ErrorClass.T


async def test_a_kid_still_unknown_after_the_refresh_is_final() -> None:
    a, b = pair()
    b._http = serving(a, [])
    ghost = msgspec.structs.replace(
        a.seal(MessageType.REL_END, "prov-31", END, T0), kid="prov-13/2026-03-9"
    )
    with pytest.raises(UnknownKey) as caught:
        await b.open(ghost, T0)
    assert caught.value.error_class is ErrorClass.F


async def test_a_refreshed_keyset_is_kept_on_disk_and_read_back(tmp_path: Path) -> None:
    a, _ = pair()
    b_keys = NodeKeys.generate("prov-31", T0)
    b_keys.save(tmp_path / "keys")
    write_directory(tmp_path / "dir", [a.keys.peer_entry("http://a.test")])
    b = PltNode.from_files(tmp_path / "keys", tmp_path / "dir", http=serving(a, []))
    await b.refresh_keyset("prov-13", T0)
    again = PltNode.from_files(tmp_path / "keys", tmp_path / "dir")
    assert again.directory.keyset("prov-13") == a.keys.keyset
    assert again.keyset_document("prov-13") == a.keys.document


# --- routing ---------------------------------------------------------------------------------


def test_a_province_routes_to_its_peer_node_and_unknown_provinces_are_refused() -> None:
    a, _ = pair()
    assert a.node_for_province("310000") == "prov-31"
    assert a.province_of("prov-31") == "310000"
    for code in ("440000", "130000", "31000", "prov-31"):
        with pytest.raises(UnknownPeer):
            a.node_for_province(code)


def test_an_explicit_region_entry_names_a_node_outside_the_convention() -> None:
    xpcc = NodeKeys.generate("xpcc", T0)
    a = PltNode(
        NodeKeys.generate("prov-13", T0),
        PeerDirectory([xpcc.peer_entry("http://x.test")]),
        regions={"660000": "xpcc"},
    )
    assert a.node_for_province("660000") == "xpcc"


# --- batches on the wire ---------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["json", "msgpack"])
@pytest.mark.parametrize("count", [0, 1, 15, 16, 256])
def test_a_batch_joined_from_item_bytes_is_the_encoded_batch(wire: str, count: int) -> None:
    a, _ = pair()
    envs = [a.seal(MessageType.REL_END, "prov-31", END, T0 + i) for i in range(count)]
    items = [encode_envelope(e, wire) for e in envs]  # type: ignore[arg-type]
    joined = join_batch(items, wire)  # type: ignore[arg-type]
    assert joined == encode_batch(envs, wire)  # type: ignore[arg-type]
    assert split_batch(joined, wire) == items  # type: ignore[arg-type]
