-- Dead letters kept in Postgres until an operator replays or purges them, and cancel requests.

-- Set by POST /v1/jobs/{id}/cancel on a running job; its handler sees it and may stop.
ALTER TABLE jobs ADD COLUMN cancel_requested_at timestamptz;

CREATE TABLE dead_letters (
    id            bigserial   PRIMARY KEY,
    -- The failed job, if the dead letter is one; NULL for a message that names no job of ours.
    job_id        uuid        UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    tenant        text        REFERENCES tenants (name),
    queue         text        NOT NULL,
    job_type      text,
    -- The error class of the last attempt (jobs), or what was wrong with the message.
    error_type    text        NOT NULL,
    reason        text        NOT NULL,
    -- A message that is not a valid Conveyor job, kept verbatim (base64 when it is not UTF-8).
    message       text,
    -- sha256 of such a message, so the relay files each copy once even if it is redelivered.
    message_sha256 text       UNIQUE,
    dead_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_by_time ON dead_letters (dead_at DESC, id DESC);
CREATE INDEX dead_letters_by_tenant ON dead_letters (tenant, dead_at DESC, id DESC);

-- A job that fails becomes a dead letter in the same transaction, whichever code path failed it (the
-- worker's outcome, the relay's lapsed-lease recovery); one that leaves `failed` (retry, replay) stops
-- being one. Status names as of this migration.
CREATE FUNCTION jobs_track_dead_letters() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'failed' THEN
        INSERT INTO dead_letters (job_id, tenant, queue, job_type, error_type, reason)
        VALUES (NEW.id, NEW.tenant, NEW.queue, NEW.type,
                COALESCE(NEW.error->>'type', 'unknown'),
                COALESCE(NEW.error->>'title', '') || ': ' || COALESCE(NEW.error->>'detail', ''))
        ON CONFLICT (job_id) DO UPDATE
            SET error_type = EXCLUDED.error_type, reason = EXCLUDED.reason, dead_at = now();
    ELSIF OLD.status = 'failed' THEN
        DELETE FROM dead_letters WHERE job_id = NEW.id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_dead_letters
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION jobs_track_dead_letters();

-- Queue statistics (GET /v1/queues) look only at jobs waiting or running.
CREATE INDEX jobs_active_by_queue ON jobs (queue, run_at)
    WHERE status IN ('queued', 'retrying', 'running');
