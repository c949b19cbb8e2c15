-- Reconciliation windows and statements (PROTOCOL b.10) and the monthly clearing (RULES 16).
--
-- Invariants held here, not only in Python:
--   * the window a decided transfer belongs to is read from A's signed DECISION bytes
--     (a generated column on both sides), so no code path can book it elsewhere;
--   * a reconciliation window moves forward only: OPEN -> CLOSED -> RECONCILED ->
--     INCLUDED_IN_CLEARING -> SETTLED; a statement, once stored, never changes; RECONCILED
--     needs both statements and either equal hashes or a clean drill-down;
--   * a month is cleared once per node (primary key); a grant's usage is booked once per
--     month (primary key), its cumulative usage stays within the granted (frozen) amount,
--     and every clearing line points at the ledger movement that books it, of that amount;
--   * USAGE messages are stored once per (direction, peer, month, part) and never change.

-- --- the window of a decision ------------------------------------------------------------------
--
-- A DECISION body is deterministic msgpack (a map with sorted keys); `window_id` is its last
-- key, and its value a 13-character string: the last 14 bytes are 0xad + "YYYY-MM-DDTHH".
-- Anything else yields NULL, which the CHECK below refuses: a change of the encoding fails
-- loudly instead of booking a transfer into a wrong window.
CREATE FUNCTION decision_window_of(decision bytea) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN octet_length(decision) > 14
                 AND get_byte(decision, octet_length(decision) - 14) = 173
           THEN encode(substring(decision FROM octet_length(decision) - 12), 'escape') END
$$;

ALTER TABLE grant_out
    ADD COLUMN decision_window_id text GENERATED ALWAYS AS (decision_window_of(decision)) STORED,
    ADD CONSTRAINT grant_out_decision_window CHECK (
        decision IS NULL OR decision_window_id ~ '^\d{4}-\d{2}-\d{2}T\d{2}$');
ALTER TABLE grant_in
    ADD COLUMN decision_window_id text GENERATED ALWAYS AS (decision_window_of(decision)) STORED,
    ADD CONSTRAINT grant_in_decision_window CHECK (
        decision IS NULL OR decision_window_id ~ '^\d{4}-\d{2}-\d{2}T\d{2}$');
CREATE INDEX grant_out_window ON grant_out (to_node, decision_window_id)
    WHERE decision_window_id IS NOT NULL;
CREATE INDEX grant_in_window ON grant_in (from_node, decision_window_id)
    WHERE decision_window_id IS NOT NULL;
-- The statements worker finds new windows among recent decisions.
CREATE INDEX grant_out_decided ON grant_out (decided_at) WHERE decision_window_id IS NOT NULL;
CREATE INDEX grant_in_decided ON grant_in (decided_at) WHERE decision_window_id IS NOT NULL;

-- --- windows and statements ----------------------------------------------------------------------
--
-- One row per (peer, window): every transfer between this node and the peer decided in that
-- window, in both directions (transfer ids are unique, so membership is unambiguous).
CREATE TABLE recon_window (
    peer              text NOT NULL CHECK (peer ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    window_id         text NOT NULL CHECK (window_id ~ '^\d{4}-\d{2}-\d{2}T\d{2}$'),
    state             text NOT NULL DEFAULT 'OPEN' CHECK (state IN
                          ('OPEN', 'CLOSED', 'RECONCILED', 'INCLUDED_IN_CLEARING', 'SETTLED')),
    -- Ours: the canonical STATEMENT body we signed and sent (outbox), and its hash.
    our_statement     bytea,
    our_hash          text CHECK (our_hash ~ '^[0-9a-f]{64}$'),
    -- The peer's: the body, its hash, and the whole signed envelope as evidence.
    peer_statement    bytea,
    peer_hash         text CHECK (peer_hash ~ '^[0-9a-f]{64}$'),
    peer_envelope     bytea,
    -- The last comparison: buckets whose hashes differ (empty when equal).
    differing_buckets integer[] NOT NULL DEFAULT '{}',
    -- The last drill-down with the peer (the worker repeats it at most every few minutes).
    drilled_at        timestamptz,
    resolution        text CHECK (resolution IN ('statements_equal', 'rows_agree')),
    clearing_month    text CHECK (clearing_month ~ '^\d{4}-\d{2}$'),
    opened_at         timestamptz NOT NULL,
    closed_at         timestamptz,
    reconciled_at     timestamptz,
    PRIMARY KEY (peer, window_id),
    CONSTRAINT recon_window_ours CHECK (
        (our_statement IS NULL) = (our_hash IS NULL)
        AND (state = 'OPEN') = (our_statement IS NULL)
        AND (state = 'OPEN') = (closed_at IS NULL)),
    CONSTRAINT recon_window_peers CHECK (
        (peer_statement IS NULL) = (peer_hash IS NULL)
        AND (peer_statement IS NULL) = (peer_envelope IS NULL)),
    CONSTRAINT recon_window_reconciled CHECK (
        (state IN ('OPEN', 'CLOSED')) = (resolution IS NULL)
        AND (resolution IS NULL) = (reconciled_at IS NULL)
        AND (resolution IS NULL OR peer_statement IS NOT NULL)
        AND (resolution IS DISTINCT FROM 'statements_equal' OR our_hash = peer_hash)),
    CONSTRAINT recon_window_cleared CHECK (
        (state IN ('INCLUDED_IN_CLEARING', 'SETTLED')) = (clearing_month IS NOT NULL)
        AND (clearing_month IS NULL OR window_id LIKE clearing_month || '-%'))
);
CREATE INDEX recon_window_state ON recon_window (state, window_id);

CREATE FUNCTION recon_window_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    rank_old integer := array_position(
        ARRAY['OPEN', 'CLOSED', 'RECONCILED', 'INCLUDED_IN_CLEARING', 'SETTLED'], OLD.state);
    rank_new integer := array_position(
        ARRAY['OPEN', 'CLOSED', 'RECONCILED', 'INCLUDED_IN_CLEARING', 'SETTLED'], NEW.state);
BEGIN
    IF NEW.peer <> OLD.peer OR NEW.window_id <> OLD.window_id THEN
        RAISE EXCEPTION 'recon_window %/%: identity is immutable', OLD.peer, OLD.window_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF rank_new < rank_old THEN
        RAISE EXCEPTION 'recon_window %/%: % cannot go back to %', OLD.peer, OLD.window_id,
            OLD.state, NEW.state USING ERRCODE = 'check_violation';
    END IF;
    IF (OLD.our_statement IS NOT NULL AND NEW.our_statement IS DISTINCT FROM OLD.our_statement)
       OR (OLD.peer_statement IS NOT NULL
           AND (NEW.peer_statement IS DISTINCT FROM OLD.peer_statement
                OR NEW.peer_envelope IS DISTINCT FROM OLD.peer_envelope)) THEN
        RAISE EXCEPTION 'recon_window %/%: a stored statement never changes', OLD.peer, OLD.window_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER recon_window_guard BEFORE UPDATE ON recon_window
    FOR EACH ROW EXECUTE FUNCTION recon_window_guard();
CREATE FUNCTION recon_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%: rows are evidence and are never deleted', TG_TABLE_NAME
        USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER recon_window_no_delete BEFORE DELETE ON recon_window
    FOR EACH ROW EXECUTE FUNCTION recon_no_delete();

-- What the last drill-down of a window found: one row per transfer the two sides book
-- differently (`ours`/`theirs`: "COMMIT 100000", "ABORT 0" or "missing").
CREATE TABLE recon_difference (
    peer         text NOT NULL,
    window_id    text NOT NULL,
    transfer_id  text NOT NULL CHECK (length(transfer_id) = 36),
    giver        text NOT NULL,
    ours         text NOT NULL CHECK (length(ours) BETWEEN 1 AND 64),
    theirs       text NOT NULL CHECK (length(theirs) BETWEEN 1 AND 64),
    -- Our row checked against the PREPARE and DECISION we hold (and logged as signed).
    evidence     text NOT NULL CHECK (length(evidence) BETWEEN 1 AND 500),
    found_at     timestamptz NOT NULL,
    PRIMARY KEY (peer, window_id, transfer_id),
    FOREIGN KEY (peer, window_id) REFERENCES recon_window (peer, window_id),
    CONSTRAINT recon_difference_differs CHECK (ours <> theirs)
);

-- --- monthly clearing (RULES 16) -----------------------------------------------------------------

ALTER TABLE account DROP CONSTRAINT account_kind_check;
ALTER TABLE account ADD CONSTRAINT account_kind_check CHECK (kind IN
    ('personal', 'funding', 'institution', 'quota', 'due_to', 'due_from', 'payable', 'receivable'));

-- One clearing per month per node: a month cannot be cleared twice.
CREATE TABLE clearing_run (
    month       text PRIMARY KEY CHECK (month ~ '^\d{4}-(0[1-9]|1[0-2])$'),
    windows     integer NOT NULL CHECK (windows >= 0),
    grants      integer NOT NULL CHECK (grants >= 0),
    cleared_at  timestamptz NOT NULL,
    actor       text NOT NULL CHECK (length(actor) BETWEEN 1 AND 64)
);

-- The signed USAGE parts sent (B side, direction 'out') and applied (A side, 'in').
CREATE TABLE clearing_usage (
    direction   text NOT NULL CHECK (direction IN ('in', 'out')),
    peer        text NOT NULL CHECK (peer ~ '^[a-z0-9][a-z0-9-]{0,31}$'),
    month       text NOT NULL CHECK (month ~ '^\d{4}-(0[1-9]|1[0-2])$'),
    part        integer NOT NULL CHECK (part >= 1),
    parts       integer NOT NULL CHECK (parts >= part),
    body        bytea NOT NULL,
    body_hash   text NOT NULL CHECK (body_hash ~ '^[0-9a-f]{64}$'),
    used_fen    bigint NOT NULL,
    -- 'in': the sender's signed envelope and our signed reply. 'out': the peer's reply body.
    envelope    bytea,
    reply       bytea,
    booked_fen  bigint,
    created_at  timestamptz NOT NULL,
    replied_at  timestamptz,
    PRIMARY KEY (direction, peer, month, part),
    CONSTRAINT clearing_usage_in CHECK (
        direction = 'out' OR (envelope IS NOT NULL AND reply IS NOT NULL AND booked_fen = used_fen)),
    CONSTRAINT clearing_usage_reply CHECK ((reply IS NULL) = (booked_fen IS NULL))
);
CREATE FUNCTION clearing_usage_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.body <> OLD.body OR NEW.direction <> OLD.direction OR NEW.peer <> OLD.peer
       OR NEW.month <> OLD.month OR NEW.part <> OLD.part
       OR (OLD.reply IS NOT NULL AND NEW.reply IS DISTINCT FROM OLD.reply) THEN
        RAISE EXCEPTION 'clearing_usage %/%/%: a stored USAGE and its reply never change',
            OLD.peer, OLD.month, OLD.part USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER clearing_usage_guard BEFORE UPDATE ON clearing_usage
    FOR EACH ROW EXECUTE FUNCTION clearing_usage_guard();
CREATE TRIGGER clearing_usage_no_delete BEFORE DELETE ON clearing_usage
    FOR EACH ROW EXECUTE FUNCTION recon_no_delete();

-- A (giver's node): the used part of a grant turned into a payable to B's province.
-- Movement: due_to:<B>:<slot> -> payable:<B> (reversed when the month's usage is negative).
CREATE TABLE clearing_payable (
    month               text NOT NULL CHECK (month ~ '^\d{4}-(0[1-9]|1[0-2])$'),
    transfer_id         text NOT NULL REFERENCES grant_out (transfer_id),
    peer                text NOT NULL,
    granted_fen         bigint NOT NULL CHECK (granted_fen > 0),
    used_fen            bigint NOT NULL CHECK (used_fen <> 0),
    ledger_transfer_id  bigint NOT NULL UNIQUE REFERENCES ledger_transfer (id),
    booked_at           timestamptz NOT NULL,
    PRIMARY KEY (transfer_id, month)
);
-- B (receiver's node): the matching receivable from A's province.
-- Movement: due_from:<A>:<slot> -> receivable:<A> (reversed when negative).
CREATE TABLE clearing_receivable (
    month               text NOT NULL REFERENCES clearing_run (month),
    peer                text NOT NULL,
    transfer_id         text NOT NULL,
    granted_fen         bigint NOT NULL CHECK (granted_fen > 0),
    used_fen            bigint NOT NULL CHECK (used_fen <> 0),
    ledger_transfer_id  bigint NOT NULL UNIQUE REFERENCES ledger_transfer (id),
    booked_at           timestamptz NOT NULL,
    PRIMARY KEY (peer, transfer_id, month),
    FOREIGN KEY (peer, transfer_id) REFERENCES grant_in (from_node, transfer_id)
);

CREATE TRIGGER clearing_payable_no_delete BEFORE DELETE ON clearing_payable
    FOR EACH ROW EXECUTE FUNCTION recon_no_delete();
CREATE TRIGGER clearing_receivable_no_delete BEFORE DELETE ON clearing_receivable
    FOR EACH ROW EXECUTE FUNCTION recon_no_delete();
CREATE FUNCTION clearing_line_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%: a booked clearing line never changes', TG_TABLE_NAME
        USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER clearing_payable_immutable BEFORE UPDATE ON clearing_payable
    FOR EACH ROW EXECUTE FUNCTION clearing_line_immutable();
CREATE TRIGGER clearing_receivable_immutable BEFORE UPDATE ON clearing_receivable
    FOR EACH ROW EXECUTE FUNCTION clearing_line_immutable();

-- Each line: the grant is committed with that peer for exactly `granted_fen`; the ledger
-- movement it names is exactly the line (amount, accounts of that peer, direction by sign);
-- the grant's usage over all months stays within 0 .. granted (the frozen amount).
CREATE FUNCTION clearing_line_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    g_state   text;
    g_peer    text;
    g_amount  bigint;
    t         record;
    from_code text;
    to_code   text;
    total     bigint;
BEGIN
    IF TG_TABLE_NAME = 'clearing_payable' THEN
        SELECT state, to_node, amount_fen INTO g_state, g_peer, g_amount
        FROM grant_out WHERE transfer_id = NEW.transfer_id;
        from_code := 'due_to:' || NEW.peer || ':';
        to_code := 'payable:' || NEW.peer;
        SELECT sum(used_fen) INTO total FROM clearing_payable WHERE transfer_id = NEW.transfer_id;
    ELSE
        SELECT g.state, g.from_node, g.amount_fen INTO g_state, g_peer, g_amount
        FROM grant_in g WHERE g.from_node = NEW.peer AND g.transfer_id = NEW.transfer_id;
        from_code := 'due_from:' || NEW.peer || ':';
        to_code := 'receivable:' || NEW.peer;
        SELECT sum(used_fen) INTO total FROM clearing_receivable
        WHERE peer = NEW.peer AND transfer_id = NEW.transfer_id;
    END IF;
    IF g_state IS DISTINCT FROM 'COMMITTED' OR g_peer IS DISTINCT FROM NEW.peer
       OR g_amount IS DISTINCT FROM NEW.granted_fen THEN
        RAISE EXCEPTION '% %: not a committed grant of % fen with %', TG_TABLE_NAME,
            NEW.transfer_id, NEW.granted_fen, NEW.peer USING ERRCODE = 'check_violation';
    END IF;
    IF total < 0 OR total > NEW.granted_fen THEN
        RAISE EXCEPTION '% %: usage % fen is outside 0..% fen', TG_TABLE_NAME, NEW.transfer_id,
            total, NEW.granted_fen USING ERRCODE = 'check_violation';
    END IF;
    SELECT lt.amount_fen, lt.phase, d.code AS debit_code, c.code AS credit_code INTO t
    FROM ledger_transfer lt
    JOIN account d ON d.id = lt.debit_account_id JOIN account c ON c.id = lt.credit_account_id
    WHERE lt.id = NEW.ledger_transfer_id;
    IF t.amount_fen IS DISTINCT FROM abs(NEW.used_fen) OR t.phase <> 'single'
       OR NOT (CASE
           WHEN TG_TABLE_NAME = 'clearing_payable' AND NEW.used_fen > 0
               THEN t.debit_code LIKE from_code || '%' AND t.credit_code = to_code
           WHEN TG_TABLE_NAME = 'clearing_payable'
               THEN t.debit_code = to_code AND t.credit_code LIKE from_code || '%'
           WHEN NEW.used_fen > 0
               THEN t.debit_code = to_code AND t.credit_code LIKE from_code || '%'
           ELSE t.debit_code LIKE from_code || '%' AND t.credit_code = to_code END) THEN
        RAISE EXCEPTION '% %: ledger transfer % does not book % fen between % and %',
            TG_TABLE_NAME, NEW.transfer_id, NEW.ledger_transfer_id, NEW.used_fen, from_code, to_code
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER clearing_payable_check AFTER INSERT ON clearing_payable
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION clearing_line_check();
CREATE CONSTRAINT TRIGGER clearing_receivable_check AFTER INSERT ON clearing_receivable
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION clearing_line_check();
