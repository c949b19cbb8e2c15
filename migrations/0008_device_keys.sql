-- Device keys (issue 9, docs/plt-integration.md "Device keys"): a wallet holder's phone
-- registers an ECDSA P-256 public key; signatures by it authorise grants and other
-- sensitive actions instead of the payment password.
--
-- The key is stored as its SEC1 uncompressed point (65 bytes); `kid` is derived from it
-- (protocol.device_auth.key_id), so one key is registered once on this node. `alg` names the
-- algorithm so another curve (SM2) can be added later. A revoked key stays, for the audit
-- trail and for receipts that name it. The per-person limit is a [cfg] rule
-- (`devices_per_person`), checked under the wallet row's lock.

CREATE TABLE device_key (
    id           bigserial PRIMARY KEY,
    person_id    bigint NOT NULL REFERENCES wallet (person_id),
    kid          text NOT NULL UNIQUE CHECK (kid ~ '^dk_[A-Za-z0-9_-]{22}$'),
    alg          text NOT NULL CHECK (alg IN ('ES256')),
    public_key   bytea NOT NULL UNIQUE CHECK (length(public_key) = 65),
    label        text NOT NULL CHECK (length(label) BETWEEN 1 AND 64),
    created_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    revoked_by   text CHECK (revoked_by IS NULL OR length(revoked_by) BETWEEN 1 AND 80),
    CONSTRAINT device_key_revoked_by CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);
CREATE INDEX device_key_person_active ON device_key (person_id) WHERE revoked_at IS NULL;

-- A fresh one-time password confirms a device registration.
ALTER TABLE otp_challenge DROP CONSTRAINT otp_challenge_purpose_check;
ALTER TABLE otp_challenge ADD CONSTRAINT otp_challenge_purpose_check
    CHECK (purpose IN ('open_wallet', 'login', 'add_device'));

-- password_hash: `scrypt$n$salt$digest` (before 0008) or `scrypt-hmac$pepper_id$n$salt$digest`
-- (keyed with the node's pepper file before the KDF; upgraded on the next successful check).
COMMENT ON COLUMN wallet.password_hash IS
    'scrypt$n$salt$digest, or scrypt-hmac$pepper_id$n$salt$digest (peppered; see credentials.py)';
