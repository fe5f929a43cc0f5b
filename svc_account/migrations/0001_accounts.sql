-- Accounts as the customer sees them (schema "account"). Balances live in the ledger of
-- svc_transfer, never here.
CREATE TABLE accounts (
    account_id   uuid PRIMARY KEY,
    customer_id  uuid NOT NULL,
    currency     char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status       text NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'FROZEN', 'CLOSED')),
    create_time  timestamptz NOT NULL DEFAULT now()
);
-- ListAccounts: a customer's accounts, newest first.
CREATE INDEX accounts_by_customer ON accounts (customer_id, create_time DESC, account_id DESC);
