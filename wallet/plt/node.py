"""This node's identity on the PLT/1 network: its keys, its peers, sealing and opening.

`NodeKeys` is the node's offline root key, every node signing key it ever made, and the
root-signed key set that publishes their public halves (PROTOCOL b.11). On disk, under a
keys folder (private keys are PEM files readable by the owner only)::

    <keys_dir>/root.pem             the root key (offline in production; signs key sets)
    <keys_dir>/node/<n>.pem         one node signing key per file, `PLT-Key-Id:` line first
    <keys_dir>/keyset.json          the current KeySetDocument (what GET /plt/v1/keyset serves)

`PltNode` holds the keys, the `PeerDirectory` (peers.json + cached key sets, see
`protocol.directory`), the province-code -> node map used to route a relative's province
to a node (RULES 22: never the ID number's address code), and one keep-alive HTTP client for
all peers. `seal` signs with the key current at send time; `open` verifies, fetching the
sender's key set once when its key id is unknown (a peer may have rotated); a second
failure is final (3105 F).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import structlog

from protocol.directory import Peer, PeerDirectory, encode_peers, load_directory
from protocol.envelope import Envelope, Opened, Wire, decode_envelope, open_envelope, seal
from protocol.errors import (
    BadKeySet,
    ErrorClass,
    SignatureError,
    UnknownKey,
    UnknownPeer,
)
from protocol.keys import (
    KEY_ACTIVATION_DELAY_MS,
    KEY_RETIREMENT_DELAY_MS,
    KeySet,
    KeySetDocument,
    SigningKey,
    initial_keyset,
    new_kid,
    open_keyset_document,
    revoke_key,
    rotate_keyset,
    sign_keyset,
)
from protocol.messages import Body, MessageType

log = structlog.get_logger("wallet.plt.node")

KEYSET_PATH = "/plt/v1/keyset"
MESSAGES_PATH = "/plt/v1/messages"
# A peer's key set is fetched at most this often on unknown key ids, so a stream of envelopes
# with made-up kids cannot turn this node into a key-set fetching machine.
KEYSET_REFRESH_MIN_INTERVAL_MS = 1_000
KEYSET_DOCUMENT_BYTES_MAX = 64 * 1024
# HTTP to peers: bounded everything (TIGER_STYLE). Replies to a 256-envelope batch are fast;
# a peer that takes longer than this is treated as down for this attempt.
HTTP_CONNECT_TIMEOUT_S = 2.0
HTTP_READ_TIMEOUT_S = 10.0
HTTP_POOL_TIMEOUT_S = 5.0
HTTP_CONNECTIONS_MAX = 64
HTTP_KEEPALIVE_MAX = 32
_PROVINCE_CODE = re.compile(r"^[0-9]{6}$")
_CONVENTIONAL_NODE = re.compile(r"^prov-([0-9]{2})$")

_doc_json = msgspec.json.Decoder(KeySetDocument)
_regions_json = msgspec.json.Decoder(dict[str, str])


class KeysNotFound(FileNotFoundError):
    """The keys folder holds no node keys yet: run `plt-node keys init`."""


# --- keys ---------------------------------------------------------------------------------


@dataclass
class NodeKeys:
    """The root key, every node signing key, and the root-signed key set publishing them."""

    node_id: str
    root: SigningKey
    signing_keys: dict[str, SigningKey]
    keyset: KeySet
    document: KeySetDocument

    @classmethod
    def generate(cls, node_id: str, now_ms: int) -> NodeKeys:
        """A fresh root key and a first node key active from `now_ms` (in memory)."""
        root = SigningKey.generate(f"{node_id}/root-1")
        key = SigningKey.generate(new_kid(node_id, now_ms))
        keyset = initial_keyset(node_id, key, now_ms)
        return cls(node_id, root, {key.kid: key}, keyset, sign_keyset(keyset, root))

    def current(self, now_ms: int) -> SigningKey:
        """The key to sign with at `now_ms` (the newest active, unrevoked, unexpired one)."""
        kid = self.keyset.signing_kid(now_ms)
        try:
            return self.signing_keys[kid]
        except KeyError:
            raise UnknownKey(f"no private key for {kid!r} in this node's keys", kid=kid) from None

    def rotated(
        self,
        now_ms: int,
        *,
        activate_after_ms: int = KEY_ACTIVATION_DELAY_MS,
        retire_after_ms: int = KEY_RETIREMENT_DELAY_MS,
    ) -> NodeKeys:
        """A new node key, published now and signing from now + `activate_after_ms`."""
        key = SigningKey.generate(new_kid(self.node_id, now_ms, self.signing_keys))
        keyset = rotate_keyset(
            self.keyset,
            key,
            now_ms,
            activate_after_ms=activate_after_ms,
            retire_after_ms=retire_after_ms,
        )
        keys = {**self.signing_keys, key.kid: key}
        return NodeKeys(self.node_id, self.root, keys, keyset, sign_keyset(keyset, self.root))

    def revoked(self, kid: str, now_ms: int) -> NodeKeys:
        """`kid` marked compromised from `now_ms` (kept, so old evidence still verifies)."""
        keyset = revoke_key(self.keyset, kid, now_ms)
        return NodeKeys(
            self.node_id, self.root, self.signing_keys, keyset, sign_keyset(keyset, self.root)
        )

    def peer_entry(self, url: str) -> Peer:
        """How other nodes list this one in their peers.json (the root key is pinned there)."""
        return Peer(
            node=self.node_id, url=url, root_kid=self.root.kid, root_pub=self.root.public_b64
        )

    # -- files --

    def save(self, keys_dir: str | os.PathLike[str]) -> None:
        """Write every key and the key set document (private files 0600, atomically)."""
        root = Path(keys_dir)
        (root / "node").mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        _write_private(root / "root.pem", self.root.to_pem())
        for kid, key in self.signing_keys.items():
            _write_private(root / "node" / f"{kid.split('/', 1)[1]}.pem", key.to_pem())
        _write_atomic(root / "keyset.json", msgspec.json.encode(self.document), 0o644)

    @classmethod
    def load(cls, keys_dir: str | os.PathLike[str]) -> NodeKeys:
        """Read keys written by `save`; the key set must verify under the root key."""
        root_dir = Path(keys_dir)
        if not (root_dir / "keyset.json").exists():
            raise KeysNotFound(f"no node keys in {root_dir}; run `plt-node keys init`")
        root = SigningKey.from_pem((root_dir / "root.pem").read_bytes())
        document = _doc_json.decode((root_dir / "keyset.json").read_bytes())
        keyset = open_keyset_document(
            document, root_kid=root.kid, root_pub=root.public_b64, expected_node=root.node
        )
        keys = {}
        for path in sorted((root_dir / "node").glob("*.pem")):
            key = SigningKey.from_pem(path.read_bytes())
            keys[key.kid] = key
        for record in keyset.keys:
            if record.kid in keys and keys[record.kid].public_b64 != record.ed25519_pub:
                raise BadKeySet(f"private key {record.kid!r} does not match the key set")
        return cls(root.node, root, keys, keyset, document)


def init_keys(
    keys_dir: str | os.PathLike[str], node_id: str, now_ms: int, *, overwrite: bool = False
) -> NodeKeys:
    """Create the keys of a new node under `keys_dir`; refuses to overwrite existing keys."""
    if (Path(keys_dir) / "keyset.json").exists() and not overwrite:
        raise FileExistsError(f"{keys_dir} already holds node keys")
    keys = NodeKeys.generate(node_id, now_ms)
    keys.save(keys_dir)
    return keys


def rotate(
    keys_dir: str | os.PathLike[str],
    now_ms: int,
    *,
    activate_after_ms: int = KEY_ACTIVATION_DELAY_MS,
    retire_after_ms: int = KEY_RETIREMENT_DELAY_MS,
) -> NodeKeys:
    """Add a new node key to the keys on disk (PROTOCOL b.11 rotation)."""
    keys = NodeKeys.load(keys_dir).rotated(
        now_ms, activate_after_ms=activate_after_ms, retire_after_ms=retire_after_ms
    )
    keys.save(keys_dir)
    return keys


def revoke(keys_dir: str | os.PathLike[str], kid: str, now_ms: int) -> NodeKeys:
    """Revoke a compromised key on disk; peers refuse it from `now_ms` once they refresh."""
    keys = NodeKeys.load(keys_dir).revoked(kid, now_ms)
    keys.save(keys_dir)
    return keys


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


# --- directory files ------------------------------------------------------------------------


def load_regions(directory_dir: str | os.PathLike[str]) -> dict[str, str]:
    """`regions.json` ({"310000": "prov-31", ...}) under the directory folder, if present."""
    path = Path(directory_dir) / "regions.json"
    if not path.exists():
        return {}
    return _regions_json.decode(path.read_bytes())


def conventional_regions(nodes: Iterable[str]) -> dict[str, str]:
    """Province codes of nodes named by the `prov-NN` convention (`prov-31` -> `310000`).

    Used only where regions.json does not say otherwise; nodes named otherwise (the XPCC,
    test nodes) need an explicit entry, because the region registry is data (RULES).
    """
    out = {}
    for node in nodes:
        match = _CONVENTIONAL_NODE.match(node)
        if match:
            out[f"{match[1]}0000"] = node
    return out


def write_directory(
    directory_dir: str | os.PathLike[str],
    peers: Iterable[Peer],
    regions: Mapping[str, str] | None = None,
) -> None:
    """Write peers.json (and regions.json when given) for `load_directory`."""
    root = Path(directory_dir)
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / "peers.json", encode_peers(peers), 0o644)
    if regions is not None:
        _write_atomic(
            root / "regions.json", msgspec.json.format(msgspec.json.encode(dict(regions))), 0o644
        )


# --- the node -------------------------------------------------------------------------------


@dataclass
class _RefreshState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_ms: int = -KEYSET_REFRESH_MIN_INTERVAL_MS


def new_http_client() -> httpx.AsyncClient:
    """The one keep-alive client a node uses for every peer (bounded pool and timeouts)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=HTTP_CONNECT_TIMEOUT_S,
            read=HTTP_READ_TIMEOUT_S,
            write=HTTP_READ_TIMEOUT_S,
            pool=HTTP_POOL_TIMEOUT_S,
        ),
        limits=httpx.Limits(
            max_connections=HTTP_CONNECTIONS_MAX, max_keepalive_connections=HTTP_KEEPALIVE_MAX
        ),
        follow_redirects=False,
        trust_env=False,
    )


class PltNode:
    """This node on the PLT/1 network: keys, peer directory, routing, sealing, opening."""

    def __init__(
        self,
        keys: NodeKeys,
        directory: PeerDirectory,
        *,
        regions: Mapping[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
        keys_dir: str | os.PathLike[str] | None = None,
        directory_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.keys = keys
        self.directory = directory
        # Explicit entries win over the naming convention.
        self.regions: dict[str, str] = {**conventional_regions(directory.nodes), **(regions or {})}
        self._http = http
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.directory_dir = Path(directory_dir) if directory_dir is not None else None
        self._refresh: dict[str, _RefreshState] = {}
        # The signed documents behind the directory's cached key sets (evidence for receipts).
        self._documents: dict[str, KeySetDocument] = {}

    @classmethod
    def from_files(
        cls,
        keys_dir: str | os.PathLike[str],
        directory_dir: str | os.PathLike[str],
        *,
        http: httpx.AsyncClient | None = None,
    ) -> PltNode:
        """Load keys and the directory folder (peers.json, keysets/, regions.json)."""
        keys = NodeKeys.load(keys_dir)
        directory_path = Path(directory_dir)
        if (directory_path / "peers.json").exists():
            directory = load_directory(directory_path)
        else:
            directory = PeerDirectory([])
        node = cls(
            keys,
            directory,
            regions=load_regions(directory_path),
            http=http,
            keys_dir=keys_dir,
            directory_dir=directory_dir,
        )
        for file in sorted((directory_path / "keysets").glob("*.json")):
            if directory.keyset(file.stem) is not None:
                node._documents[file.stem] = _doc_json.decode(file.read_bytes())
        return node

    @property
    def node_id(self) -> str:
        return self.keys.node_id

    @property
    def http(self) -> httpx.AsyncClient:
        """The keep-alive client for peers, made on first use (inside the running loop)."""
        if self._http is None:
            self._http = new_http_client()
        return self._http

    async def aclose(self) -> None:
        """Close the HTTP client (the app's lifespan does this at shutdown)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- routing --

    def node_for_province(self, province_code: str) -> str:
        """The peer node serving `province_code`; UnknownPeer if the directory has none."""
        if _PROVINCE_CODE.match(province_code) is None:
            raise UnknownPeer(f"{province_code!r} is not a province code")
        node = self.regions.get(province_code)
        if node is None or node == self.node_id:
            raise UnknownPeer(f"no peer node serves province {province_code}", node="")
        self.directory.peer(node)  # listed in regions but not a peer: UnknownPeer too
        return node

    def province_of(self, node: str) -> str | None:
        """The province code a peer node serves, if the directory knows it."""
        for code, name in self.regions.items():
            if name == node:
                return code
        return None

    def url_of(self, node: str) -> str:
        return self.directory.peer(node).url.rstrip("/")

    # -- key sets --

    def install(self, node: str, document: KeySetDocument) -> KeySet:
        """Verify a peer's key set document against its pinned root and cache it."""
        keyset = self.directory.install(node, document)
        self._documents[node] = document
        return keyset

    def keyset_document(self, node: str) -> KeySetDocument | None:
        """The signed key set document of this node or of a peer (as last installed)."""
        if node == self.node_id:
            return self.keys.document
        return self._documents.get(node)

    def root_of(self, node: str) -> tuple[str, str]:
        """(root_kid, root_pub) pinned for `node` (this node's own root for itself)."""
        if node == self.node_id:
            return self.keys.root.kid, self.keys.root.public_b64
        peer = self.directory.peer(node)
        return peer.root_kid, peer.root_pub

    # -- sealing and opening --

    def seal(self, typ: MessageType, to_node: str, body: bytes | Body, now_ms: int) -> Envelope:
        """Sign `body` (canonical bytes from the outbox, or a body Struct) for `to_node`."""
        return seal(body, typ, self.node_id, to_node, self.keys.current(now_ms), now_ms)

    async def open(self, raw: bytes | Envelope, now_ms: int, *, wire: Wire | None = None) -> Opened:
        """Verify and decode an envelope addressed to this node.

        On UnknownKey the sender's key set is fetched once (`refresh_keyset`) and the envelope
        opened again; any SignatureError after that carries class F. If the fetch itself
        fails (the peer is unreachable) the error stays class T: the sender may retry.
        """
        env = raw if isinstance(raw, Envelope) else decode_envelope(raw, wire)
        try:
            return open_envelope(env, self.node_id, self.directory.verifying_key, now_ms)
        except UnknownKey as first:
            try:
                await self.refresh_keyset(env.from_node, now_ms)
            except (httpx.HTTPError, SignatureError, msgspec.DecodeError, ValueError) as exc:
                log.warning(
                    "plt_keyset_refresh_failed", node=env.from_node, kid=env.kid, error=repr(exc)
                )
                raise first from None
            try:
                return open_envelope(env, self.node_id, self.directory.verifying_key, now_ms)
            except SignatureError as exc:
                exc.error_class = ErrorClass.F
                raise

    async def fetch_keyset_document(self, node: str) -> KeySetDocument:
        """GET the peer's published key set document (not yet verified)."""
        response = await self.http.get(self.url_of(node) + KEYSET_PATH)
        response.raise_for_status()
        if len(response.content) > KEYSET_DOCUMENT_BYTES_MAX:
            raise BadKeySet(f"{node} key set document is too large", node=node)
        return _doc_json.decode(response.content)

    async def refresh_keyset(self, node: str, now_ms: int, *, force: bool = False) -> KeySet:
        """Fetch, verify (pinned root, no rollback) and cache `node`'s key set.

        Concurrent refreshes of one peer share one fetch; within
        KEYSET_REFRESH_MIN_INTERVAL_MS of the last one the cached set is kept unless `force`.
        The verified document is also written to `<directory>/keysets/<node>.json`, so a
        restart keeps what was learnt (including revocations).
        """
        self.directory.peer(node)
        state = self._refresh.setdefault(node, _RefreshState())
        async with state.lock:
            cached = self.directory.keyset(node)
            # Wall time, not the node clock: this only paces fetches.
            wall_ms = time.monotonic_ns() // 1_000_000
            recent = wall_ms - state.last_ms < KEYSET_REFRESH_MIN_INTERVAL_MS
            if cached is not None and recent and not force:
                return cached
            state.last_ms = wall_ms
            document = await self.fetch_keyset_document(node)
            keyset = self.install(node, document)
            self._persist_keyset(node, document)
            if cached is None or cached.seq != keyset.seq:
                log.info("plt_keyset_installed", node=node, seq=keyset.seq, now_ms=now_ms)
            return keyset

    async def refresh_all(self, now_ms: int) -> dict[str, str]:
        """Refresh every peer's key set (the 10-minute job); returns node -> outcome."""
        outcomes: dict[str, str] = {}
        for node in self.directory.nodes:
            if node == self.node_id:
                continue
            try:
                keyset = await self.refresh_keyset(node, now_ms, force=True)
                outcomes[node] = f"seq {keyset.seq}"
            except httpx.TransportError as exc:
                # Unreachable (not started yet, restarting): /ready and the outbox metrics
                # show a peer that stays down; the next pass, or the first envelope under an
                # unknown key, fetches the key set. Not a warning on every node's start.
                outcomes[node] = f"failed: {exc!r}"
                log.info("plt_keyset_peer_unreachable", node=node, error=repr(exc))
            except (httpx.HTTPError, SignatureError, msgspec.DecodeError, ValueError) as exc:
                outcomes[node] = f"failed: {exc!r}"
                log.warning("plt_keyset_refresh_failed", node=node, error=repr(exc))
        return outcomes

    def reload_own_keys(self) -> bool:
        """Pick up a rotation or revocation written by `plt-node keys` while running."""
        if self.keys_dir is None:
            return False
        keys = NodeKeys.load(self.keys_dir)
        if keys.keyset.seq == self.keys.keyset.seq:
            return False
        self.keys = keys
        log.info("plt_own_keys_reloaded", seq=keys.keyset.seq)
        return True

    def _persist_keyset(self, node: str, document: KeySetDocument) -> None:
        if self.directory_dir is None:
            return
        folder = self.directory_dir / "keysets"
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / f"{node}.json", msgspec.json.encode(document), 0o644)
