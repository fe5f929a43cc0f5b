-- svc_notify's own projection of customers (schema "notify"), fed by customer events, so it
-- never reads another service's tables to find where to send an email.
CREATE TABLE customer_contacts (
    customer_id  uuid PRIMARY KEY,
    email        text NOT NULL,
    full_name    text NOT NULL,
    update_time  timestamptz NOT NULL DEFAULT now()
);
