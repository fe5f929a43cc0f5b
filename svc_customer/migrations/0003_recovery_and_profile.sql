-- Account recovery and profile (API.md, "v1 additions"; docs/decisions/0015).

-- Unverified registrations older than 7 days are removed by a sweep (svc_customer.service).
CREATE INDEX customers_unverified_by_time ON customers (create_time) WHERE NOT email_verified;

-- One password reset code per email address at a time, for any address asked about, known or
-- not: a request for an unknown address writes the same row (with no customer and a code nobody
-- is sent), so both requests do the same work and ResetPassword answers both the same way.
-- Codes are stored as an HMAC with a server-side key, never in clear; wrong tries are counted
-- per code.
CREATE TABLE password_resets (
    email            text PRIMARY KEY,
    customer_id      uuid REFERENCES customers (customer_id) ON DELETE CASCADE,
    code_hash        bytea NOT NULL,
    expire_time      timestamptz NOT NULL,
    failed_attempts  integer NOT NULL DEFAULT 0 CHECK (failed_attempts >= 0),
    used_time        timestamptz,
    create_time      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX password_resets_by_time ON password_resets (create_time);

-- A pending change of a customer's email (ChangeEmail), until ConfirmEmailChange.
CREATE TABLE email_changes (
    customer_id      uuid PRIMARY KEY REFERENCES customers (customer_id) ON DELETE CASCADE,
    new_email        text NOT NULL,
    code_hash        bytea NOT NULL,
    expire_time      timestamptz NOT NULL,
    failed_attempts  integer NOT NULL DEFAULT 0 CHECK (failed_attempts >= 0),
    create_time      timestamptz NOT NULL DEFAULT now()
);

-- A discarded unverified registration takes its code with it.
ALTER TABLE verification_codes DROP CONSTRAINT verification_codes_customer_id_fkey,
    ADD CONSTRAINT verification_codes_customer_id_fkey
        FOREIGN KEY (customer_id) REFERENCES customers (customer_id) ON DELETE CASCADE;
