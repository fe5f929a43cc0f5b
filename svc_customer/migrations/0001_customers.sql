-- Customers and the transactional outbox of svc_customer (schema "customer").
CREATE TABLE customers (
    customer_id     uuid PRIMARY KEY,
    email           text NOT NULL,
    full_name       text NOT NULL CHECK (char_length(full_name) BETWEEN 1 AND 100),
    phone_number    text,
    email_verified  boolean NOT NULL DEFAULT false,
    create_time     timestamptz NOT NULL DEFAULT now()
);
-- Emails are stored lower-cased; uniqueness is what makes racing registrations safe.
CREATE UNIQUE INDEX customers_email_key ON customers (email);

-- Events written in the same transaction as the change they describe; the relay publishes
-- them to Kafka and marks them sent only after the broker acknowledges.
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
