-- One province's people, wallets, relationships, institutions and settlements
-- (RULES 1-10, 17-22).

CREATE TABLE insured_person (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- GB 11643 (check digit verified in Python on the way in; the shape is held here).
    id_number       text NOT NULL UNIQUE CHECK (id_number ~ '^[0-9]{17}[0-9X]$'),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    scheme          text NOT NULL CHECK (scheme IN ('employee', 'resident')),
    status          text NOT NULL CHECK (status IN ('normal', 'suspended', 'terminated', 'deceased')),
    pooling_region  text NOT NULL CHECK (pooling_region ~ '^[0-9]{6}$'),
    phone           text NOT NULL CHECK (phone ~ '^\+?[0-9]{5,20}$'),
    -- Only employee-scheme members have a personal account (RULES 1); it is kept if the
    -- person later changes scheme, because the balance is still theirs.
    personal_account_id bigint UNIQUE REFERENCES account (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE wallet (
    person_id                 bigint PRIMARY KEY REFERENCES insured_person (id),
    state                     text NOT NULL CHECK (state IN ('open', 'closed')),
    -- scrypt(password, salt); parameters are part of the stored string's prefix.
    password_hash             text NOT NULL,
    failed_password_attempts  integer NOT NULL DEFAULT 0 CHECK (failed_password_attempts >= 0),
    locked_until              timestamptz,
    opened_via                text NOT NULL CHECK (opened_via IN ('app', 'guardian', 'counter')),
    guardian_person_id        bigint REFERENCES insured_person (id),
    opened_at                 timestamptz NOT NULL,
    CONSTRAINT wallet_guardian_named CHECK ((opened_via = 'guardian') = (guardian_person_id IS NOT NULL))
);

CREATE TABLE otp_challenge (
    id          uuid PRIMARY KEY,
    person_id   bigint NOT NULL REFERENCES insured_person (id),
    purpose     text NOT NULL CHECK (purpose IN ('open_wallet', 'login')),
    code_hash   bytea NOT NULL,
    attempts    integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

CREATE TABLE app_session (
    token_hash  bytea PRIMARY KEY,
    person_id   bigint NOT NULL REFERENCES insured_person (id),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX app_session_person ON app_session (person_id);

CREATE TABLE relationship (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    giver_person_id     bigint NOT NULL REFERENCES insured_person (id),
    receiver_person_id  bigint NOT NULL REFERENCES insured_person (id),
    relation_type       text NOT NULL CHECK (relation_type IN (
                            'spouse', 'parent', 'child', 'sibling',
                            'grandparent_paternal', 'grandparent_maternal',
                            'grandchild_paternal', 'grandchild_maternal')),
    evidence_ref        text NOT NULL CHECK (length(evidence_ref) BETWEEN 1 AND 64),
    state               text NOT NULL CHECK (state IN (
                            'pending_confirmation', 'pending_review', 'active',
                            'declined', 'rejected', 'ended')),
    -- The receiver may order their givers (deduction_strategy = receiver_order).
    receiver_priority   integer,
    filed_at            timestamptz NOT NULL,
    confirmed_at        timestamptz,
    reviewed_at         timestamptz,
    ended_at            timestamptz,
    ended_by            text CHECK (ended_by IN ('giver', 'receiver', 'system', 'operator')),
    end_reason          text,
    CONSTRAINT relationship_two_people CHECK (giver_person_id <> receiver_person_id),
    CONSTRAINT relationship_end_recorded CHECK ((state = 'ended') = (ended_at IS NOT NULL))
);
-- One live relationship per directed pair.
CREATE UNIQUE INDEX relationship_live_pair ON relationship (giver_person_id, receiver_person_id)
    WHERE state IN ('pending_confirmation', 'pending_review', 'active');
CREATE INDEX relationship_receiver ON relationship (receiver_person_id, state);

CREATE TABLE institution (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code         text NOT NULL UNIQUE CHECK (code ~ '^[A-Za-z0-9_.-]{1,32}$'),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind         text NOT NULL CHECK (kind IN ('hospital', 'clinic', 'pharmacy', 'agency')),
    -- Only categories that shared money may ever pay for (RULES 17).
    categories   text[] NOT NULL CHECK (
                     cardinality(categories) >= 1 AND categories <@ ARRAY[
                        'outpatient', 'inpatient', 'pharmacy_drug', 'medical_device',
                        'medical_consumable', 'resident_premium', 'long_term_care_premium',
                        'health_checkup']::text[]),
    api_key_hash bytea NOT NULL UNIQUE,
    account_id   bigint NOT NULL UNIQUE REFERENCES account (id),
    state        text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended')),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payment_code (
    code_hash   bytea PRIMARY KEY,
    person_id   bigint NOT NULL REFERENCES insured_person (id),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

CREATE TABLE settlement (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    institution_id     bigint NOT NULL REFERENCES institution (id),
    reference          text NOT NULL CHECK (length(reference) BETWEEN 1 AND 64),
    request_hash       bytea NOT NULL,
    patient_person_id  bigint NOT NULL REFERENCES insured_person (id),
    category           text NOT NULL,
    requested_fen      bigint NOT NULL CHECK (requested_fen > 0),
    amount_fen         bigint NOT NULL CHECK (amount_fen > 0 AND amount_fen <= requested_fen),
    refunded_fen       bigint NOT NULL DEFAULT 0 CHECK (refunded_fen >= 0 AND refunded_fen <= amount_fen),
    created_at         timestamptz NOT NULL,
    UNIQUE (institution_id, reference)
);
CREATE INDEX settlement_patient ON settlement (patient_person_id, id);

-- Where each fen of a settlement came from, in deduction order.
CREATE TABLE settlement_source (
    settlement_id    bigint NOT NULL REFERENCES settlement (id),
    seq              smallint NOT NULL CHECK (seq >= 0),
    source           text NOT NULL CHECK (source IN ('own', 'giver', 'quota')),
    account_id       bigint NOT NULL REFERENCES account (id),
    relationship_id  bigint REFERENCES relationship (id),
    amount_fen       bigint NOT NULL CHECK (amount_fen > 0),
    refunded_fen     bigint NOT NULL DEFAULT 0 CHECK (refunded_fen >= 0 AND refunded_fen <= amount_fen),
    PRIMARY KEY (settlement_id, seq),
    CONSTRAINT source_giver_has_relationship CHECK ((source = 'giver') = (relationship_id IS NOT NULL))
);

CREATE TABLE refund (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    settlement_id   bigint NOT NULL REFERENCES settlement (id),
    institution_id  bigint NOT NULL REFERENCES institution (id),
    reference       text NOT NULL CHECK (length(reference) BETWEEN 1 AND 64),
    request_hash    bytea NOT NULL,
    amount_fen      bigint NOT NULL CHECK (amount_fen > 0),
    created_at      timestamptz NOT NULL,
    UNIQUE (institution_id, reference)
);

CREATE TABLE credit_batch (
    batch_id      text PRIMARY KEY CHECK (batch_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    request_hash  bytea NOT NULL,
    month         text NOT NULL CHECK (month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    row_count     integer NOT NULL CHECK (row_count > 0),
    total_fen     bigint NOT NULL CHECK (total_fen > 0),
    created_at    timestamptz NOT NULL
);

ALTER TABLE ledger_transfer
    ADD CONSTRAINT ledger_transfer_settlement FOREIGN KEY (settlement_id) REFERENCES settlement (id),
    ADD CONSTRAINT ledger_transfer_refund FOREIGN KEY (refund_id) REFERENCES refund (id),
    ADD CONSTRAINT ledger_transfer_credit_batch FOREIGN KEY (credit_batch_id) REFERENCES credit_batch (batch_id);
CREATE INDEX ledger_transfer_settlement_idx ON ledger_transfer (settlement_id) WHERE settlement_id IS NOT NULL;

-- Append-only trail of operator actions and money movements (who, when, why, request id).
CREATE TABLE audit_event (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    subject     text,
    request_id  text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE TRIGGER audit_event_immutable BEFORE UPDATE OR DELETE ON audit_event
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
