-- Tenants, their API keys and limits. Every job and idempotency key now belongs to a tenant.

CREATE TABLE tenants (
    name                   text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    -- NULL: use the CONVEYOR_TENANT_* defaults.
    max_active_jobs        integer     CHECK (max_active_jobs >= 0),
    submit_rate_per_second double precision CHECK (submit_rate_per_second > 0),
    submit_burst           integer     CHECK (submit_burst >= 1),
    created_at             timestamptz NOT NULL DEFAULT now()
);
-- Jobs submitted before tenants existed, and every request when CONVEYOR_AUTH=none.
INSERT INTO tenants (name) VALUES ('default');

CREATE TABLE api_keys (
    id            uuid        PRIMARY KEY,
    -- The visible part of the key (cvk_xxxxxxxx), unique, used to find the row.
    prefix        text        NOT NULL UNIQUE,
    -- sha256 of the whole key: the key itself is never stored.
    secret_sha256 bytea       NOT NULL,
    tenant        text        NOT NULL REFERENCES tenants (name),
    scopes        text[]      NOT NULL,
    description   text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant);

ALTER TABLE jobs ADD COLUMN tenant text NOT NULL DEFAULT 'default' REFERENCES tenants (name);
ALTER TABLE jobs ALTER COLUMN tenant DROP DEFAULT;
DROP INDEX jobs_by_status;
CREATE INDEX jobs_by_tenant ON jobs (tenant, created_at DESC, id DESC);
CREATE INDEX jobs_by_tenant_status ON jobs (tenant, status, created_at DESC, id DESC);

ALTER TABLE idempotency_keys ADD COLUMN tenant text NOT NULL DEFAULT 'default' REFERENCES tenants (name);
ALTER TABLE idempotency_keys ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (tenant, key);

-- Token buckets for the submission rate, one row per tenant, shared by every API replica.
CREATE TABLE rate_buckets (
    tenant      text             PRIMARY KEY REFERENCES tenants (name) ON DELETE CASCADE,
    tokens      double precision NOT NULL,
    refilled_at timestamptz      NOT NULL,
    -- Whether the last request found a token (so the statement that takes one can report it).
    allowed     boolean          NOT NULL
);

-- Tokens in a bucket now: what it held, plus the refill since, up to the burst size.
CREATE FUNCTION rate_bucket_level(tokens double precision, refilled_at timestamptz,
                                  rate double precision, burst double precision)
RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT least(burst, tokens + extract(epoch FROM now() - refilled_at) * rate)
$$;

-- Which statuses count as active (waiting or running); copied from shared/jobs.py by `conveyor migrate`.
CREATE TABLE job_statuses (
    status    text    PRIMARY KEY,
    is_active boolean NOT NULL
);

-- Active jobs per tenant, kept by a trigger. Spread over 16 shards so concurrent writers rarely wait
-- on the same row; the count is the sum of a tenant's shards.
CREATE TABLE tenant_active_jobs (
    tenant text     NOT NULL,
    shard  smallint NOT NULL,
    jobs   bigint   NOT NULL,
    PRIMARY KEY (tenant, shard)
);

CREATE FUNCTION jobs_count_active() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    delta integer := 0;
BEGIN
    IF TG_OP <> 'DELETE' AND (SELECT is_active FROM job_statuses WHERE status = NEW.status) THEN
        delta := delta + 1;
    END IF;
    IF TG_OP <> 'INSERT' AND (SELECT is_active FROM job_statuses WHERE status = OLD.status) THEN
        delta := delta - 1;
    END IF;
    IF delta <> 0 THEN
        INSERT INTO tenant_active_jobs AS t (tenant, shard, jobs)
        VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.tenant ELSE NEW.tenant END,
                floor(random() * 16)::smallint, delta)
        ON CONFLICT (tenant, shard) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_active_count
    AFTER INSERT OR DELETE OR UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_active();

-- Existing jobs (statuses as of this migration: queued, running, retrying are active).
INSERT INTO tenant_active_jobs (tenant, shard, jobs)
SELECT tenant, 0, count(*) FROM jobs WHERE status IN ('queued', 'running', 'retrying') GROUP BY tenant;
