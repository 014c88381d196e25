-- A hold's request id is the caller's trace id, not a key: two requests with
-- the same X-Request-ID make two holds. Reservation ids are made by billing.
-- SQLite cannot drop a table constraint: the table is rebuilt (the migration
-- runs with foreign keys off and checks them before it commits).

CREATE TABLE reservations_new (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    request_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount >= 0),
    charged BIGINT NOT NULL DEFAULT 0 CHECK (charged >= 0 AND charged <= amount),
    state TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released', 'expired')),
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    settled_at_ms BIGINT
);

INSERT INTO reservations_new (id, account_id, request_id, amount, charged, state, created_at_ms,
    expires_at_ms, settled_at_ms)
SELECT id, account_id, request_id, amount, charged, state, created_at_ms, expires_at_ms, settled_at_ms
FROM reservations;

DROP TABLE reservations;

ALTER TABLE reservations_new RENAME TO reservations;

CREATE INDEX reservations_held_by_expiry ON reservations (expires_at_ms) WHERE state = 'held';

CREATE INDEX reservations_by_account ON reservations (account_id, created_at_ms);
