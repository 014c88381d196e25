-- Rate limits (issue 17; services/billing/rate_limits.py): an account's own
-- limits, set with `kiln admin limits`. A NULL column takes the setting of the
-- account's tier (KILN_RATE_LIMIT_*, premium or not); 0 means no limit.

CREATE TABLE account_rate_limits (
    account_id TEXT PRIMARY KEY REFERENCES accounts (id),
    -- requests per minute per capability, unless capability_rpm names the capability
    rpm INTEGER CHECK (rpm >= 0),
    -- JSON object: capability -> requests per minute ({"chat": 30})
    capability_rpm TEXT NOT NULL DEFAULT '{}',
    -- synchronous paid requests in flight (held, not a task's hold)
    max_concurrent INTEGER CHECK (max_concurrent >= 0),
    updated_at_ms BIGINT NOT NULL
);

-- The concurrency check counts an account's open holds in Authorize's transaction.
CREATE INDEX reservations_held_by_account ON reservations (account_id) WHERE state = 'held';
