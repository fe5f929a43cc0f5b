-- The UNIQUE constraint of 0006 on idempotency_keys.settled_transfer_id indexed every key, and
-- all but the keys of posts and voids have NULL there: one more index entry (and its WAL) per
-- transfer, deposit and withdrawal, for nothing (73 MB of NULLs on a ledger of 3.2M transfers).
-- "A hold is settled by at most one post or void" needs only the non-NULL entries.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_settled_transfer_id_key;
CREATE UNIQUE INDEX idempotency_keys_settled_once ON idempotency_keys (settled_transfer_id)
    WHERE settled_transfer_id IS NOT NULL;
