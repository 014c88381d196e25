-- A hold's request id is the caller's trace id, not a key: two requests with
-- the same X-Request-ID make two holds. Reservation ids are made by billing.

ALTER TABLE reservations DROP CONSTRAINT reservations_account_id_request_id_key;

CREATE INDEX reservations_by_account ON reservations (account_id, created_at_ms);
