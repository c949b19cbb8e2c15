"""The peer directory: which province nodes exist, where they listen, their pinned root keys,
and the keysets last fetched from them.

The directory is an in-memory cache; it does no I/O. The node layer fetches
`GET /plt/v1/keyset` from a peer and calls `install`, every 10 minutes and once more when
`open_envelope` raises UnknownKey. `load_directory(path)` is the one helper that reads files.

Folder layout read by `load_directory`::

    <path>/peers.json            [{"node", "url", "root_kid", "root_pub"}, ...]
    <path>/keysets/<node>.json   a KeySetDocument as JSON (optional, one per node)
"""

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import BadKeySet, UnknownKey, UnknownPeer
from protocol.keys import (
    B64URL_KEY_PATTERN,
    KeyId,
    KeySet,
    KeySetDocument,
    NodeId,
    open_keyset_document,
)

PEERS_MAX = 128  # 31 provinces plus the XPCC and test nodes; a bound, not a forecast


class Peer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One province node: its registry id, base URL and pinned offline root key."""

    node: NodeId
    url: Annotated[str, msgspec.Meta(max_length=512)]
    root_kid: KeyId
    root_pub: Annotated[str, msgspec.Meta(pattern=B64URL_KEY_PATTERN)]


_peers_decoder = msgspec.json.Decoder(list[Peer])
_doc_decoder = msgspec.json.Decoder(KeySetDocument)


class PeerDirectory:
    """Peers by node id and their verified keysets; `verifying_key` is an envelope KeyLookup."""

    def __init__(self, peers: Iterable[Peer]) -> None:
        self._peers: dict[str, Peer] = {}
        for peer in peers:
            if peer.node in self._peers:
                raise ValueError(f"peer {peer.node!r} listed twice")
            self._peers[peer.node] = peer
        if len(self._peers) > PEERS_MAX:
            raise ValueError(f"more than {PEERS_MAX} peers")
        self._keysets: dict[str, KeySet] = {}

    @property
    def nodes(self) -> list[str]:
        """Every node id in the directory, sorted."""
        return sorted(self._peers)

    def peer(self, node: str) -> Peer:
        """The peer `node`, or UnknownPeer."""
        try:
            return self._peers[node]
        except KeyError:
            raise UnknownPeer(f"node {node!r} is not in the peer directory", node=node) from None

    def keyset(self, node: str) -> KeySet | None:
        """The keyset last installed for `node`, if any."""
        return self._keysets.get(node)

    def install(self, node: str, doc: KeySetDocument) -> KeySet:
        """Verify `doc` against `node`'s pinned root and cache it; returns the cached keyset.

        A document older than the cached one (lower `seq`) is refused, so a replayed old
        keyset cannot resurrect a revoked key; the same `seq` with other bytes is refused too.
        """
        peer = self.peer(node)
        keyset = open_keyset_document(
            doc, root_kid=peer.root_kid, root_pub=peer.root_pub, expected_node=node
        )
        current = self._keysets.get(node)
        if current is not None:
            if keyset.seq < current.seq:
                raise BadKeySet(
                    f"keyset seq {keyset.seq} is older than cached {current.seq}", node=node
                )
            if keyset.seq == current.seq and keyset != current:
                raise BadKeySet(f"two different keysets with seq {keyset.seq}", node=node)
        self._keysets[node] = keyset
        return keyset

    def verifying_key(self, node: str, kid: str, at_ms: int) -> Ed25519PublicKey:
        """Public key for an envelope from `node` signed with `kid`, received at `at_ms`.

        Raises UnknownPeer, UnknownKey (no keyset cached yet, or kid not in it: refresh once),
        RevokedKey or ExpiredKey.
        """
        self.peer(node)
        keyset = self._keysets.get(node)
        if keyset is None:
            raise UnknownKey(f"no keyset cached for {node!r}", node=node, kid=kid)
        return keyset.verifying_key(kid, at_ms)


def encode_peers(peers: Iterable[Peer]) -> bytes:
    """JSON for `peers.json` (the caller writes it)."""
    return msgspec.json.format(msgspec.json.encode(list(peers)), indent=2)


def load_directory(path: str | os.PathLike[str]) -> PeerDirectory:
    """Read `peers.json` and any `keysets/<node>.json` under `path` into a PeerDirectory.

    Every keyset is verified against its peer's pinned root; a bad one raises BadKeySet.
    """
    root = Path(path)
    directory = PeerDirectory(_peers_decoder.decode((root / "peers.json").read_bytes()))
    keysets = root / "keysets"
    if keysets.is_dir():
        for file in sorted(keysets.glob("*.json")):
            directory.install(file.stem, _doc_decoder.decode(file.read_bytes()))
    return directory
