-- The whole trace context on ledger events, not only the request id.
--
-- move_money (0002) writes its event's Kafka headers as {"request_id": p_trace_id}. A caller
-- that has more to pass (the W3C traceparent and tracestate of the request, so that consumers
-- join its trace) now sends p_trace_id as the headers' JSON object instead; this trigger puts
-- that object in place before the outbox row is stored. The service sends a JSON object only
-- when there is more than a request id, or when the request id itself begins with "{" (so a
-- bare request id is never mistaken for one). The common case stays a plain text and the WHEN
-- clause below skips the trigger's body for it.
CREATE FUNCTION outbox_headers_from_json() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    parsed jsonb := (NEW.headers ->> 'request_id')::jsonb;
BEGIN
    ASSERT jsonb_typeof(parsed) = 'object', 'outbox headers: a JSON value that is not an object';
    NEW.headers := parsed;
    RETURN NEW;
END $$;

CREATE TRIGGER outbox_headers_from_json
    BEFORE INSERT ON outbox
    FOR EACH ROW
    WHEN (left(NEW.headers ->> 'request_id', 1) = '{')
    EXECUTE FUNCTION outbox_headers_from_json();
