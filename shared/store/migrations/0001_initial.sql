-- Jobs, their idempotency keys and the outbox that hands them to RabbitMQ.

CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    type             text        NOT NULL,
    queue            text        NOT NULL,
    status           text        NOT NULL,
    payload          jsonb       NOT NULL,
    priority         smallint    NOT NULL CHECK (priority BETWEEN 0 AND 9),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL CHECK (max_attempts >= 1),
    timeout_seconds  integer     NOT NULL CHECK (timeout_seconds >= 1),
    -- When the next attempt may start: the requested start, then each retry's due time.
    run_at           timestamptz NOT NULL,
    labels           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    result           jsonb,
    error            jsonb,
    progress         jsonb,
    -- Set while running; renewed by the worker. A lapsed lease means the worker is gone.
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Listing newest first with keyset pagination, with and without a status filter.
CREATE INDEX jobs_by_creation ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_by_status ON jobs (status, created_at DESC, id DESC);
-- The relay's scan for lapsed leases only looks at running jobs.
CREATE INDEX jobs_running_by_lease ON jobs (lease_expires_at) WHERE status = 'running';
-- Label filters (labels @> '{"k": "v"}').
CREATE INDEX jobs_by_labels ON jobs USING gin (labels jsonb_path_ops);

-- The legal status transitions, copied from shared/jobs.py by `conveyor migrate` on every run.
-- from_status '' names the status a new job may start in.
CREATE TABLE job_status_transitions (
    from_status text NOT NULL,
    to_status   text NOT NULL,
    PRIMARY KEY (from_status, to_status)
);

CREATE FUNCTION jobs_enforce_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NOT EXISTS (SELECT 1 FROM job_status_transitions
                       WHERE from_status = '' AND to_status = NEW.status) THEN
            RAISE EXCEPTION 'illegal job status transition: (new) -> %', NEW.status
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT EXISTS (SELECT 1 FROM job_status_transitions
                       WHERE from_status = OLD.status AND to_status = NEW.status) THEN
            RAISE EXCEPTION 'illegal job status transition: % -> %', OLD.status, NEW.status
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_status_transition
    BEFORE INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_enforce_transition();

CREATE TABLE idempotency_keys (
    key             text        PRIMARY KEY,
    -- sha256 of the canonical request (method, path, JSON body with sorted keys).
    fingerprint     text        NOT NULL,
    job_id          uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    response_status smallint    NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);

-- Messages that must reach RabbitMQ. A row is written in the same transaction as the job (or its
-- retry) and deleted only after RabbitMQ confirmed the publish.
CREATE TABLE outbox (
    id               bigserial   PRIMARY KEY,
    job_id           uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- Not published before this (a scheduled start or a retry's backoff).
    available_at     timestamptz NOT NULL,
    -- A publisher holds the row until then; the API holds fresh rows for a short grace period.
    locked_until     timestamptz,
    publish_attempts integer     NOT NULL DEFAULT 0,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_by_due_time ON outbox (available_at);
CREATE INDEX outbox_by_job ON outbox (job_id);
