-- The ledger of svc_transfer (schema "transfer"): the only place where balances are kept.
CREATE TABLE ledger_accounts (
    account_id   uuid PRIMARY KEY,
    customer_id  uuid,                 -- NULL for the bank's own cash accounts
    kind         text NOT NULL CHECK (kind IN ('CUSTOMER', 'CASH')),
    currency     char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status       text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'FROZEN', 'CLOSED')),
    balance      bigint NOT NULL DEFAULT 0,
    create_time  timestamptz NOT NULL DEFAULT now(),
    -- Customer balances never go negative; the cash account may (deposits come from it).
    CONSTRAINT customer_balance_not_negative CHECK (kind = 'CASH' OR balance >= 0),
    CONSTRAINT cash_has_no_owner CHECK ((kind = 'CASH') = (customer_id IS NULL))
);
-- One cash account per currency.
CREATE UNIQUE INDEX one_cash_account_per_currency ON ledger_accounts (currency) WHERE kind = 'CASH';
