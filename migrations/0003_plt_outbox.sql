-- PLT/1 plumbing shared by every protocol message (PROTOCOL b.3, b.8, b.9).
--
-- plt_outbox: a state change and the message it causes are written in one local
-- transaction; a worker sends, retries and stops. One row per (peer, typ, key): re-enqueueing
-- the same message is a no-op, so effects can be re-executed safely. Bodies are stored as
-- canonical bytes and sealed (signed) only when sent, so a retry after a key rotation is
-- signed with the current key and the body hash never changes.
--
-- plt_message: every envelope received or sent, exactly as on the wire: the evidence that
-- receipts, reconciliation and repairs are built from. Kept forever.

CREATE TABLE plt_outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    to_node          text NOT NULL CHECK (length(to_node) BETWEEN 1 AND 64),
    typ              text NOT NULL CHECK (length(typ) BETWEEN 1 AND 32),
    -- transfer_id or relation_id (or release_id): what the message is about.
    dedup_key        text NOT NULL CHECK (length(dedup_key) BETWEEN 1 AND 64),
    body             bytea NOT NULL,
    created_at       timestamptz NOT NULL,
    next_attempt_at  timestamptz NOT NULL,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- PREPARE stops at decide_by; DECISION, ACK and relationship messages never give up.
    give_up_at       timestamptz,
    done_at          timestamptz,
    last_error       text,
    UNIQUE (to_node, typ, dedup_key)
);
CREATE INDEX plt_outbox_due ON plt_outbox (next_attempt_at) WHERE done_at IS NULL;

CREATE TABLE plt_message (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    direction    text NOT NULL CHECK (direction IN ('in', 'out')),
    from_node    text NOT NULL,
    to_node      text NOT NULL,
    typ          text NOT NULL,
    msg_id       text NOT NULL,
    dedup_key    text,
    body_hash    text NOT NULL,
    envelope     bytea NOT NULL,
    at           timestamptz NOT NULL,
    UNIQUE (direction, msg_id)
);
CREATE INDEX plt_message_key ON plt_message (dedup_key, typ) WHERE dedup_key IS NOT NULL;
CREATE TRIGGER plt_message_immutable BEFORE UPDATE OR DELETE ON plt_message
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
