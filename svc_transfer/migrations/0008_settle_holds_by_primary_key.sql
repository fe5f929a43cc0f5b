-- 0006's move_money_batch, changed in one statement: the UPDATE that moves a hold out of PENDING
-- finds it by its primary key again.
--
-- 0006 wrote that UPDATE's guard as `t.status = 'PENDING'`. With that constant, the generic plan
-- (plan_cache_mode = force_generic_plan, made once per session) may drive the join from the
-- partial index holds_pending_by_expiry, and then walks the whole index: every PENDING hold,
-- plus the entries of holds settled since the last vacuum. And it does so in every batch that
-- writes, plain transfers too, where the settlements are empty. Measured on a ledger with 470
-- PENDING holds, the batch's write statement took 0.97 ms for a transfer and 1.59 ms for a post;
-- with the fix, 0.55 ms and 0.58 ms. Holds may last a week, so that index only grows.
-- The guard now compares with a column of the settlements, which no partial index's predicate
-- can match. So the only path to the row is transfers_pkey, one probe per settlement.
-- tests/test_ledger_plans.py counts the index tuples a batch reads.
-- Nothing else changes: the same signature, rules, locks and results as 0006.

CREATE OR REPLACE FUNCTION move_money_batch(
    p_initiators        text[],
    p_request_ids       text[],   -- NULL for EXPIRE
    p_kinds             text[],   -- TRANSFER, DEPOSIT, WITHDRAWAL, POST, VOID, EXPIRE
    p_owner_ids         uuid[],
    p_from_account_ids  uuid[],   -- NULL for POST, VOID, EXPIRE: the hold names its accounts
    p_to_account_ids    uuid[],
    p_amounts           bigint[], -- POST: NULL moves the whole held amount; VOID, EXPIRE: NULL
    p_currencies        text[],
    p_descriptions      text[],
    p_event_headers     jsonb[],  -- each movement's Kafka headers (request_id, traceparent, ...)
    p_transfer_ids      uuid[],   -- the transfer's id, should a TRANSFER/DEPOSIT/WITHDRAWAL be new
    p_event_ids         uuid[],   -- its event's id: MoneyMoved, HoldPlaced, HoldPosted/Voided/Expired
    p_hold_seconds      int[]  DEFAULT NULL,  -- TRANSFER: 60..604800 makes it a hold
    p_hold_ids          uuid[] DEFAULT NULL,  -- POST, VOID, EXPIRE: the hold they settle
    p_money_event_ids   uuid[] DEFAULT NULL   -- POST: its MoneyMoved's id (p_event_ids: HoldPosted's)
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
    create_time      timestamptz,
    status           text,         -- PENDING, COMPLETED, VOIDED, EXPIRED; also on TRANSFER_NOT_PENDING
    held_amount      bigint,       -- NULL: never a hold
    expire_time      timestamptz
)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
-- A batch holds its locks for a few milliseconds at most; a second of waiting means overload,
-- and every caller gets LEDGER_BUSY (nothing moved, safe to retry with the same request_id).
SET lock_timeout = '1s'
-- One plan per statement, made once per session (0005: custom plans cost most of a small batch).
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
    keys            text[];    -- initiator, unit separator, request_id (NULL for EXPIRE)
    hashes          bytea[];   -- sha256 of the parameters (0005's for plain movements, unchanged)
    previous_same_key int[];   -- the previous ordinal of this batch with the same key
    has_holds       boolean;   -- some movement names a hold: its rows are read and locked
    hold_at         int[];     -- position of the movement's hold in the h_ arrays
    from_at         int[];     -- position of the debited account in the acc_ arrays (cash included)
    to_at           int[];
    cash_at         int[];     -- position of the currency's cash account (deposits and withdrawals)
    stored_hash     bytea[];   -- the stored idempotency record of the key, if any, and its transfer
    stored_id       uuid[];
    stored_kind     text[];
    stored_request_id text[];
    stored_from     uuid[];
    stored_to       uuid[];
    stored_amount   bigint[];
    stored_currency text[];
    stored_description text[];
    stored_time     timestamptz[];
    stored_status   text[];
    stored_held     bigint[];
    stored_expire   timestamptz[];
    -- The holds named, locked, ascending by id; h_status changes as movements are decided.
    h_id            uuid[];
    h_from          uuid[];
    h_to            uuid[];
    h_from_owner    uuid[];
    h_to_owner      uuid[];
    h_status        text[];
    h_held          bigint[];
    h_expire        timestamptz[];
    h_amount        bigint[];
    h_currency      text[];
    h_description   text[];
    h_request_id    text[];
    h_time          timestamptz[];
    hold_sides      uuid[] := '{}';  -- both accounts of every named row that is a hold
    -- Results, per movement.
    errors          text[] := array_fill(NULL::text, ARRAY[size]);
    replays         boolean[] := array_fill(false, ARRAY[size]);
    is_new          boolean[] := array_fill(false, ARRAY[size]);
    res_id          uuid[] := p_transfer_ids;
    res_kind        text[] := p_kinds;
    res_request_id  text[] := p_request_ids;
    res_from        uuid[] := array_fill(NULL::uuid, ARRAY[size]);
    res_to          uuid[] := array_fill(NULL::uuid, ARRAY[size]);
    res_amount      bigint[] := p_amounts;
    res_currency    text[] := p_currencies;
    res_description text[] := p_descriptions;
    res_time        timestamptz[] := array_fill(NULL::timestamptz, ARRAY[size]);
    res_status      text[] := array_fill(NULL::text, ARRAY[size]);
    res_held        bigint[] := array_fill(NULL::bigint, ARRAY[size]);
    res_expire      timestamptz[] := array_fill(NULL::timestamptz, ARRAY[size]);
    settle_at       timestamptz[] := array_fill(NULL::timestamptz, ARRAY[size]);  -- a settlement's time
    from_after      bigint[] := array_fill(NULL::bigint, ARRAY[size]);
    to_after        bigint[] := array_fill(NULL::bigint, ARRAY[size]);
    -- The locked accounts, ascending by id; balances and pending sums change as movements are decided.
    acc_id          uuid[];
    acc_kind        text[];
    acc_owner       uuid[];
    acc_currency    text[];
    acc_status      text[];
    acc_balance     bigint[];
    acc_balance_before bigint[];
    acc_pending_debits bigint[];
    acc_pending_debits_before bigint[];
    acc_pending_credits bigint[];
    acc_pending_credits_before bigint[];
    -- Loop state.
    f               int;
    t               int;
    j               int;
    hp              int;
    amt             bigint;
    held            bigint;
    new_count       int := 0;   -- accepted operations of any kind: each gets batch_time + n µs
    creations       int := 0;   -- new transfers rows (plain movements and holds)
    completed_creations int := 0;
    posts           int := 0;
    voids           int := 0;
    expiries        int := 0;
    batch_time      timestamptz;
    last_time       timestamptz;
    changed         int;
    written         int;
    transfers_written int;
    settled_written int;
    entries_written int;
    keys_written    int;
    events_written  int;
    entries_sum     numeric;
    well_formed     boolean;
BEGIN
    ASSERT size BETWEEN 1 AND batch_size_max, format('move_money_batch: %s movements', size);
    -- A NULL array reads as all-NULL (0005's callers pass none of the three).
    p_hold_seconds := coalesce(p_hold_seconds, array_fill(NULL::int, ARRAY[size]));
    p_hold_ids := coalesce(p_hold_ids, array_fill(NULL::uuid, ARRAY[size]));
    p_money_event_ids := coalesce(p_money_event_ids, array_fill(NULL::uuid, ARRAY[size]));
    ASSERT cardinality(p_initiators) = size AND cardinality(p_kinds) = size AND cardinality(p_owner_ids) = size
       AND cardinality(p_from_account_ids) = size AND cardinality(p_to_account_ids) = size
       AND cardinality(p_amounts) = size AND cardinality(p_currencies) = size
       AND cardinality(p_descriptions) = size AND cardinality(p_event_headers) = size
       AND cardinality(p_transfer_ids) = size AND cardinality(p_event_ids) = size
       AND cardinality(p_hold_seconds) = size AND cardinality(p_hold_ids) = size
       AND cardinality(p_money_event_ids) = size,
       'move_money_batch: arrays of different lengths';
    -- Before any lock: keys, hashes, which movement repeats an earlier one's key, whether any
    -- names a hold, and whether every movement keeps the calling rules (programmer errors of the
    -- caller: crash loudly). A plain movement's hash is 0005's, byte for byte: keys stored before
    -- 0006 still replay. A hold's and a settlement's are apart from it (a 'HOLD' tag, the hold id).
    SELECT array_agg(m.key ORDER BY m.o), array_agg(m.hash ORDER BY m.o), array_agg(m.previous ORDER BY m.o),
           bool_and(m.well_formed), bool_or(m.h IS NOT NULL)
      INTO keys, hashes, previous_same_key, well_formed, has_holds
      FROM (SELECT u.o, u.h, CASE WHEN u.k = 'EXPIRE' THEN NULL ELSE u.i || E'\x1f' || u.r END AS key,
                   sha256(convert_to(CASE
                       WHEN u.k IN ('POST', 'VOID') THEN concat_ws(E'\x1f', u.k, u.h::text, coalesce(u.a::text, '-'))
                       WHEN u.hs IS NOT NULL THEN concat_ws(E'\x1f', 'HOLD', coalesce(u.f::text, '-'),
                                                            coalesce(u.t::text, '-'), u.a::text, u.c, u.d, u.hs::text)
                       ELSE concat_ws(E'\x1f', u.k, coalesce(u.f::text, '-'), coalesce(u.t::text, '-'),
                                      u.a::text, u.c, u.d) END, 'UTF8')) AS hash,
                   CASE WHEN u.k <> 'EXPIRE' THEN lag(u.o) OVER (PARTITION BY u.i, u.r ORDER BY u.o) END AS previous,
                   CASE
                       WHEN u.k IN ('TRANSFER', 'DEPOSIT', 'WITHDRAWAL') THEN
                           (u.k = 'DEPOSIT') = (u.f IS NULL) AND (u.k = 'WITHDRAWAL') = (u.t IS NULL)
                           AND (u.k = 'TRANSFER' OR u.w IS NULL)
                           AND (u.hs IS NULL OR (u.k = 'TRANSFER' AND u.hs BETWEEN 60 AND 604800))
                           AND u.h IS NULL AND u.me IS NULL AND u.id IS NOT NULL
                           AND char_length(u.r) BETWEEN 1 AND 64 AND char_length(u.d) <= 200
                       WHEN u.k IN ('POST', 'VOID') THEN
                           u.f IS NULL AND u.t IS NULL AND u.h IS NOT NULL AND u.hs IS NULL
                           AND (u.k = 'POST' OR u.a IS NULL) AND (u.me IS NOT NULL) = (u.k = 'POST')
                           AND char_length(u.r) BETWEEN 1 AND 64
                       WHEN u.k = 'EXPIRE' THEN
                           u.f IS NULL AND u.t IS NULL AND u.h IS NOT NULL AND u.hs IS NULL AND u.a IS NULL
                           AND u.w IS NULL AND u.r IS NULL AND u.me IS NULL
                       ELSE false
                   END
                   AND char_length(u.i) BETWEEN 1 AND 200 AND u.e IS NOT NULL AS well_formed
              FROM unnest(p_initiators, p_request_ids, p_kinds, p_from_account_ids, p_to_account_ids, p_amounts,
                          p_currencies, p_descriptions, p_owner_ids, p_transfer_ids, p_event_ids, p_hold_seconds,
                          p_hold_ids, p_money_event_ids)
                   WITH ORDINALITY AS u(i, r, k, f, t, a, c, d, w, id, e, hs, h, me, o)) AS m;
    ASSERT well_formed, 'move_money_batch: a movement breaks the calling rules (kind, accounts, owner, hold, lengths, ids)';

    -- Growing phase, 1: idempotency keys, ascending (hash collisions just re-enter one lock).
    -- A statement of its own: the next one's snapshot must be taken once these locks are held.
    PERFORM pg_advisory_xact_lock(idempotency_lock_class, s.lock_key)
       FROM (SELECT DISTINCT hashtext(k) AS lock_key FROM unnest(keys) AS k WHERE k IS NOT NULL ORDER BY 1) AS s;

    -- The stored record of each key (once its lock is held, no other batch can be adding it): the
    -- transfer it created or the hold it settled. The replay is the first answer: a hold's
    -- creation replays PENDING with amount = held, whatever happened to the hold since; a
    -- settlement's replays the hold as it left PENDING (it leaves PENDING once).
    SELECT array_agg(s.params_hash ORDER BY u.o), array_agg(s.transfer_id ORDER BY u.o),
           array_agg(s.kind ORDER BY u.o), array_agg(s.request_id ORDER BY u.o),
           array_agg(s.from_account_id ORDER BY u.o), array_agg(s.to_account_id ORDER BY u.o),
           array_agg(s.amount ORDER BY u.o), array_agg(s.currency ORDER BY u.o),
           array_agg(s.description ORDER BY u.o), array_agg(s.create_time ORDER BY u.o),
           array_agg(s.status ORDER BY u.o), array_agg(s.held_amount ORDER BY u.o),
           array_agg(s.expire_time ORDER BY u.o)
      INTO stored_hash, stored_id, stored_kind, stored_request_id, stored_from, stored_to, stored_amount,
           stored_currency, stored_description, stored_time, stored_status, stored_held, stored_expire
      FROM unnest(p_initiators, p_request_ids) WITH ORDINALITY AS u(i, r, o)
      LEFT JOIN (SELECT k.initiator, k.request_id AS key_request_id, k.params_hash, t.transfer_id, t.kind,
                        t.request_id, t.from_account_id, t.to_account_id, t.currency, t.description,
                        t.create_time, t.held_amount, t.expire_time,
                        CASE WHEN k.transfer_id IS NOT NULL AND t.held_amount IS NOT NULL
                             THEN 'PENDING' ELSE t.status END AS status,
                        CASE WHEN k.transfer_id IS NOT NULL AND t.held_amount IS NOT NULL
                             THEN t.held_amount ELSE t.amount END AS amount
                   FROM idempotency_keys k
                   JOIN transfers t ON t.transfer_id = coalesce(k.transfer_id, k.settled_transfer_id)) AS s
             ON s.initiator = u.i AND s.key_request_id = u.r;

    -- Growing phase, 2 (only when a movement names a hold: plain batches keep 0005's statements):
    -- the named transfers rows, locked in ascending id order, before the accounts, which they
    -- say to lock. Their owners are read unlocked: an account's owner never changes.
    IF has_holds THEN
        WITH locked AS (
            SELECT t.transfer_id, t.from_account_id, t.to_account_id, t.status, t.held_amount, t.expire_time,
                   t.amount, t.currency, t.description, t.request_id, t.create_time
              FROM transfers t
             WHERE t.transfer_id IN (SELECT unnest(p_hold_ids))
             ORDER BY t.transfer_id
               FOR UPDATE),
        numbered AS (
            SELECT row_number() OVER (ORDER BY l.transfer_id)::int AS pos, l.*,
                   fa.customer_id AS from_owner, ta.customer_id AS to_owner
              FROM locked l
              JOIN ledger_accounts fa ON fa.account_id = l.from_account_id
              JOIN ledger_accounts ta ON ta.account_id = l.to_account_id)
        SELECT a.ids, a.froms, a.tos, a.from_owners, a.to_owners, a.statuses, a.helds, a.expires, a.amounts,
               a.currencies, a.descriptions, a.request_ids, a.times, coalesce(a.sides, '{}'), p.positions
          INTO h_id, h_from, h_to, h_from_owner, h_to_owner, h_status, h_held, h_expire, h_amount,
               h_currency, h_description, h_request_id, h_time, hold_sides, hold_at
          FROM (SELECT array_agg(n.transfer_id ORDER BY n.pos) AS ids, array_agg(n.from_account_id ORDER BY n.pos) AS froms,
                       array_agg(n.to_account_id ORDER BY n.pos) AS tos, array_agg(n.from_owner ORDER BY n.pos) AS from_owners,
                       array_agg(n.to_owner ORDER BY n.pos) AS to_owners, array_agg(n.status ORDER BY n.pos) AS statuses,
                       array_agg(n.held_amount ORDER BY n.pos) AS helds, array_agg(n.expire_time ORDER BY n.pos) AS expires,
                       array_agg(n.amount ORDER BY n.pos) AS amounts, array_agg(n.currency ORDER BY n.pos) AS currencies,
                       array_agg(n.description ORDER BY n.pos) AS descriptions,
                       array_agg(n.request_id ORDER BY n.pos) AS request_ids, array_agg(n.create_time ORDER BY n.pos) AS times,
                       -- Only a hold's accounts: naming a deposit's id must not lock the cash account.
                       array_agg(n.from_account_id ORDER BY n.pos) FILTER (WHERE n.held_amount IS NOT NULL)
                       || array_agg(n.to_account_id ORDER BY n.pos) FILTER (WHERE n.held_amount IS NOT NULL) AS sides
                  FROM numbered n) AS a,
               (SELECT array_agg(n.pos ORDER BY u.o) AS positions
                  FROM unnest(p_hold_ids) WITH ORDINALITY AS u(h, o)
                  LEFT JOIN numbered n ON n.transfer_id = u.h) AS p;
    END IF;

    -- Growing phase, 3: every account row any movement names, a hold's two accounts for a
    -- settlement, the cash accounts of deposits and withdrawals, locked in ascending id order as
    -- rows leave the sort; read into arrays, with the position of each movement's accounts among
    -- them (NULL: not there). A POST/VOID/EXPIRE never locks or uses a cash account.
    WITH locked AS (
        SELECT l.account_id, l.kind, l.customer_id, l.currency, l.status, l.balance, l.pending_debits,
               l.pending_credits
          FROM ledger_accounts l
         WHERE l.account_id IN (
                SELECT unnest(p_from_account_ids || p_to_account_ids || hold_sides)
                UNION
                SELECT c.account_id FROM ledger_accounts c
                 WHERE c.kind = 'CASH'
                   AND c.currency IN (SELECT m.c FROM unnest(p_kinds, p_currencies) AS m(k, c)
                                       WHERE m.k IN ('DEPOSIT', 'WITHDRAWAL')))
         ORDER BY l.account_id
           FOR UPDATE),
    numbered AS (
        SELECT row_number() OVER (ORDER BY k.account_id)::int AS pos, k.* FROM locked k),
    positions AS (
        SELECT u.o, fa.pos AS from_pos, ta.pos AS to_pos, ca.pos AS cash_pos
          FROM unnest(p_from_account_ids, p_to_account_ids, p_kinds, p_currencies, hold_at)
               WITH ORDINALITY AS u(f, t, k, c, hp, o)
          LEFT JOIN numbered fa ON fa.account_id = coalesce(u.f, h_from[u.hp])
          LEFT JOIN numbered ta ON ta.account_id = coalesce(u.t, h_to[u.hp])
          LEFT JOIN numbered ca ON u.k IN ('DEPOSIT', 'WITHDRAWAL') AND ca.kind = 'CASH' AND ca.currency = u.c)
    SELECT a.ids, a.kinds, a.owners, a.currencies, a.statuses, a.balances, a.debits, a.credits, p.froms, p.tos,
           p.cashes
      INTO acc_id, acc_kind, acc_owner, acc_currency, acc_status, acc_balance, acc_pending_debits,
           acc_pending_credits, from_at, to_at, cash_at
      FROM (SELECT array_agg(n.account_id ORDER BY n.pos) AS ids, array_agg(n.kind ORDER BY n.pos) AS kinds,
                   array_agg(n.customer_id ORDER BY n.pos) AS owners, array_agg(n.currency ORDER BY n.pos) AS currencies,
                   array_agg(n.status ORDER BY n.pos) AS statuses, array_agg(n.balance ORDER BY n.pos) AS balances,
                   array_agg(n.pending_debits ORDER BY n.pos) AS debits,
                   array_agg(n.pending_credits ORDER BY n.pos) AS credits
              FROM numbered n) AS a,
           (SELECT array_agg(x.from_pos ORDER BY x.o) AS froms, array_agg(x.to_pos ORDER BY x.o) AS tos,
                   array_agg(x.cash_pos ORDER BY x.o) AS cashes
              FROM positions x) AS p;
    acc_id := coalesce(acc_id, '{}');
    acc_balance_before := acc_balance;
    acc_pending_debits_before := acc_pending_debits;
    acc_pending_credits_before := acc_pending_credits;

    -- Taken after the locks, the timestamps order one account's movements as they commit: the
    -- n-th accepted operation of the batch gets batch_time + n µs, and the next batch on any of
    -- these accounts takes its own time only after this one committed (see the wait at the end).
    -- It is also THE clock of expiry: at or after expire_time a hold is lapsed.
    batch_time := clock_timestamp();

    -- Each movement in arrival order, against the balances and holds the previous ones left.
    FOR i IN 1..size LOOP
        amt := p_amounts[i];
        -- Input that is wrong whatever the state (the service rejects it first; this keeps the
        -- function safe for any caller). A POST's amount may be NULL: its checks come below.
        IF p_kinds[i] IN ('TRANSFER', 'DEPOSIT', 'WITHDRAWAL') THEN
            IF amt IS NULL OR amt <= 0 THEN
                errors[i] := 'INVALID_AMOUNT';
                CONTINUE;
            END IF;
            IF p_from_account_ids[i] = p_to_account_ids[i] THEN
                errors[i] := 'SAME_ACCOUNT';
                CONTINUE;
            END IF;
        END IF;

        -- Idempotency (not for EXPIRE, which has no key): the key's stored record, else the last
        -- movement of this batch that the key succeeded with (a refused one wrote nothing).
        IF p_kinds[i] <> 'EXPIRE' THEN
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
                    res_id[i] := stored_id[i]; res_kind[i] := stored_kind[i]; res_request_id[i] := stored_request_id[i];
                    res_from[i] := stored_from[i]; res_to[i] := stored_to[i]; res_amount[i] := stored_amount[i];
                    res_currency[i] := stored_currency[i]; res_description[i] := stored_description[i];
                    res_time[i] := stored_time[i]; res_status[i] := stored_status[i];
                    res_held[i] := stored_held[i]; res_expire[i] := stored_expire[i];
                ELSE
                    res_id[i] := res_id[j]; res_kind[i] := res_kind[j]; res_request_id[i] := res_request_id[j];
                    res_from[i] := res_from[j]; res_to[i] := res_to[j]; res_amount[i] := res_amount[j];
                    res_currency[i] := res_currency[j]; res_description[i] := res_description[j];
                    res_time[i] := res_time[j]; res_status[i] := res_status[j];
                    res_held[i] := res_held[j]; res_expire[i] := res_expire[j];
                END IF;
                CONTINUE;
            END IF;
        END IF;

        IF p_kinds[i] IN ('TRANSFER', 'DEPOSIT', 'WITHDRAWAL') THEN
            -- The two accounts: the named ones, or the currency's cash account for the unnamed
            -- side (none for an unsupported currency: then no customer account can match it).
            f := CASE WHEN p_from_account_ids[i] IS NULL THEN cash_at[i] ELSE from_at[i] END;
            t := CASE WHEN p_to_account_ids[i] IS NULL THEN cash_at[i] ELSE to_at[i] END;

            -- Checks on the locked rows, in the order of API.md. A customer names only customer
            -- accounts; the cash account is never addressable from outside, and another
            -- customer's source account does not exist.
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
            -- Against the available balance: what PENDING holds reserve is not there to spend.
            IF acc_kind[f] = 'CUSTOMER' AND acc_balance[f] - acc_pending_debits[f] < amt THEN
                errors[i] := 'INSUFFICIENT_FUNDS';
                CONTINUE;
            END IF;
            -- A balance must stay representable: an amount that would overflow one is not valid.
            IF acc_balance[t] > int64_max - amt OR acc_balance[f] < int64_min + amt THEN
                errors[i] := 'INVALID_AMOUNT';
                CONTINUE;
            END IF;

            -- A hold: the sums of holds must stay representable too.
            IF p_hold_seconds[i] IS NOT NULL
               AND (acc_pending_debits[f] > int64_max - amt OR acc_pending_credits[t] > int64_max - amt) THEN
                errors[i] := 'INVALID_AMOUNT';
                CONTINUE;
            END IF;

            -- Accepted.
            res_from[i] := acc_id[f];
            res_to[i] := acc_id[t];
            res_time[i] := batch_time + new_count * interval '1 microsecond';
            new_count := new_count + 1;
            creations := creations + 1;
            is_new[i] := true;
            IF p_hold_seconds[i] IS NULL THEN
                -- The balances the next movements see.
                acc_balance[f] := acc_balance[f] - amt;
                acc_balance[t] := acc_balance[t] + amt;
                from_after[i] := acc_balance[f];
                to_after[i] := acc_balance[t];
                res_status[i] := 'COMPLETED';
                completed_creations := completed_creations + 1;
            ELSE
                -- Reserved, nothing moved: no balance changes, no entries until posted.
                acc_pending_debits[f] := acc_pending_debits[f] + amt;
                acc_pending_credits[t] := acc_pending_credits[t] + amt;
                res_status[i] := 'PENDING';
                res_held[i] := amt;
                res_expire[i] := res_time[i] + make_interval(secs => p_hold_seconds[i]);
            END IF;
            CONTINUE;
        END IF;

        -- POST, VOID, EXPIRE: rules in the order of the design (section 2.4).
        hp := hold_at[i];
        -- 1. Not there, or the caller owns neither side (NULL-safe: a cash side has no owner).
        IF hp IS NULL OR (p_owner_ids[i] IS NOT NULL AND p_owner_ids[i] IS DISTINCT FROM h_from_owner[hp]
                          AND p_owner_ids[i] IS DISTINCT FROM h_to_owner[hp]) THEN
            errors[i] := 'TRANSFER_NOT_FOUND';
            CONTINUE;
        END IF;
        -- 2. The payer alone cannot settle (a customer owning both sides is the payee).
        IF p_owner_ids[i] IS NOT NULL AND p_owner_ids[i] IS DISTINCT FROM h_to_owner[hp] THEN
            errors[i] := 'NOT_PAYEE';
            CONTINUE;
        END IF;
        -- 3. Never a hold, or already posted or voided: the status goes back with the reason.
        IF h_held[hp] IS NULL OR h_status[hp] IN ('COMPLETED', 'VOIDED') THEN
            errors[i] := 'TRANSFER_NOT_PENDING';
            res_status[i] := h_status[hp];
            CONTINUE;
        END IF;
        -- 4. Lapsed (released or not): only its release acts on it.
        IF h_status[hp] = 'EXPIRED' OR batch_time >= h_expire[hp] THEN
            IF p_kinds[i] <> 'EXPIRE' OR h_status[hp] <> 'PENDING' THEN
                errors[i] := 'HOLD_EXPIRED';
                CONTINUE;
            END IF;
        ELSIF p_kinds[i] = 'EXPIRE' THEN
            errors[i] := 'HOLD_NOT_LAPSED';  -- the worker's own: the clock went back since its claim
            CONTINUE;
        END IF;
        held := h_held[hp];
        f := from_at[i];
        t := to_at[i];
        ASSERT f IS NOT NULL AND t IS NOT NULL, 'move_money_batch: a hold''s accounts are not locked';
        IF p_kinds[i] = 'POST' THEN
            -- 5. The amount: all of it by default, never more than held.
            amt := coalesce(amt, held);
            IF amt <= 0 THEN
                errors[i] := 'INVALID_AMOUNT';
                CONTINUE;
            END IF;
            IF amt > held THEN
                errors[i] := 'EXCEEDS_HELD_AMOUNT';
                CONTINUE;
            END IF;
            -- 6. Money moves only between active accounts: the hold stays PENDING.
            IF acc_status[f] <> 'ACTIVE' OR acc_status[t] <> 'ACTIVE' THEN
                errors[i] := 'ACCOUNT_INACTIVE';
                CONTINUE;
            END IF;
            -- 7. The payee's balance must stay representable.
            IF acc_balance[t] > int64_max - amt THEN
                errors[i] := 'INVALID_AMOUNT';
                CONTINUE;
            END IF;
        ELSE
            amt := held;
        END IF;

        -- Accepted: the whole hold is released; a post moves its amount out of it.
        acc_pending_debits[f] := acc_pending_debits[f] - held;
        acc_pending_credits[t] := acc_pending_credits[t] - held;
        ASSERT acc_pending_debits[f] >= 0 AND acc_pending_credits[t] >= 0,
               format('move_money_batch: hold %s releases more than its accounts reserve', h_id[hp]);
        IF p_kinds[i] = 'POST' THEN
            acc_balance[f] := acc_balance[f] - amt;
            acc_balance[t] := acc_balance[t] + amt;
            -- The hold reserved it: balance >= pending_debits >= held >= amt before the post.
            ASSERT acc_kind[f] = 'CASH' OR acc_balance[f] - acc_pending_debits[f] >= 0,
                   format('move_money_batch: post of hold %s overdraws its payer', h_id[hp]);
            from_after[i] := acc_balance[f];
            to_after[i] := acc_balance[t];
            h_status[hp] := 'COMPLETED';
            posts := posts + 1;
        ELSIF p_kinds[i] = 'VOID' THEN
            h_status[hp] := 'VOIDED';
            voids := voids + 1;
        ELSE
            h_status[hp] := 'EXPIRED';
            expiries := expiries + 1;
        END IF;
        -- The answer is the hold, with its new status and amount.
        res_id[i] := h_id[hp]; res_kind[i] := 'TRANSFER'; res_request_id[i] := h_request_id[hp];
        res_from[i] := h_from[hp]; res_to[i] := h_to[hp]; res_amount[i] := amt;
        res_currency[i] := h_currency[hp]; res_description[i] := h_description[hp]; res_time[i] := h_time[hp];
        res_status[i] := h_status[hp]; res_held[i] := held; res_expire[i] := h_expire[hp];
        settle_at[i] := batch_time + new_count * interval '1 microsecond';
        new_count := new_count + 1;
        is_new[i] := true;
    END LOOP;

    IF new_count > 0 THEN
        -- Every write in one statement. The UPDATE changes only the accounts whose balance or
        -- holds changed, and only where the row still holds what was read under its lock (the
        -- count is asserted); a hold leaves PENDING only where it still is (the count is
        -- asserted: settled at most once, even against a bug); entries are read back: two per
        -- movement that moved money, summing to zero. Foreign keys are checked at the end of the
        -- statement, when the transfers they name are in place.
        WITH moved AS (
            SELECT b.id, b.after, b.before, b.pd, b.pd_before, b.pc, b.pc_before
              FROM unnest(acc_id, acc_balance, acc_balance_before, acc_pending_debits, acc_pending_debits_before,
                          acc_pending_credits, acc_pending_credits_before)
                   AS b(id, after, before, pd, pd_before, pc, pc_before)
             WHERE (b.after, b.pd, b.pc) IS DISTINCT FROM (b.before, b.pd_before, b.pc_before)),
        balances AS (
            UPDATE ledger_accounts a SET balance = m.after, pending_debits = m.pd, pending_credits = m.pc
              FROM moved m
             WHERE a.account_id = m.id AND a.balance = m.before AND a.pending_debits = m.pd_before
               AND a.pending_credits = m.pc_before
            RETURNING 1),
        new_movements AS (
            SELECT u.* FROM unnest(is_new, p_transfer_ids, p_kinds, p_request_ids, res_from, res_to, p_amounts,
                                   p_currencies, p_descriptions, res_time, from_after, to_after, p_initiators,
                                   hashes, p_event_ids, p_event_headers, p_hold_seconds, res_expire)
                   WITH ORDINALITY AS u(n, id, k, r, f, t, a, c, d, time, fa, ta, i, h, e, headers, hs, expire, o)
             WHERE u.n AND u.k IN ('TRANSFER', 'DEPOSIT', 'WITHDRAWAL')),
        settlements AS (
            SELECT u.*, 'PENDING'::text AS from_status  -- the only status a hold is settled from
              FROM unnest(is_new, p_kinds, p_hold_ids, res_status, res_amount, settle_at, res_from, res_to,
                          from_after, to_after, p_initiators, p_request_ids, hashes, p_event_ids,
                          p_money_event_ids, p_event_headers)
                   WITH ORDINALITY AS u(n, k, hold_id, status, a, time, f, t, fa, ta, i, r, h, e, money_e, headers, o)
             WHERE u.n AND u.k IN ('POST', 'VOID', 'EXPIRE')),
        new_transfers AS (
            INSERT INTO transfers (transfer_id, kind, request_id, from_account_id, to_account_id, amount, currency,
                                   description, create_time, status, held_amount, expire_time)
            SELECT m.id, m.k, m.r, m.f, m.t, m.a, m.c, m.d, m.time,
                   CASE WHEN m.hs IS NULL THEN 'COMPLETED' ELSE 'PENDING' END,
                   CASE WHEN m.hs IS NOT NULL THEN m.a END, m.expire
              FROM new_movements m
            RETURNING 1),
        settled AS (
            UPDATE transfers t SET status = s.status, amount = s.a, settle_time = s.time
              FROM settlements s
             -- s.from_status, not the constant 'PENDING': see the top of this file.
             WHERE t.transfer_id = s.hold_id AND t.status = s.from_status
            RETURNING 1),
        new_entries AS (
            INSERT INTO entries (transfer_id, account_id, amount, balance_after, create_time)
            SELECT m.id, side.account_id, side.amount, side.balance_after, m.time
              FROM new_movements m
             CROSS JOIN LATERAL (VALUES (m.f, -m.a, m.fa), (m.t, m.a, m.ta)) AS side(account_id, amount, balance_after)
             WHERE m.hs IS NULL  -- a hold has no entry until it is posted,
            UNION ALL
            SELECT s.hold_id, side.account_id, side.amount, side.balance_after, s.time  -- at the post's time
              FROM settlements s
             CROSS JOIN LATERAL (VALUES (s.f, -s.a, s.fa), (s.t, s.a, s.ta)) AS side(account_id, amount, balance_after)
             WHERE s.k = 'POST'
            RETURNING entries.amount),
        new_keys AS (
            INSERT INTO idempotency_keys (initiator, request_id, params_hash, transfer_id, settled_transfer_id,
                                          create_time)
            SELECT m.i, m.r, m.h, m.id, NULL, m.time FROM new_movements m
            UNION ALL
            SELECT s.i, s.r, s.h, NULL, s.hold_id, s.time FROM settlements s WHERE s.k IN ('POST', 'VOID')
            RETURNING 1),
        -- Their bytes are built by the relay from the rows above (svc_transfer/events.py). A post
        -- is two events on the hold's key, in this order: HoldPosted, then the MoneyMoved that a
        -- transfer also makes (statements and emails need nothing new for it).
        new_events AS (
            INSERT INTO outbox (event_id, topic, aggregate_id, event_type, payload, headers)
            SELECT e.id, 'bank.transfer.v1', e.aggregate::text, e.type, ''::bytea, e.headers
              FROM (SELECT m.o AS o, 1 AS seq, m.e AS id, m.id AS aggregate,
                           CASE WHEN m.hs IS NULL THEN 'bank.events.v1.MoneyMoved'
                                ELSE 'bank.events.v1.HoldPlaced' END AS type, m.headers
                      FROM new_movements m
                    UNION ALL
                    SELECT s.o, 1, s.e, s.hold_id,
                           CASE s.k WHEN 'POST' THEN 'bank.events.v1.HoldPosted'
                                    WHEN 'VOID' THEN 'bank.events.v1.HoldVoided'
                                    ELSE 'bank.events.v1.HoldExpired' END, s.headers
                      FROM settlements s
                    UNION ALL
                    SELECT s.o, 2, s.money_e, s.hold_id, 'bank.events.v1.MoneyMoved', s.headers
                      FROM settlements s WHERE s.k = 'POST') AS e
             ORDER BY e.o, e.seq
            RETURNING 1)
        SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM balances), (SELECT count(*) FROM new_transfers),
               (SELECT count(*) FROM settled), (SELECT count(*) FROM new_entries),
               (SELECT coalesce(sum(e.amount), 0) FROM new_entries e), (SELECT count(*) FROM new_keys),
               (SELECT count(*) FROM new_events)
          INTO changed, written, transfers_written, settled_written, entries_written, entries_sum, keys_written,
               events_written;
        ASSERT written = changed, format('move_money_batch: %s accounts written of %s', written, changed);
        ASSERT transfers_written = creations AND settled_written = posts + voids + expiries,
               format('move_money_batch: %s transfers written of %s, %s holds settled of %s', transfers_written,
                      creations, settled_written, posts + voids + expiries);
        ASSERT entries_written = 2 * (completed_creations + posts) AND entries_sum = 0,
               format('move_money_batch: %s entries summing to %s for %s movements and %s posts', entries_written,
                      entries_sum, completed_creations, posts);
        ASSERT keys_written = creations + posts + voids
           AND events_written = creations + posts + voids + expiries + posts,
               format('move_money_batch: %s keys, %s events written for %s creations, %s posts, %s voids, %s expiries',
                      keys_written, events_written, creations, posts, voids, expiries);

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
               CASE WHEN u.e IS NULL THEN u.c END, CASE WHEN u.e IS NULL THEN u.d END, u.time,
               -- A TRANSFER_NOT_PENDING names the status: the caller passed rule 1, it may see it.
               CASE WHEN u.e IS NULL OR u.e = 'TRANSFER_NOT_PENDING' THEN u.s END,
               CASE WHEN u.e IS NULL THEN u.held END, CASE WHEN u.e IS NULL THEN u.expire END
          FROM unnest(errors, replays, res_id, res_kind, res_request_id, res_from, res_to, res_amount, res_currency,
                      res_description, res_time, res_status, res_held, res_expire)
               WITH ORDINALITY AS u(e, rp, id, k, r, f, t, a, c, d, time, s, held, expire, o)
         ORDER BY u.o;
END $$;
