-- The double-entry ledger of svc_transfer (schema "transfer"): the only place balances are kept.
-- Every row below is written by the functions of 0002_ledger_functions.sql, one transaction per
-- call; the service never writes these tables with ad-hoc SQL.

-- Customer accounts (opened by svc_account through LedgerService) and the bank's cash account
-- of each supported currency.
CREATE TABLE ledger_accounts (
    account_id   uuid PRIMARY KEY,
    customer_id  uuid,  -- NULL for the bank's cash accounts
    kind         text NOT NULL CHECK (kind IN ('CUSTOMER', 'CASH')),
    currency     text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status       text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'FROZEN', 'CLOSED')),
    balance      bigint NOT NULL DEFAULT 0,
    create_time  timestamptz NOT NULL DEFAULT now(),
    -- Customer balances never go negative; a cash account does (deposits come from it).
    CONSTRAINT customer_balance_not_negative CHECK (kind = 'CASH' OR balance >= 0),
    CONSTRAINT cash_has_no_owner CHECK ((kind = 'CASH') = (customer_id IS NULL)),
    CONSTRAINT cash_is_active CHECK (kind = 'CUSTOMER' OR status = 'ACTIVE')
);
-- One cash account per currency: its existence is what makes a currency supported.
CREATE UNIQUE INDEX one_cash_account_per_currency ON ledger_accounts (currency) WHERE kind = 'CASH';
INSERT INTO ledger_accounts (account_id, kind, currency)
SELECT gen_random_uuid(), 'CASH', c FROM unnest(ARRAY['USD', 'EUR', 'GBP', 'JPY']) AS c;

-- One row per committed movement. from/to are ledger accounts, the cash account included (the
-- API hides it: kind says which side it is). Immutable once written.
CREATE TABLE transfers (
    transfer_id      uuid PRIMARY KEY,  -- UUIDv7
    kind             text NOT NULL CHECK (kind IN ('TRANSFER', 'DEPOSIT', 'WITHDRAWAL')),
    request_id       text NOT NULL CHECK (char_length(request_id) BETWEEN 1 AND 64),
    from_account_id  uuid NOT NULL REFERENCES ledger_accounts,
    to_account_id    uuid NOT NULL REFERENCES ledger_accounts,
    amount           bigint NOT NULL CHECK (amount > 0),
    currency         text NOT NULL,
    description      text NOT NULL DEFAULT '' CHECK (char_length(description) <= 200),
    create_time      timestamptz NOT NULL,
    CONSTRAINT two_different_accounts CHECK (from_account_id <> to_account_id)
);

-- Two entries per transfer: the debit (negative) and the credit (positive); they sum to zero.
CREATE TABLE entries (
    transfer_id    uuid NOT NULL REFERENCES transfers,
    account_id     uuid NOT NULL REFERENCES ledger_accounts,
    amount         bigint NOT NULL CHECK (amount <> 0),
    balance_after  bigint NOT NULL,
    create_time    timestamptz NOT NULL,  -- the transfer's, copied for the index below
    PRIMARY KEY (transfer_id, account_id)
);
-- ListTransfers: one account's movements, newest first, keyset-paginated.
CREATE INDEX entries_by_account ON entries (account_id, create_time DESC, transfer_id DESC);

-- Idempotency records (AIP-155): one per (caller, request_id) that moved money. The stored
-- result is the transfer itself (immutable); params_hash tells a retry from a reuse of the key.
-- Rejected requests leave no record, so a retry after the cause is fixed can succeed.
CREATE TABLE idempotency_keys (
    initiator    text NOT NULL,  -- "<role>:<subject>" of the caller: the key's scope
    request_id   text NOT NULL,
    params_hash  bytea NOT NULL,  -- sha256 of kind, accounts, amount, currency, description
    transfer_id  uuid NOT NULL UNIQUE REFERENCES transfers,
    create_time  timestamptz NOT NULL,
    PRIMARY KEY (initiator, request_id)
);

-- Events written in the same transaction as the movement they describe (bank.events.v1.MoneyMoved
-- on topic bank.transfer.v1, aggregate_id = transfer_id); the outbox relay publishes them to
-- Kafka and marks them sent only after the broker acknowledges. Same shape as every service's.
CREATE TABLE outbox (
    outbox_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    topic         text NOT NULL,
    aggregate_id  text NOT NULL,
    event_type    text NOT NULL,
    payload       bytea NOT NULL,
    headers       jsonb NOT NULL DEFAULT '{}',
    create_time   timestamptz NOT NULL DEFAULT now(),
    sent_time     timestamptz
);
CREATE INDEX outbox_unsent ON outbox (outbox_id) WHERE sent_time IS NULL;
