-- Asynchronous tasks (POST /v1/tasks, Prefer: respond-async). A task's credits
-- are held by its reservation from creation; the request body is a stored
-- media file. Workers claim pending tasks (and tasks whose lease ran out) and
-- prove each run with a token whose SHA-256 is kept here.

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    reservation_id TEXT NOT NULL UNIQUE REFERENCES reservations (id),
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    input_media_id TEXT NOT NULL,
    content_type TEXT NOT NULL,
    callback_url TEXT NOT NULL DEFAULT '',
    -- scheme://host the task was created at: the base of the media URLs of its output
    origin TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    run_token_hash TEXT UNIQUE,
    lease_expires_at_ms BIGINT,
    progress_step INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    output_json {{BLOB}},
    error_json {{BLOB}},
    created_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT,
    completed_at_ms BIGINT
);

CREATE INDEX tasks_pending_by_age ON tasks (created_at_ms) WHERE status = 'pending';
CREATE INDEX tasks_running_by_lease ON tasks (lease_expires_at_ms) WHERE status = 'processing';
CREATE INDEX tasks_by_account ON tasks (account_id, created_at_ms);
