-- The ledger's write paths, each one PL/pgSQL function called with a single statement: a
-- movement is one round trip to Postgres, and every lock it takes is released at its commit.
--
-- Business refusals (INSUFFICIENT_FUNDS, ...) are RETURNED as a reason code, never raised: the
-- function then writes nothing (no idempotency record either), so a retry after, say, a deposit
-- can succeed. Broken invariants are ASSERTed: they abort the transaction loudly.
--
-- Timeouts: each function sets lock_timeout for its own lock waits (SET clause). The caller
-- sets statement_timeout in the same round trip (SET LOCAL before the call): Postgres arms the
-- statement timer when the statement starts, so a statement_timeout set inside a function has
-- no effect on the statement running it.

-- What a movement function returns: an error reason, or the transfer (replayed = true when an
-- idempotent retry returned the original one and moved nothing).
CREATE TYPE movement AS (
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
);

-- What the account functions return: an error reason, or the account.
CREATE TYPE ledger_account_result AS (
    error        text,
    account_id   uuid,
    customer_id  uuid,
    currency     text,
    status       text,
    balance      bigint,
    create_time  timestamptz
);

-- UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits; Postgres 15 has none.
CREATE FUNCTION uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
        PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$;

-- Protobuf wire format, just what bank.events.v1.MoneyMoved needs, so that the event is built
-- inside the movement's transaction from the balances it computed. Proto3 omits zero values.
CREATE FUNCTION pb_varint(value bigint) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    encoded bytea := '';
    remaining bigint := value;
BEGIN
    -- 64 bits are at most 10 groups of 7. The mask makes the shift logical, so a negative value
    -- encodes as its unsigned two's complement, as protobuf's int64 does.
    FOR i IN 1..10 LOOP
        IF remaining >= 0 AND remaining < 128 THEN
            RETURN encoded || set_byte('\x00'::bytea, 0, remaining::int);
        END IF;
        encoded := encoded || set_byte('\x00'::bytea, 0, ((remaining & 127) | 128)::int);
        remaining := (remaining >> 7) & 144115188075855871;  -- 2^57 - 1
    END LOOP;
    RAISE EXCEPTION 'pb_varint: % needs more than 10 bytes', value;
END $$;

-- PL/pgSQL rather than SQL: these are called from PL/pgSQL with variables, where SQL functions
-- are not inlined and cost about ten times more per call (evidence: pg_stat_user_functions).
CREATE FUNCTION pb_int64(field int, value bigint) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF value = 0 THEN
        RETURN ''::bytea;
    END IF;
    RETURN pb_varint(field << 3) || pb_varint(value);
END $$;

CREATE FUNCTION pb_bytes(field int, value bytea) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN pb_varint((field << 3) | 2) || pb_varint(length(value)) || value;
END $$;

CREATE FUNCTION pb_string(field int, value text) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF value = '' THEN
        RETURN ''::bytea;
    END IF;
    RETURN pb_bytes(field, convert_to(value, 'UTF8'));
END $$;

-- A google.protobuf.Timestamp field (seconds = 1, nanos = 2).
CREATE FUNCTION pb_timestamp(field int, value timestamptz) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    us bigint := (extract(epoch FROM value) * 1000000)::bigint;
BEGIN
    RETURN pb_bytes(field, pb_int64(1, us / 1000000) || pb_int64(2, (us % 1000000) * 1000));
END $$;

-- Moves p_amount from one ledger account to another: a TRANSFER between customer accounts, a
-- DEPOSIT (p_from_account_id NULL: the currency's cash account pays) or a WITHDRAWAL
-- (p_to_account_id NULL: the cash account receives). p_owner_id, when given, must own the
-- debited account (a customer's transfer); tellers pass NULL. p_initiator scopes p_request_id.
--
-- Two-phase locking inside one transaction:
--   1. the idempotency key's advisory lock, so concurrent requests with one key run one by one;
--   2. the growing phase: both account rows FOR UPDATE, in ascending account_id order;
--   3. checks (existence, ownership, status, currency, funds) against the locked rows;
--   4. writes: balances, transfer, two entries, idempotency record, outbox event;
--   5. the shrinking phase is the commit, which releases every lock at once.
-- Every transaction takes at most one advisory lock, before any row lock, and row locks in one
-- global order, so no two movements can wait on each other in a cycle: no deadlock.
CREATE FUNCTION move_money(
    p_initiator        text,
    p_request_id       text,
    p_kind             text,
    p_owner_id         uuid,
    p_from_account_id  uuid,
    p_to_account_id    uuid,
    p_amount           bigint,
    p_currency         text,
    p_description      text,
    p_trace_id         text
) RETURNS movement
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
-- A movement holds its locks for about a millisecond; a second of waiting means overload, and
-- the caller gets LEDGER_BUSY (nothing moved, safe to retry with the same request_id).
SET lock_timeout = '1s'
AS $$
DECLARE
    int64_max       CONSTANT bigint := 9223372036854775807;
    int64_min       CONSTANT bigint := -9223372036854775807 - 1;
    -- Advisory lock class of idempotency keys (two-key form: apart from one-key advisory locks).
    idempotency_lock_class CONSTANT int := 7201;
    params_hash     bytea;
    existing        record;
    cash_id         uuid;
    from_id         uuid;
    to_id           uuid;
    first_locked    ledger_accounts;
    second_locked   ledger_accounts;
    source          ledger_accounts;
    target          ledger_accounts;
    from_after      bigint;
    to_after        bigint;
    entries_sum     numeric;
    now_time        timestamptz;
    new_id          uuid;
    event_id        uuid;
    result          movement;
BEGIN
    -- Programmer errors of the caller: crash loudly.
    ASSERT p_kind IN ('TRANSFER', 'DEPOSIT', 'WITHDRAWAL'), format('move_money: bad kind %L', p_kind);
    ASSERT (p_kind = 'DEPOSIT') = (p_from_account_id IS NULL), 'move_money: only a deposit has no from account';
    ASSERT (p_kind = 'WITHDRAWAL') = (p_to_account_id IS NULL), 'move_money: only a withdrawal has no to account';
    ASSERT p_kind = 'TRANSFER' OR p_owner_id IS NULL, 'move_money: deposits and withdrawals are by tellers';
    ASSERT char_length(p_initiator) BETWEEN 1 AND 200, 'move_money: bad initiator';
    ASSERT char_length(p_request_id) BETWEEN 1 AND 64, 'move_money: bad request_id';
    ASSERT char_length(p_description) <= 200, 'move_money: description too long';

    -- Input that is wrong whatever the state (the service rejects it first; this keeps the
    -- function safe for any caller).
    IF p_amount IS NULL OR p_amount <= 0 THEN
        result.error := 'INVALID_AMOUNT';
        RETURN result;
    END IF;
    IF p_from_account_id = p_to_account_id THEN
        result.error := 'SAME_ACCOUNT';
        RETURN result;
    END IF;

    params_hash := sha256(convert_to(concat_ws(E'\x1f', p_kind, coalesce(p_from_account_id::text, '-'),
        coalesce(p_to_account_id::text, '-'), p_amount::text, p_currency, p_description), 'UTF8'));

    PERFORM pg_advisory_xact_lock(idempotency_lock_class, hashtext(p_initiator || E'\x1f' || p_request_id));
    SELECT k.params_hash AS stored_hash, t.transfer_id, t.kind, t.request_id, t.from_account_id, t.to_account_id,
           t.amount, t.currency, t.description, t.create_time
      INTO existing
      FROM idempotency_keys k JOIN transfers t ON t.transfer_id = k.transfer_id
     WHERE k.initiator = p_initiator AND k.request_id = p_request_id;
    IF FOUND THEN
        IF existing.stored_hash <> params_hash THEN
            result.error := 'IDEMPOTENCY_KEY_REUSED';
            RETURN result;
        END IF;
        result := ROW(NULL, true, existing.transfer_id, existing.kind, existing.request_id, existing.from_account_id,
                      existing.to_account_id, existing.amount, existing.currency, existing.description,
                      existing.create_time)::movement;
        RETURN result;
    END IF;

    IF p_kind <> 'TRANSFER' THEN
        -- NULL for an unsupported currency: then no customer account can match it (below).
        SELECT a.account_id INTO cash_id FROM ledger_accounts a WHERE a.kind = 'CASH' AND a.currency = p_currency;
    END IF;
    from_id := coalesce(p_from_account_id, cash_id);
    to_id := coalesce(p_to_account_id, cash_id);

    -- Growing phase: lock in ascending id order (least/greatest skip a NULL id: then the one
    -- known row is simply locked twice, which is a no-op the second time).
    SELECT * INTO first_locked FROM ledger_accounts a WHERE a.account_id = least(from_id, to_id) FOR UPDATE;
    SELECT * INTO second_locked FROM ledger_accounts a WHERE a.account_id = greatest(from_id, to_id) FOR UPDATE;
    IF first_locked.account_id = from_id THEN source := first_locked; ELSE source := second_locked; END IF;
    IF first_locked.account_id = to_id THEN target := first_locked; ELSE target := second_locked; END IF;
    IF source.account_id IS DISTINCT FROM from_id THEN source := NULL; END IF;
    IF target.account_id IS DISTINCT FROM to_id THEN target := NULL; END IF;

    -- Checks on the locked rows. A customer names only customer accounts; the cash account is
    -- never addressable from outside, and another customer's source account does not exist.
    IF (p_from_account_id IS NOT NULL AND (source.account_id IS NULL OR source.kind <> 'CUSTOMER'))
       OR (p_to_account_id IS NOT NULL AND (target.account_id IS NULL OR target.kind <> 'CUSTOMER'))
       OR (p_owner_id IS NOT NULL AND source.customer_id IS DISTINCT FROM p_owner_id) THEN
        result.error := 'ACCOUNT_NOT_FOUND';
        RETURN result;
    END IF;
    IF source.status <> 'ACTIVE' OR target.status <> 'ACTIVE' THEN
        result.error := 'ACCOUNT_INACTIVE';
        RETURN result;
    END IF;
    IF cash_id IS NULL AND p_kind <> 'TRANSFER'
       OR source.currency <> p_currency OR target.currency <> p_currency THEN
        result.error := 'CURRENCY_MISMATCH';
        RETURN result;
    END IF;
    IF source.kind = 'CUSTOMER' AND source.balance < p_amount THEN
        result.error := 'INSUFFICIENT_FUNDS';
        RETURN result;
    END IF;
    -- A balance must stay representable: an amount that would overflow one is not valid.
    IF target.balance > int64_max - p_amount OR source.balance < int64_min + p_amount THEN
        result.error := 'INVALID_AMOUNT';
        RETURN result;
    END IF;

    -- Writes. Taken after the locks, the timestamp orders one account's movements as they commit.
    now_time := clock_timestamp();
    new_id := uuid_v7();
    UPDATE ledger_accounts a SET balance = a.balance - p_amount WHERE a.account_id = source.account_id
        RETURNING a.balance INTO from_after;
    ASSERT from_after = source.balance - p_amount, 'move_money: debited balance read back differs';
    UPDATE ledger_accounts a SET balance = a.balance + p_amount WHERE a.account_id = target.account_id
        RETURNING a.balance INTO to_after;
    ASSERT to_after = target.balance + p_amount, 'move_money: credited balance read back differs';

    INSERT INTO transfers (transfer_id, kind, request_id, from_account_id, to_account_id, amount, currency,
                           description, create_time)
    VALUES (new_id, p_kind, p_request_id, source.account_id, target.account_id, p_amount, p_currency,
            p_description, now_time);
    INSERT INTO entries (transfer_id, account_id, amount, balance_after, create_time)
    VALUES (new_id, source.account_id, -p_amount, from_after, now_time),
           (new_id, target.account_id, p_amount, to_after, now_time);
    SELECT sum(e.amount) INTO entries_sum FROM entries e WHERE e.transfer_id = new_id;
    ASSERT entries_sum = 0, format('move_money: entries of %s sum to %s', new_id, entries_sum);
    INSERT INTO idempotency_keys (initiator, request_id, params_hash, transfer_id, create_time)
    VALUES (p_initiator, p_request_id, params_hash, new_id, now_time);

    -- bank.events.v1.MoneyMoved, field by field in field-number order. The cash side shows empty
    -- ids and a zero balance: consumers never see the cash account.
    event_id := uuid_v7();
    INSERT INTO outbox (event_id, topic, aggregate_id, event_type, payload, headers)
    VALUES (event_id, 'bank.transfer.v1', new_id::text, 'bank.events.v1.MoneyMoved',
            pb_string(1, event_id::text)
            || pb_string(2, new_id::text)
            || pb_string(3, p_request_id)
            || pb_int64(4, CASE p_kind WHEN 'TRANSFER' THEN 1 WHEN 'DEPOSIT' THEN 2 ELSE 3 END)
            || pb_string(5, CASE WHEN p_kind = 'DEPOSIT' THEN '' ELSE source.account_id::text END)
            || pb_string(6, coalesce(source.customer_id::text, ''))
            || pb_string(7, CASE WHEN p_kind = 'WITHDRAWAL' THEN '' ELSE target.account_id::text END)
            || pb_string(8, coalesce(target.customer_id::text, ''))
            || pb_int64(9, p_amount)
            || pb_string(10, p_currency)
            || pb_int64(11, CASE WHEN p_kind = 'DEPOSIT' THEN 0 ELSE from_after END)
            || pb_int64(12, CASE WHEN p_kind = 'WITHDRAWAL' THEN 0 ELSE to_after END)
            || pb_string(13, p_description)
            || pb_timestamp(14, now_time),
            CASE WHEN coalesce(p_trace_id, '') = '' THEN '{}'::jsonb ELSE jsonb_build_object('request_id', p_trace_id) END);

    result := ROW(NULL, false, new_id, p_kind, p_request_id, source.account_id, target.account_id, p_amount,
                  p_currency, p_description, now_time)::movement;
    RETURN result;
END $$;

-- Opens a customer's ledger account, ACTIVE with balance 0. Idempotent: the same account_id with
-- the same owner and currency returns the existing account unchanged.
CREATE FUNCTION open_ledger_account(p_account_id uuid, p_customer_id uuid, p_currency text)
RETURNS ledger_account_result
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET lock_timeout = '1s'
AS $$
DECLARE
    account  ledger_accounts;
    result   ledger_account_result;
BEGIN
    ASSERT p_account_id IS NOT NULL AND p_customer_id IS NOT NULL, 'open_ledger_account: ids are required';
    IF NOT EXISTS (SELECT 1 FROM ledger_accounts a WHERE a.kind = 'CASH' AND a.currency = p_currency) THEN
        result.error := 'UNSUPPORTED_CURRENCY';
        RETURN result;
    END IF;
    -- A concurrent open of the same id waits here for the other's commit, then sees its row.
    INSERT INTO ledger_accounts (account_id, customer_id, kind, currency, create_time)
    VALUES (p_account_id, p_customer_id, 'CUSTOMER', p_currency, clock_timestamp())
    ON CONFLICT (account_id) DO NOTHING;
    SELECT * INTO account FROM ledger_accounts a WHERE a.account_id = p_account_id;
    IF account.kind <> 'CUSTOMER' OR account.customer_id IS DISTINCT FROM p_customer_id
       OR account.currency <> p_currency THEN
        result.error := 'ACCOUNT_ALREADY_EXISTS';
        RETURN result;
    END IF;
    result := ROW(NULL, account.account_id, account.customer_id, account.currency, account.status, account.balance,
                  account.create_time)::ledger_account_result;
    RETURN result;
END $$;

-- Sets a customer account's status under its row lock, so that no movement slips in between
-- the zero-balance check and the close. Setting the current status again is a no-op; CLOSED is
-- final.
CREATE FUNCTION set_ledger_account_status(p_account_id uuid, p_status text)
RETURNS ledger_account_result
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
SET lock_timeout = '1s'
AS $$
DECLARE
    account  ledger_accounts;
    result   ledger_account_result;
BEGIN
    ASSERT p_status IN ('ACTIVE', 'FROZEN', 'CLOSED'), format('set_ledger_account_status: bad status %L', p_status);
    SELECT * INTO account FROM ledger_accounts a WHERE a.account_id = p_account_id FOR UPDATE;
    IF NOT FOUND OR account.kind <> 'CUSTOMER' THEN
        result.error := 'ACCOUNT_NOT_FOUND';
        RETURN result;
    END IF;
    IF account.status <> p_status THEN
        IF account.status = 'CLOSED' THEN
            result.error := 'ACCOUNT_INACTIVE';
            RETURN result;
        END IF;
        IF p_status = 'CLOSED' AND account.balance <> 0 THEN
            result.error := 'ACCOUNT_NOT_EMPTY';
            RETURN result;
        END IF;
        UPDATE ledger_accounts a SET status = p_status WHERE a.account_id = p_account_id RETURNING * INTO account;
    END IF;
    result := ROW(NULL, account.account_id, account.customer_id, account.currency, account.status, account.balance,
                  account.create_time)::ledger_account_result;
    RETURN result;
END $$;
