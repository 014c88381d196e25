-- Accounts, API keys, reservations, the ledger, purchases and service flags.
-- Amounts are integer hundredths of a credit ("units"); times are Unix ms.

CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    premium BOOLEAN NOT NULL DEFAULT FALSE,
    -- spendable units (held units excluded); always the sum of the ledger rows
    balance BIGINT NOT NULL DEFAULT 0 CHECK (balance >= 0),
    -- units held by open reservations
    held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    -- the JWT subject of this account, when it is not the id itself
    external_id TEXT UNIQUE,
    created_at_ms BIGINT NOT NULL
);

CREATE INDEX accounts_by_name ON accounts (name);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    name TEXT NOT NULL DEFAULT '',
    -- hex SHA-256 of the key; the key itself is never stored
    key_hash TEXT NOT NULL UNIQUE,
    -- the first characters of the key, to recognise it in listings
    prefix TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);

CREATE INDEX api_keys_by_account ON api_keys (account_id);

CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    request_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount >= 0),
    charged BIGINT NOT NULL DEFAULT 0 CHECK (charged >= 0 AND charged <= amount),
    state TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released', 'expired')),
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    settled_at_ms BIGINT,
    UNIQUE (account_id, request_id)
);

CREATE INDEX reservations_held_by_expiry ON reservations (expires_at_ms) WHERE state = 'held';

CREATE TABLE ledger_entries (
    id {{IDENTITY_PK}},
    account_id TEXT NOT NULL REFERENCES accounts (id),
    kind TEXT NOT NULL CHECK (kind IN ('hold', 'release', 'expire', 'charge', 'purchase', 'grant')),
    -- signed change of the account's spendable balance
    amount BIGINT NOT NULL,
    reservation_id TEXT REFERENCES reservations (id),
    created_at_ms BIGINT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);

CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, id);

CREATE TABLE purchases (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    kind TEXT NOT NULL CHECK (kind IN ('purchase', 'grant')),
    credits_units BIGINT NOT NULL CHECK (credits_units > 0),
    discount_percent INTEGER NOT NULL CHECK (discount_percent BETWEEN 0 AND 100),
    -- what was paid, in the same units (100 units = 1 credit = $0.01)
    paid_units BIGINT NOT NULL CHECK (paid_units >= 0),
    created_at_ms BIGINT NOT NULL
);

CREATE INDEX purchases_by_account ON purchases (account_id);

-- Operator switches read by the running service (maintenance mode).
CREATE TABLE service_flags (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
