-- Group commit: the movements that arrive together, in one transaction and one round trip.
--
-- A movement's own cost in Postgres is small next to what surrounds it: the round trip, the
-- transaction's commit (a WAL flush), and on a hot account the wait for the previous holder of
-- its row lock to commit. move_money_batch pays those once for many movements:
--   1. the growing phase for the whole batch: every idempotency key's advisory lock in ascending
--      key order, then every account row the batch names FOR UPDATE in ascending account_id order;
--   2. each movement in arrival order through move_money (0002), which re-takes locks this
--      transaction already holds (no waiting) and returns its own result or refusal; a refused
--      movement writes nothing, so it cannot affect the others;
--   3. one commit releases everything.
-- Lock order: every transaction of this ledger takes advisory locks (ascending) before row locks
-- (ascending), whether it moves one movement or many, so no two can wait on each other in a
-- cycle: still no deadlock by construction. An operating error (lock or statement timeout)
-- aborts the whole batch: nothing of it is written, and every caller gets LEDGER_BUSY.
--
-- The batch comes as parallel arrays, one element per movement (a composite array would need
-- a row-literal encoding on the client). Results come back one row per movement, with its
-- position in the arrays (1-based).
CREATE FUNCTION move_money_batch(
    p_initiators        text[],
    p_request_ids       text[],
    p_kinds             text[],
    p_owner_ids         uuid[],
    p_from_account_ids  uuid[],
    p_to_account_ids    uuid[],
    p_amounts           bigint[],
    p_currencies        text[],
    p_descriptions      text[],
    p_trace_ids         text[]
) RETURNS TABLE (ordinal int, result movement)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET lock_timeout = '1s'
AS $$
DECLARE
    -- The same class and key as move_money's, so that its own lock call is a re-entry.
    idempotency_lock_class CONSTANT int := 7201;
    -- Bounds the lock window: a batch's locks are held until its last movement is applied.
    batch_size_max  CONSTANT int := 256;
    size            int := cardinality(p_request_ids);
    lock_key        int;
BEGIN
    ASSERT size BETWEEN 1 AND batch_size_max, format('move_money_batch: %s movements', size);
    ASSERT cardinality(p_initiators) = size AND cardinality(p_kinds) = size AND cardinality(p_owner_ids) = size
       AND cardinality(p_from_account_ids) = size AND cardinality(p_to_account_ids) = size
       AND cardinality(p_amounts) = size AND cardinality(p_currencies) = size
       AND cardinality(p_descriptions) = size AND cardinality(p_trace_ids) = size,
       'move_money_batch: arrays of different lengths';

    -- Growing phase, 1: idempotency keys, ascending (hash collisions just re-enter one lock).
    FOR lock_key IN
        SELECT DISTINCT hashtext(i || E'\x1f' || r) AS k FROM unnest(p_initiators, p_request_ids) AS u(i, r) ORDER BY k
    LOOP
        PERFORM pg_advisory_xact_lock(idempotency_lock_class, lock_key);
    END LOOP;

    -- Growing phase, 2: every account row any movement names, the cash accounts of deposits
    -- and withdrawals included, ascending. The lock is taken as rows leave the sort.
    PERFORM 1 FROM ledger_accounts a
     WHERE a.account_id IN (
            SELECT unnest(p_from_account_ids || p_to_account_ids)
            UNION
            SELECT c.account_id FROM ledger_accounts c
             WHERE c.kind = 'CASH'
               AND c.currency IN (SELECT m.currency FROM unnest(p_kinds, p_currencies) AS m(kind, currency)
                                   WHERE m.kind <> 'TRANSFER'))
     ORDER BY a.account_id
       FOR UPDATE;

    -- Each movement in arrival order, against the balances the previous ones left.
    FOR i IN 1..size LOOP
        ordinal := i;
        result := move_money(p_initiators[i], p_request_ids[i], p_kinds[i], p_owner_ids[i], p_from_account_ids[i],
                             p_to_account_ids[i], p_amounts[i], p_currencies[i], p_descriptions[i], p_trace_ids[i]);
        RETURN NEXT;
    END LOOP;
END $$;
