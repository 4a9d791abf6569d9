-- The three row triggers on `jobs` become statement triggers that read the statement's transition
-- tables: the transition check, the active-job counter and the dead-letter filing each run once per
-- statement, however many rows it wrote, as set-based queries. A batch of 100 submissions ran each
-- trigger 100 times, and Postgres spent half its time per inserted row in them; a worker's round
-- (the claims and successes of its threads in one statement) ran them once per row too
-- (docs/performance.md). What they enforce and maintain is unchanged.
--
-- A trigger with transition tables serves one event, so each concern has one trigger per event.
-- Status names and active statuses still come from `job_status_transitions` and `job_statuses`.

DROP TRIGGER jobs_status_transition ON jobs;
DROP TRIGGER jobs_active_count ON jobs;
DROP TRIGGER jobs_dead_letters ON jobs;
DROP FUNCTION jobs_enforce_transition();
DROP FUNCTION jobs_count_active();
DROP FUNCTION jobs_track_dead_letters();

-- Legal transitions: a new job starts in a status that `('', status)` allows; an update moves a job
-- only along a row of `job_status_transitions`. Raised as a check_violation, which the store turns
-- into IllegalTransition; the statement, and so its whole transaction, is undone.
CREATE FUNCTION jobs_check_new_status() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad text;
BEGIN
    SELECT n.status INTO bad FROM new_rows n
    WHERE NOT EXISTS (SELECT 1 FROM job_status_transitions t
                      WHERE t.from_status = '' AND t.to_status = n.status)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'illegal job status transition: (new) -> %', bad
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION jobs_check_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT o.status AS old_status, n.status AS new_status INTO bad
    FROM old_rows o JOIN new_rows n ON n.id = o.id
    WHERE n.status <> o.status
      AND NOT EXISTS (SELECT 1 FROM job_status_transitions t
                      WHERE t.from_status = o.status AND t.to_status = n.status)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'illegal job status transition: % -> %', bad.old_status, bad.new_status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

-- Active jobs per tenant: the statement's rows that entered an active status, less those that left
-- one, added to one counter row per tenant, on the transaction's shard (as in 0006), tenants in name
-- order so that two statements cannot deadlock on them. One function for the three events: each
-- reads only the transition tables its event has.
CREATE FUNCTION jobs_count_active() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    tenants text[];
    deltas bigint[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(tenant), array_agg(delta) INTO tenants, deltas
        FROM (SELECT n.tenant, count(*) AS delta FROM new_rows n JOIN job_statuses s USING (status)
              WHERE s.is_active GROUP BY n.tenant) AS c;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(tenant), array_agg(delta) INTO tenants, deltas
        FROM (SELECT o.tenant, -count(*) AS delta FROM old_rows o JOIN job_statuses s USING (status)
              WHERE s.is_active GROUP BY o.tenant) AS c;
    ELSE
        SELECT array_agg(tenant), array_agg(delta) INTO tenants, deltas
        FROM (SELECT n.tenant, sum(CASE WHEN now_s.is_active THEN 1 ELSE -1 END) AS delta
              FROM old_rows o JOIN new_rows n ON n.id = o.id
              JOIN job_statuses was_s ON was_s.status = o.status
              JOIN job_statuses now_s ON now_s.status = n.status
              WHERE was_s.is_active <> now_s.is_active
              GROUP BY n.tenant) AS c;
    END IF;
    INSERT INTO tenant_active_jobs AS t (tenant, shard, jobs)
    SELECT c.tenant, (txid_current() % 16)::smallint, c.delta
    FROM unnest(tenants, deltas) AS c(tenant, delta)
    ORDER BY c.tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs;
    RETURN NULL;
END
$$;

-- A job that enters `failed` gets its dead letter (a new error replaces the old one's); one that
-- leaves `failed` (a retry, a replay) stops being one.
CREATE FUNCTION jobs_track_dead_letters() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dead_letters (job_id, tenant, queue, job_type, error_type, reason)
    SELECT n.id, n.tenant, n.queue, n.type,
           COALESCE(n.error->>'type', 'unknown'),
           COALESCE(n.error->>'title', '') || ': ' || COALESCE(n.error->>'detail', '')
    FROM old_rows o JOIN new_rows n ON n.id = o.id
    WHERE n.status = 'failed' AND o.status <> 'failed'
    ORDER BY n.id
    ON CONFLICT (job_id) DO UPDATE
        SET error_type = EXCLUDED.error_type, reason = EXCLUDED.reason, dead_at = now();
    DELETE FROM dead_letters d
    USING old_rows o JOIN new_rows n ON n.id = o.id
    WHERE d.job_id = n.id AND o.status = 'failed' AND n.status <> 'failed';
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_status_transition_on_insert
    AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_check_new_status();
CREATE TRIGGER jobs_status_transition_on_update
    AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_check_transition();
CREATE TRIGGER jobs_active_count_on_insert
    AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_active();
CREATE TRIGGER jobs_active_count_on_update
    AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_active();
CREATE TRIGGER jobs_active_count_on_delete
    AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_active();
CREATE TRIGGER jobs_dead_letters
    AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_track_dead_letters();
