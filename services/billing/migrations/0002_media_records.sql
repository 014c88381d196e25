-- The files an account's paid requests produced (the user's video library):
-- written in the same transaction as the charge, so a file is listed exactly
-- when its request was committed. Times are Unix ms.

CREATE TABLE media_records (
    media_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    reservation_id TEXT NOT NULL REFERENCES reservations (id),
    kind TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL DEFAULT '',
    width INTEGER NOT NULL DEFAULT 0,
    height INTEGER NOT NULL DEFAULT 0,
    frames INTEGER NOT NULL DEFAULT 0,
    fps DOUBLE PRECISION NOT NULL DEFAULT 0,
    duration_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    size_bytes BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL
);

CREATE INDEX media_records_by_account ON media_records (account_id, kind, created_at_ms);
