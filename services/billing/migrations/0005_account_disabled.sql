-- An operator can disable an account (`kiln admin account disable`): while
-- disabled_at_ms is set, every credential of the account (API keys and JWTs)
-- is refused and no hold is placed. Holds placed before settle normally.

ALTER TABLE accounts ADD COLUMN disabled_at_ms BIGINT;
