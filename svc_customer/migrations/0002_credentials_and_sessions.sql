-- Email verification, credentials and sessions (schema "customer").

-- One verification code per customer at a time. Codes are short, so they are stored as an
-- HMAC with a server-side key, never in clear; wrong tries are counted per code.
CREATE TABLE verification_codes (
    customer_id      uuid PRIMARY KEY REFERENCES customers (customer_id),
    code_hash        bytea NOT NULL,
    expire_time      timestamptz NOT NULL,
    failed_attempts  integer NOT NULL DEFAULT 0 CHECK (failed_attempts >= 0),
    used_time        timestamptz
);

-- Single-use tokens proving a verified email; the only way to create credentials.
CREATE TABLE enrollment_tokens (
    token_hash   bytea PRIMARY KEY,          -- SHA-256 of a 256-bit random token
    customer_id  uuid NOT NULL REFERENCES customers (customer_id),
    expire_time  timestamptz NOT NULL,
    used_time    timestamptz
);

CREATE TABLE credentials (
    credential_id  uuid PRIMARY KEY,
    username       text NOT NULL UNIQUE,
    customer_id    uuid UNIQUE REFERENCES customers (customer_id),  -- NULL for tellers
    role           text NOT NULL CHECK (role IN ('customer', 'teller')),
    password_hash  text NOT NULL,                                    -- argon2id, PHC string
    create_time    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT customer_role_has_customer CHECK ((role = 'customer') = (customer_id IS NOT NULL))
);

CREATE TABLE sessions (
    session_id           uuid PRIMARY KEY,
    credential_id        uuid NOT NULL REFERENCES credentials (credential_id),
    subject              text NOT NULL,      -- customer id, or credential id for tellers
    role                 text NOT NULL,
    create_time          timestamptz NOT NULL DEFAULT now(),
    refresh_expire_time  timestamptz NOT NULL,
    revoked_time         timestamptz,
    revoke_reason        text
);
CREATE INDEX sessions_by_credential ON sessions (credential_id, create_time DESC);

-- Every refresh token a session was given. Only the newest is live; presenting a rotated one
-- again means it was stolen (or replayed), and revokes the whole session.
CREATE TABLE refresh_tokens (
    token_hash    bytea PRIMARY KEY,         -- SHA-256 of a 256-bit random token
    session_id    uuid NOT NULL REFERENCES sessions (session_id),
    create_time   timestamptz NOT NULL DEFAULT now(),
    rotated_time  timestamptz
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);
