-- Idempotency-Key: a client's key, scoped to its account, with a digest of the
-- request it came with and, once the request is committed, the answer to send
-- again. A row exists while its request runs or after it was charged: a release
-- or an expired hold deletes it, so a failed request can be retried under the
-- same key. Rows expire (expires_at_ms, 24 hours) and are swept.

CREATE TABLE idempotency_keys (
    account_id TEXT NOT NULL REFERENCES accounts (id),
    idem_key TEXT NOT NULL,
    -- hex SHA-256 of the method, route, query and body
    fingerprint TEXT NOT NULL,
    reservation_id TEXT NOT NULL REFERENCES reservations (id),
    -- a streamed answer is never replayed: a repeat is refused once it started
    streamed BOOLEAN NOT NULL DEFAULT FALSE,
    -- the stored answer: NULL status until SaveResponse
    response_status INTEGER,
    -- JSON array of [name, value] pairs
    response_headers TEXT,
    response_body {{BLOB}},
    -- a large body lives in the media store under this id instead
    response_media_id TEXT,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (account_id, idem_key)
);

CREATE INDEX idempotency_keys_by_reservation ON idempotency_keys (reservation_id);

CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at_ms);
