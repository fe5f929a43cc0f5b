-- Email verification state (bank.events.v1.EmailVerified), and the time of the last event
-- applied to each row, so that a redelivered older event never undoes a newer one.
ALTER TABLE customer_contacts
    ADD COLUMN email_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN verify_time    timestamptz,
    ADD COLUMN event_time     timestamptz NOT NULL DEFAULT '-infinity';
