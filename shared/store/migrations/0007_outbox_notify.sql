-- The relay alone publishes the outbox. So that a new job does not wait for its next poll, every
-- statement that inserts an outbox row due now notifies channel `conveyor_outbox`; the relay LISTENs on
-- it. Postgres delivers a notification at COMMIT (never for a rolled-back insert) and folds identical
-- ones of one transaction into one. Rows due later (scheduled starts, retry backoffs) are found by the
-- relay's poll.
CREATE FUNCTION outbox_notify_due() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted WHERE available_at <= now()) THEN
        PERFORM pg_notify('conveyor_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify_due
    AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_due();

COMMENT ON COLUMN outbox.locked_until IS 'A relay holds the row until then (publishing it, or backing off after a failed publish).';
