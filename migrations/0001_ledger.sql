-- The double-entry ledger of one province (DESIGN.md "Ledger", PROTOCOL b.1).
--
-- Invariants held here, not only in Python:
--   * money is BIGINT fen; every transfer moves a positive amount from one account to
--     another, so every movement sums to zero by construction;
--   * transfers are immutable (no UPDATE, DELETE or TRUNCATE);
--   * an account's four balance columns are maintained by the insert trigger and nothing
--     else, so they always equal the sum of its transfers;
--   * a customer account never goes below zero, pessimistic about pending debits
--     (debits_posted + debits_pending <= credits_posted);
--   * a pending transfer is resolved (posted or voided) at most once, against the same
--     accounts, and a post never exceeds the amount held.

CREATE TABLE account (
    id                              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind                            text   NOT NULL CHECK (kind IN
                                        ('personal', 'funding', 'institution', 'quota', 'due_to', 'due_from')),
    code                            text   NOT NULL UNIQUE,
    debits_pending                  bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted                   bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending                 bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted                  bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_must_not_exceed_credits  boolean NOT NULL,
    created_at                      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT account_no_overdraft CHECK (
        NOT debits_must_not_exceed_credits
        OR debits_posted + debits_pending <= credits_posted
    )
);

CREATE TABLE ledger_transfer (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    debit_account_id   bigint NOT NULL REFERENCES account (id),
    credit_account_id  bigint NOT NULL REFERENCES account (id),
    amount_fen         bigint NOT NULL CHECK (amount_fen > 0),
    phase              text   NOT NULL CHECK (phase IN ('single', 'pending', 'post', 'void')),
    pending_id         bigint REFERENCES ledger_transfer (id),
    -- Why the money moved: monthly_credit, settlement, refund, grant, ... (shown as purpose).
    purpose            text   NOT NULL CHECK (length(purpose) BETWEEN 1 AND 40),
    -- Business links, at most a few of which are set for one transfer.
    settlement_id      bigint,
    refund_id          bigint,
    credit_batch_id    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT transfer_two_accounts CHECK (debit_account_id <> credit_account_id),
    CONSTRAINT transfer_resolution_points_to_hold CHECK ((phase IN ('post', 'void')) = (pending_id IS NOT NULL))
);

CREATE UNIQUE INDEX ledger_transfer_resolved_once ON ledger_transfer (pending_id) WHERE pending_id IS NOT NULL;
CREATE INDEX ledger_transfer_debit ON ledger_transfer (debit_account_id, id);
CREATE INDEX ledger_transfer_credit ON ledger_transfer (credit_account_id, id);

-- Apply a transfer to its two accounts. Accounts are updated in id order so that two
-- transfers between the same accounts in opposite directions cannot deadlock. A resolution
-- locks its hold row (serialising concurrent resolutions of one hold) and is refused as
-- unique_violation if the hold was already resolved: the unique index would only be
-- consulted after this BEFORE trigger had already moved the balances.
CREATE FUNCTION ledger_apply_transfer() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hold ledger_transfer%ROWTYPE;
    d_pending bigint := 0; d_posted bigint := 0;  -- deltas for the debit account
    c_pending bigint := 0; c_posted bigint := 0;  -- deltas for the credit account
BEGIN
    IF NEW.phase = 'single' THEN
        d_posted := NEW.amount_fen; c_posted := NEW.amount_fen;
    ELSIF NEW.phase = 'pending' THEN
        d_pending := NEW.amount_fen; c_pending := NEW.amount_fen;
    ELSE
        SELECT * INTO hold FROM ledger_transfer WHERE id = NEW.pending_id FOR UPDATE;
        IF NOT FOUND OR hold.phase <> 'pending' THEN
            RAISE EXCEPTION 'transfer % resolves % which is not a pending transfer', NEW.id, NEW.pending_id
                USING ERRCODE = 'check_violation';
        END IF;
        IF EXISTS (SELECT 1 FROM ledger_transfer WHERE pending_id = NEW.pending_id) THEN
            RAISE EXCEPTION 'hold % was already posted or voided', NEW.pending_id
                USING ERRCODE = 'unique_violation', CONSTRAINT = 'ledger_transfer_resolved_once';
        END IF;
        IF hold.debit_account_id <> NEW.debit_account_id OR hold.credit_account_id <> NEW.credit_account_id THEN
            RAISE EXCEPTION 'transfer % resolves % with other accounts', NEW.id, NEW.pending_id
                USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.phase = 'void' AND NEW.amount_fen <> hold.amount_fen THEN
            RAISE EXCEPTION 'void of % must release the whole % fen', NEW.pending_id, hold.amount_fen
                USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.amount_fen > hold.amount_fen THEN
            RAISE EXCEPTION 'post of % exceeds the % fen held', NEW.pending_id, hold.amount_fen
                USING ERRCODE = 'check_violation';
        END IF;
        d_pending := -hold.amount_fen; c_pending := -hold.amount_fen;
        IF NEW.phase = 'post' THEN
            d_posted := NEW.amount_fen; c_posted := NEW.amount_fen;
        END IF;
    END IF;

    IF NEW.debit_account_id < NEW.credit_account_id THEN
        UPDATE account SET debits_pending = debits_pending + d_pending, debits_posted = debits_posted + d_posted
         WHERE id = NEW.debit_account_id;
        UPDATE account SET credits_pending = credits_pending + c_pending, credits_posted = credits_posted + c_posted
         WHERE id = NEW.credit_account_id;
    ELSE
        UPDATE account SET credits_pending = credits_pending + c_pending, credits_posted = credits_posted + c_posted
         WHERE id = NEW.credit_account_id;
        UPDATE account SET debits_pending = debits_pending + d_pending, debits_posted = debits_posted + d_posted
         WHERE id = NEW.debit_account_id;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER ledger_transfer_apply BEFORE INSERT ON ledger_transfer
    FOR EACH ROW EXECUTE FUNCTION ledger_apply_transfer();

CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger transfers are immutable: post a new transfer instead'
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER ledger_transfer_immutable BEFORE UPDATE OR DELETE ON ledger_transfer
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_transfer_no_truncate BEFORE TRUNCATE ON ledger_transfer
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

-- The province's funding account: the source of monthly credits. Its debits exceed its
-- credits by everything the province has paid in.
INSERT INTO account (kind, code, debits_must_not_exceed_credits) VALUES ('funding', 'funding', false);
