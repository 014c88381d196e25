-- Sign-in (issue 20; services/billing/sessions.py): an account's users, who sign in with a
-- name and password, and their server-side sessions (the edge's `kiln_session` cookie).

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    -- the sign-in name, lower-cased (sign-in is case-insensitive)
    name TEXT NOT NULL UNIQUE,
    -- an Argon2id hash in its PHC string form ($argon2id$v=19$m=...,t=...,p=...$salt$hash)
    password_hash TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    -- when the user was disabled (`kiln admin user disable`); NULL while enabled
    disabled_at_ms BIGINT
);

CREATE INDEX users_by_account ON users (account_id);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    -- hex SHA-256 of the session token; the token itself is never stored
    token_hash TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL REFERENCES users (id),
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    -- signed out or revoked (`kiln admin session revoke`); NULL while live
    revoked_at_ms BIGINT
);

CREATE INDEX sessions_by_user ON sessions (user_id);
