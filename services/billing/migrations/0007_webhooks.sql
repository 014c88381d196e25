-- Task webhooks (issue 16; services/billing/webhooks.py): each account's signing
-- secret, endpoints a receiver turned off with HTTP 410, the durable outbox the
-- edge delivers from, and the log of every delivery attempt. Times are Unix ms.

-- The Standard Webhooks secret of an account (whsec_ + base64). After a rotation
-- the previous secret still signs until previous_expires_at_ms (the grace period).
CREATE TABLE webhook_secrets (
    account_id TEXT PRIMARY KEY REFERENCES accounts (id),
    secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_expires_at_ms BIGINT,
    created_at_ms BIGINT NOT NULL,
    rotated_at_ms BIGINT
);

-- A receiver that answered 410 Gone: nothing more is sent to this URL for this
-- account (messages for it are kept in state 'disabled').
CREATE TABLE webhook_disabled_endpoints (
    account_id TEXT NOT NULL REFERENCES accounts (id),
    url TEXT NOT NULL,
    disabled_at_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (account_id, url)
);

-- The outbox: one row per message (one event of one task). task_id has no
-- foreign key: tasks live in their own table.
CREATE TABLE webhook_messages (
    -- msg_...: the webhook-id header of every attempt of this message
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    task_id TEXT NOT NULL,
    url TEXT NOT NULL,
    event_type TEXT NOT NULL,
    -- the exact bytes POSTed (and signed)
    payload {{BLOB}} NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead', 'disabled')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- when the next attempt is due (state 'pending')
    next_attempt_at_ms BIGINT NOT NULL,
    -- the claim of the node delivering it now; another node may claim it once the lease expired
    lease_token TEXT,
    lease_expires_at_ms BIGINT,
    -- the last attempt's HTTP status (0: no answer) and error
    last_status INTEGER,
    last_error TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    delivered_at_ms BIGINT
);

CREATE INDEX webhook_messages_due ON webhook_messages (next_attempt_at_ms) WHERE state = 'pending';
CREATE INDEX webhook_messages_by_task ON webhook_messages (task_id, created_at_ms);
CREATE INDEX webhook_messages_by_endpoint ON webhook_messages (account_id, url) WHERE state = 'pending';

-- Every delivery attempt, in order.
CREATE TABLE webhook_attempts (
    message_id TEXT NOT NULL REFERENCES webhook_messages (id),
    attempt INTEGER NOT NULL CHECK (attempt >= 1),
    at_ms BIGINT NOT NULL,
    -- the HTTP status, or 0 when there was no answer (refused, timed out)
    status INTEGER NOT NULL,
    -- what went wrong, truncated; empty on success
    error TEXT NOT NULL DEFAULT '',
    duration_ms BIGINT NOT NULL CHECK (duration_ms >= 0),
    PRIMARY KEY (message_id, attempt)
);
