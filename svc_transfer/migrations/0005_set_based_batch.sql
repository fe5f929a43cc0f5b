-- The ledger's batch, set-based: N movements in a handful of statements, whatever N.
--
-- 0003 applied a batch by calling 0002's move_money once per movement: about twenty SQL
-- statements each (a lookup, two row locks, two UPDATEs, four INSERTs, a sum, a UUIDv7 and a
-- protobuf event built by PL/pgSQL functions), all inside the lock window. Here a batch costs
-- the same dozen statements whether it holds one movement or 256:
--   before any lock: the idempotency keys and parameter hashes of every movement (one SELECT);
--   1. growing phase: every idempotency key's advisory lock in ascending key order (one
--      statement), the stored records of those keys (one SELECT), every account row the batch
--      names FOR UPDATE in ascending account_id order, read into arrays (one SELECT), and the
--      position of each movement's two accounts among them (one SELECT);
--   2. each movement decided in arrival order by arithmetic on those arrays (no SQL per
--      movement): a refused movement changes nothing, so the later ones see exactly the
--      balances they would see alone;
--   3. the writes, one statement each: an UPDATE of every touched balance, an INSERT of the
--      transfers, of their entries, of the idempotency records, of the outbox rows;
--   4. one commit releases everything (the shrinking phase).
-- Lock order: every transaction of this ledger takes advisory locks (ascending) before row locks
-- (ascending), so no two can wait on each other in a cycle: no deadlock by construction.
--
-- What moved out of the lock window: transfer and event ids come from the caller (UUIDv7,
-- made in Python); the event's bytes are built by the outbox relay from the committed rows
-- (svc_transfer/events.py), so the outbox row of a movement carries an empty payload and the
-- Kafka headers the caller built (the trigger of 0004 is gone with the text-or-JSON trick).

DROP TRIGGER outbox_headers_from_json ON outbox;
DROP FUNCTION outbox_headers_from_json();
DROP FUNCTION move_money_batch(text[], text[], text[], uuid[], uuid[], uuid[], bigint[], text[], text[], text[]);
DROP FUNCTION move_money(text, text, text, uuid, uuid, uuid, bigint, text, text, text);
DROP FUNCTION pb_timestamp(int, timestamptz);
DROP FUNCTION pb_string(int, text);
DROP FUNCTION pb_bytes(int, bytea);
DROP FUNCTION pb_int64(int, bigint);
DROP FUNCTION pb_varint(bigint);
DROP TYPE movement;

-- Moves money for each movement of the batch: a TRANSFER between customer accounts, a DEPOSIT
-- (from NULL: the currency's cash account pays) or a WITHDRAWAL (to NULL: the cash account
-- receives). owner, when given, must own the debited account (a customer's transfer); tellers
-- pass NULL. initiator scopes request_id. One row per movement, in arrival order (ordinal is its
-- 1-based position): error is a reason code of API.md and nothing else is set, or the transfer
-- (replayed = true when an idempotent retry returned the original one and moved nothing).
-- Business refusals are returned, never raised; broken invariants are ASSERTed and abort the
-- whole batch; an operating error (lock or statement timeout) aborts it too, writing nothing.
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
    p_event_headers     jsonb[],  -- each movement's Kafka headers (request_id, traceparent, ...)
    p_transfer_ids      uuid[],   -- the transfer's id, should the movement be new (UUIDv7)
    p_event_ids         uuid[]    -- its MoneyMoved event's id, likewise
) RETURNS TABLE (
    ordinal          int,
    error            text,
    replayed         boolean,
    transfer_id      uuid,
    kind             text,
    request_id       text,
    from_account_id  uuid,
    to_account_id    uuid,
    amount           bigint,
    currency         text,
    description      text,
    create_time      timestamptz
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
-- A batch holds its locks for a few milliseconds at most; a second of waiting means overload,
-- and every caller gets LEDGER_BUSY (nothing moved, safe to retry with the same request_id).
SET lock_timeout = '1s'
-- One plan per statement, made once per session: custom plans re-planned every statement of
-- every call (statistics lookups, join estimates), most of a small batch's database time.
SET plan_cache_mode = 'force_generic_plan'
AS $$
#variable_conflict use_column
DECLARE
    int64_max       CONSTANT bigint := 9223372036854775807;
    int64_min       CONSTANT bigint := -9223372036854775807 - 1;
    -- Advisory lock class of idempotency keys (two-key form: apart from one-key advisory locks).
    idempotency_lock_class CONSTANT int := 7201;
    -- Bounds the lock window and the arrays below.
    batch_size_max  CONSTANT int := 256;
    size            int := cardinality(p_request_ids);
    -- Per movement (index = ordinal).
    keys            text[];    -- initiator, unit separator, request_id
    hashes          bytea[];   -- sha256 of kind, accounts, amount, currency, description
    previous_same_key int[];   -- the previous ordinal of this batch with the same key
    from_at         int[];     -- position of the debited account in the acc_ arrays (cash included)
    to_at           int[];
    cash_at         int[];     -- position of the currency's cash account (deposits and withdrawals)
    stored_hash     bytea[];   -- the stored idempotency record of the key, if any, and its transfer
    stored_id       uuid[];
    stored_kind     text[];
    stored_from     uuid[];
    stored_to       uuid[];
    stored_amount   bigint[];
    stored_currency text[];
    stored_description text[];
    stored_time     timestamptz[];
    -- Results, per movement.
    errors          text[] := array_fill(NULL::text, ARRAY[size]);
    replays         boolean[] := array_fill(false, ARRAY[size]);
    is_new          boolean[] := array_fill(false, ARRAY[size]);
    res_id          uuid[] := p_transfer_ids;
    res_kind        text[] := p_kinds;
    res_from        uuid[] := array_fill(NULL::uuid, ARRAY[size]);
    res_to          uuid[] := array_fill(NULL::uuid, ARRAY[size]);
    res_amount      bigint[] := p_amounts;
    res_currency    text[] := p_currencies;
    res_description text[] := p_descriptions;
    res_time        timestamptz[] := array_fill(NULL::timestamptz, ARRAY[size]);
    from_after      bigint[] := array_fill(NULL::bigint, ARRAY[size]);
    to_after        bigint[] := array_fill(NULL::bigint, ARRAY[size]);
    -- The locked accounts, ascending by id; acc_balance changes as movements are decided.
    acc_id          uuid[];
    acc_kind        text[];
    acc_owner       uuid[];
    acc_currency    text[];
    acc_status      text[];
    acc_balance     bigint[];
    acc_balance_before bigint[];
    -- Loop state.
    f               int;
    t               int;
    j               int;
    amt             bigint;
    new_count       int := 0;
    batch_time      timestamptz;
    last_time       timestamptz;
    changed         int;
    written         int;
    transfers_written int;
    entries_written int;
    keys_written    int;
    events_written  int;
    entries_sum     numeric;
    well_formed     boolean;
BEGIN
    ASSERT size BETWEEN 1 AND batch_size_max, format('move_money_batch: %s movements', size);
    ASSERT cardinality(p_initiators) = size AND cardinality(p_kinds) = size AND cardinality(p_owner_ids) = size
       AND cardinality(p_from_account_ids) = size AND cardinality(p_to_account_ids) = size
       AND cardinality(p_amounts) = size AND cardinality(p_currencies) = size
       AND cardinality(p_descriptions) = size AND cardinality(p_event_headers) = size
       AND cardinality(p_transfer_ids) = size AND cardinality(p_event_ids) = size,
       'move_money_batch: arrays of different lengths';
    -- Before any lock: keys, hashes, which movement repeats an earlier one's key, and whether
    -- every movement keeps the calling rules (programmer errors of the caller: crash loudly).
    SELECT array_agg(m.key ORDER BY m.o), array_agg(m.hash ORDER BY m.o), array_agg(m.previous ORDER BY m.o),
           bool_and(m.well_formed)
      INTO keys, hashes, previous_same_key, well_formed
      FROM (SELECT u.o, u.i || E'\x1f' || u.r AS key,
                   sha256(convert_to(concat_ws(E'\x1f', u.k, coalesce(u.f::text, '-'), coalesce(u.t::text, '-'),
                                               u.a::text, u.c, u.d), 'UTF8')) AS hash,
                   lag(u.o) OVER (PARTITION BY u.i, u.r ORDER BY u.o) AS previous,
                   u.k IN ('TRANSFER', 'DEPOSIT', 'WITHDRAWAL')
                   AND (u.k = 'DEPOSIT') = (u.f IS NULL) AND (u.k = 'WITHDRAWAL') = (u.t IS NULL)
                   AND (u.k = 'TRANSFER' OR u.w IS NULL)
                   AND char_length(u.i) BETWEEN 1 AND 200 AND char_length(u.r) BETWEEN 1 AND 64
                   AND char_length(u.d) <= 200 AND u.id IS NOT NULL AND u.e IS NOT NULL AS well_formed
              FROM unnest(p_initiators, p_request_ids, p_kinds, p_from_account_ids, p_to_account_ids, p_amounts,
                          p_currencies, p_descriptions, p_owner_ids, p_transfer_ids, p_event_ids)
                   WITH ORDINALITY AS u(i, r, k, f, t, a, c, d, w, id, e, o)) AS m;
    ASSERT well_formed, 'move_money_batch: a movement breaks the calling rules (kind, accounts, owner, lengths, ids)';

    -- Growing phase, 1: idempotency keys, ascending (hash collisions just re-enter one lock).
    -- A statement of its own: the next one's snapshot must be taken once these locks are held.
    PERFORM pg_advisory_xact_lock(idempotency_lock_class, s.lock_key)
       FROM (SELECT DISTINCT hashtext(k) AS lock_key FROM unnest(keys) AS k ORDER BY 1) AS s;

    -- The stored record of each key (once its lock is held, no other batch can be adding it).
    SELECT array_agg(s.params_hash ORDER BY u.o), array_agg(s.transfer_id ORDER BY u.o),
           array_agg(s.kind ORDER BY u.o), array_agg(s.from_account_id ORDER BY u.o),
           array_agg(s.to_account_id ORDER BY u.o), array_agg(s.amount ORDER BY u.o),
           array_agg(s.currency ORDER BY u.o), array_agg(s.description ORDER BY u.o),
           array_agg(s.create_time ORDER BY u.o)
      INTO stored_hash, stored_id, stored_kind, stored_from, stored_to, stored_amount, stored_currency,
           stored_description, stored_time
      FROM unnest(p_initiators, p_request_ids) WITH ORDINALITY AS u(i, r, o)
      LEFT JOIN (SELECT k.initiator, k.request_id, k.params_hash, t.transfer_id, t.kind, t.from_account_id,
                        t.to_account_id, t.amount, t.currency, t.description, t.create_time
                   FROM idempotency_keys k JOIN transfers t ON t.transfer_id = k.transfer_id) AS s
             ON s.initiator = u.i AND s.request_id = u.r;

    -- Growing phase, 2: every account row any movement names, the cash accounts of deposits
    -- and withdrawals included, locked in ascending id order as rows leave the sort; read into
    -- arrays, with the position of each movement's accounts among them (NULL: not there).
    WITH locked AS (
        SELECT l.account_id, l.kind, l.customer_id, l.currency, l.status, l.balance
          FROM ledger_accounts l
         WHERE l.account_id IN (
                SELECT unnest(p_from_account_ids || p_to_account_ids)
                UNION
                SELECT c.account_id FROM ledger_accounts c
                 WHERE c.kind = 'CASH'
                   AND c.currency IN (SELECT m.c FROM unnest(p_kinds, p_currencies) AS m(k, c) WHERE m.k <> 'TRANSFER'))
         ORDER BY l.account_id
           FOR UPDATE),
    numbered AS (
        SELECT row_number() OVER (ORDER BY k.account_id)::int AS pos, k.* FROM locked k),
    positions AS (
        SELECT u.o, fa.pos AS from_pos, ta.pos AS to_pos, ca.pos AS cash_pos
          FROM unnest(p_from_account_ids, p_to_account_ids, p_kinds, p_currencies) WITH ORDINALITY AS u(f, t, k, c, o)
          LEFT JOIN numbered fa ON fa.account_id = u.f
          LEFT JOIN numbered ta ON ta.account_id = u.t
          LEFT JOIN numbered ca ON u.k <> 'TRANSFER' AND ca.kind = 'CASH' AND ca.currency = u.c)
    SELECT a.ids, a.kinds, a.owners, a.currencies, a.statuses, a.balances, p.froms, p.tos, p.cashes
      INTO acc_id, acc_kind, acc_owner, acc_currency, acc_status, acc_balance, from_at, to_at, cash_at
      FROM (SELECT array_agg(n.account_id ORDER BY n.pos) AS ids, array_agg(n.kind ORDER BY n.pos) AS kinds,
                   array_agg(n.customer_id ORDER BY n.pos) AS owners, array_agg(n.currency ORDER BY n.pos) AS currencies,
                   array_agg(n.status ORDER BY n.pos) AS statuses, array_agg(n.balance ORDER BY n.pos) AS balances
              FROM numbered n) AS a,
           (SELECT array_agg(x.from_pos ORDER BY x.o) AS froms, array_agg(x.to_pos ORDER BY x.o) AS tos,
                   array_agg(x.cash_pos ORDER BY x.o) AS cashes
              FROM positions x) AS p;
    acc_id := coalesce(acc_id, '{}');
    acc_balance_before := acc_balance;

    -- Taken after the locks, the timestamps order one account's movements as they commit: the
    -- n-th new movement of the batch gets batch_time + n µs, and the next batch on any of these
    -- accounts takes its own time only after this one committed (see the wait at the end).
    batch_time := clock_timestamp();

    -- Each movement in arrival order, against the balances the previous ones left.
    FOR i IN 1..size LOOP
        -- Input that is wrong whatever the state (the service rejects it first; this keeps the
        -- function safe for any caller).
        amt := p_amounts[i];
        IF amt IS NULL OR amt <= 0 THEN
            errors[i] := 'INVALID_AMOUNT';
            CONTINUE;
        END IF;
        IF p_from_account_ids[i] = p_to_account_ids[i] THEN
            errors[i] := 'SAME_ACCOUNT';
            CONTINUE;
        END IF;

        -- Idempotency: the key's stored record, else the last movement of this batch that the
        -- key succeeded with (a refused one wrote nothing, as if it had never come).
        j := NULL;
        IF stored_id[i] IS NULL THEN
            j := previous_same_key[i];
            WHILE j IS NOT NULL AND errors[j] IS NOT NULL LOOP
                j := previous_same_key[j];
            END LOOP;
        END IF;
        IF stored_id[i] IS NOT NULL OR j IS NOT NULL THEN
            IF coalesce(stored_hash[i], hashes[j]) <> hashes[i] THEN
                errors[i] := 'IDEMPOTENCY_KEY_REUSED';
                CONTINUE;
            END IF;
            replays[i] := true;
            IF stored_id[i] IS NOT NULL THEN
                res_id[i] := stored_id[i]; res_kind[i] := stored_kind[i]; res_from[i] := stored_from[i];
                res_to[i] := stored_to[i]; res_amount[i] := stored_amount[i]; res_currency[i] := stored_currency[i];
                res_description[i] := stored_description[i]; res_time[i] := stored_time[i];
            ELSE
                res_id[i] := res_id[j]; res_kind[i] := res_kind[j]; res_from[i] := res_from[j];
                res_to[i] := res_to[j]; res_amount[i] := res_amount[j]; res_currency[i] := res_currency[j];
                res_description[i] := res_description[j]; res_time[i] := res_time[j];
            END IF;
            CONTINUE;
        END IF;

        -- The two accounts: the named ones, or the currency's cash account for the unnamed side
        -- (none for an unsupported currency: then no customer account can match it, below).
        f := CASE WHEN p_from_account_ids[i] IS NULL THEN cash_at[i] ELSE from_at[i] END;
        t := CASE WHEN p_to_account_ids[i] IS NULL THEN cash_at[i] ELSE to_at[i] END;

        -- Checks on the locked rows, in the order of API.md. A customer names only customer
        -- accounts; the cash account is never addressable from outside, and another customer's
        -- source account does not exist.
        IF (p_from_account_ids[i] IS NOT NULL AND (f IS NULL OR acc_kind[f] <> 'CUSTOMER'))
           OR (p_to_account_ids[i] IS NOT NULL AND (t IS NULL OR acc_kind[t] <> 'CUSTOMER'))
           OR (p_owner_ids[i] IS NOT NULL AND acc_owner[f] IS DISTINCT FROM p_owner_ids[i]) THEN
            errors[i] := 'ACCOUNT_NOT_FOUND';
            CONTINUE;
        END IF;
        IF acc_status[f] <> 'ACTIVE' OR acc_status[t] <> 'ACTIVE' THEN
            errors[i] := 'ACCOUNT_INACTIVE';
            CONTINUE;
        END IF;
        IF f IS NULL OR t IS NULL OR acc_currency[f] <> p_currencies[i] OR acc_currency[t] <> p_currencies[i] THEN
            errors[i] := 'CURRENCY_MISMATCH';
            CONTINUE;
        END IF;
        IF acc_kind[f] = 'CUSTOMER' AND acc_balance[f] < amt THEN
            errors[i] := 'INSUFFICIENT_FUNDS';
            CONTINUE;
        END IF;
        -- A balance must stay representable: an amount that would overflow one is not valid.
        IF acc_balance[t] > int64_max - amt OR acc_balance[f] < int64_min + amt THEN
            errors[i] := 'INVALID_AMOUNT';
            CONTINUE;
        END IF;

        -- Accepted: the balances the next movements see.
        acc_balance[f] := acc_balance[f] - amt;
        acc_balance[t] := acc_balance[t] + amt;
        from_after[i] := acc_balance[f];
        to_after[i] := acc_balance[t];
        res_from[i] := acc_id[f];
        res_to[i] := acc_id[t];
        res_time[i] := batch_time + new_count * interval '1 microsecond';
        new_count := new_count + 1;
        is_new[i] := true;
    END LOOP;

    IF new_count > 0 THEN
        -- Every write in one statement. The UPDATE changes only the balances that moved, and only
        -- where the row still holds the balance read under its lock (the count is asserted);
        -- entries are read back: two per movement, summing to zero. Foreign keys are checked at
        -- the end of the statement, when the transfers they name are in place.
        WITH moved AS (
            SELECT b.id, b.after, b.before FROM unnest(acc_id, acc_balance, acc_balance_before) AS b(id, after, before)
             WHERE b.after <> b.before),
        balances AS (
            UPDATE ledger_accounts a SET balance = m.after FROM moved m
             WHERE a.account_id = m.id AND a.balance = m.before
            RETURNING 1),
        new_movements AS (
            SELECT u.* FROM unnest(is_new, p_transfer_ids, p_kinds, p_request_ids, res_from, res_to, p_amounts,
                                   p_currencies, p_descriptions, res_time, from_after, to_after, p_initiators,
                                   hashes, p_event_ids, p_event_headers)
                   AS u(n, id, k, r, f, t, a, c, d, time, fa, ta, i, h, e, headers)
             WHERE u.n),
        new_transfers AS (
            INSERT INTO transfers (transfer_id, kind, request_id, from_account_id, to_account_id, amount, currency,
                                   description, create_time)
            SELECT m.id, m.k, m.r, m.f, m.t, m.a, m.c, m.d, m.time FROM new_movements m
            RETURNING 1),
        new_entries AS (
            INSERT INTO entries (transfer_id, account_id, amount, balance_after, create_time)
            SELECT m.id, side.account_id, side.amount, side.balance_after, m.time
              FROM new_movements m
             CROSS JOIN LATERAL (VALUES (m.f, -m.a, m.fa), (m.t, m.a, m.ta)) AS side(account_id, amount, balance_after)
            RETURNING entries.amount),
        new_keys AS (
            INSERT INTO idempotency_keys (initiator, request_id, params_hash, transfer_id, create_time)
            SELECT m.i, m.r, m.h, m.id, m.time FROM new_movements m
            RETURNING 1),
        -- bank.events.v1.MoneyMoved: the relay builds its bytes from the rows above.
        new_events AS (
            INSERT INTO outbox (event_id, topic, aggregate_id, event_type, payload, headers)
            SELECT m.e, 'bank.transfer.v1', m.id::text, 'bank.events.v1.MoneyMoved', ''::bytea, m.headers
              FROM new_movements m
            RETURNING 1)
        SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM balances), (SELECT count(*) FROM new_transfers),
               (SELECT count(*) FROM new_entries), (SELECT sum(e.amount) FROM new_entries e),
               (SELECT count(*) FROM new_keys), (SELECT count(*) FROM new_events)
          INTO changed, written, transfers_written, entries_written, entries_sum, keys_written, events_written;
        ASSERT written = changed, format('move_money_batch: %s balances written of %s', written, changed);
        ASSERT transfers_written = new_count AND keys_written = new_count AND events_written = new_count,
               format('move_money_batch: %s movements, %s transfers, %s keys, %s events written', new_count,
                      transfers_written, keys_written, events_written);
        ASSERT entries_written = 2 * new_count AND entries_sum = 0,
               format('move_money_batch: %s entries summing to %s for %s movements', entries_written, entries_sum,
                      new_count);

        -- The commit must come after the last timestamp handed out, so that the next batch on
        -- these accounts gets later ones. The writes above take far longer than new_count µs;
        -- this bounded wait only makes that certain.
        last_time := batch_time + (new_count - 1) * interval '1 microsecond';
        WHILE clock_timestamp() <= last_time LOOP
        END LOOP;
    END IF;

    RETURN QUERY
        SELECT u.o::int, u.e, u.rp, CASE WHEN u.e IS NULL THEN u.id END, CASE WHEN u.e IS NULL THEN u.k END,
               CASE WHEN u.e IS NULL THEN u.r END, u.f, u.t, CASE WHEN u.e IS NULL THEN u.a END,
               CASE WHEN u.e IS NULL THEN u.c END, CASE WHEN u.e IS NULL THEN u.d END, u.time
          FROM unnest(errors, replays, res_id, res_kind, p_request_ids, res_from, res_to, res_amount, res_currency,
                      res_description, res_time) WITH ORDINALITY AS u(e, rp, id, k, r, f, t, a, c, d, time, o)
         ORDER BY u.o;
END $$;
