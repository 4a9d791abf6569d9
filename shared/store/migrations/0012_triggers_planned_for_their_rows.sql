-- The statements of the triggers of 0007 that join a statement's old rows with its new rows are
-- planned for the number of rows at hand when there are more than 64. PL/pgSQL plans each of its
-- statements once per session and keeps that plan, made for the transition tables' size at the first
-- call. On a pooled connection the first call is usually a one-row statement (a claim, a retry), so the
-- join of old_rows with new_rows became a nested loop that compares every old row with every new one,
-- and later statements of thousands of rows ran it too. Replaying 2,000 dead letters (one UPDATE for
-- the whole selection) after one retry on the same connection: 3,998,000 rows removed by join filter in
-- each of the three joining statements (auto_explain, log_nested_statements); the transition check
-- 317 ms, the dead-letter DELETE 1,137 ms, the active count 364 ms. The replay took 1.6 s, 5.9 s for
-- 4,000 jobs, 199 s for 20,000, every one of them locked all along; from about 5,000 on, the services'
-- statement timeout (10 s) cancels it. Failing thousands of jobs at once (the dead-letter INSERT) and
-- claiming them did the same.
--
-- Above 64 new rows these statements now run through EXECUTE, planned for the rows at hand (hash and
-- merge joins): the same three took 1.1, 4.8 and 2.1 ms, the replay 85 ms, 0.73 s for 20,000 jobs. Up to
-- 64 rows they keep their saved plan (the worker's rounds, single operator actions), which whatever it
-- is compares at most 64 x 64 rows. Measured per UPDATE on a connection whose plans were saved for one
-- row, saved plans against EXECUTE: 0.43 against 0.78 ms for one row (replanning every statement would
-- cost each of the worker's rounds that much more), 1.3 against 1.4 ms for 32 rows, even at 48, 3.0
-- against 2.5 ms for 64, 7.7 against 4.5 ms for 128. Counting up to 65 new rows, three times per UPDATE,
-- costs about 10 us. Both branches run the same SQL, which must stay identical.
--
-- The transition check loses its LIMIT 1: with it, Postgres planned a nested loop from about 300 rows
-- up even on a fresh connection (it expects to stop at the first illegal row, and there usually is
-- none): a claim of 300 jobs spent 7.0 ms in it, one of 2,000 jobs 302 ms (now 0.2 and 1.5 ms).
-- PL/pgSQL keeps the first row of the result either way. The triggers on INSERT and DELETE read one
-- transition table each and join it only with the small status tables; they are left as they were.
-- What the triggers enforce and maintain is unchanged.
--
-- Replacing the functions takes no lock on `jobs`; each session compiles the new ones at its next call.

CREATE OR REPLACE FUNCTION jobs_check_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad_from text;
    bad_to text;
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows OFFSET 64) THEN
        SELECT o.status, n.status INTO bad_from, bad_to
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        WHERE n.status <> o.status
          AND NOT EXISTS (SELECT 1 FROM job_status_transitions t
                          WHERE t.from_status = o.status AND t.to_status = n.status);
    ELSE
        EXECUTE $sql$
        SELECT o.status, n.status
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        WHERE n.status <> o.status
          AND NOT EXISTS (SELECT 1 FROM job_status_transitions t
                          WHERE t.from_status = o.status AND t.to_status = n.status)
        $sql$ INTO bad_from, bad_to;
    END IF;
    IF bad_to IS NOT NULL THEN  -- EXECUTE does not set FOUND; a status is never NULL
        RAISE EXCEPTION 'illegal job status transition: % -> %', bad_from, bad_to
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION jobs_count_active() RETURNS trigger
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
    ELSIF NOT EXISTS (SELECT FROM new_rows OFFSET 64) THEN
        SELECT array_agg(tenant), array_agg(delta) INTO tenants, deltas
        FROM (SELECT n.tenant, sum(CASE WHEN now_s.is_active THEN 1 ELSE -1 END) AS delta
              FROM old_rows o JOIN new_rows n ON n.id = o.id
              JOIN job_statuses was_s ON was_s.status = o.status
              JOIN job_statuses now_s ON now_s.status = n.status
              WHERE was_s.is_active <> now_s.is_active
              GROUP BY n.tenant) AS c;
    ELSE
        EXECUTE $sql$
        SELECT array_agg(tenant), array_agg(delta)
        FROM (SELECT n.tenant, sum(CASE WHEN now_s.is_active THEN 1 ELSE -1 END) AS delta
              FROM old_rows o JOIN new_rows n ON n.id = o.id
              JOIN job_statuses was_s ON was_s.status = o.status
              JOIN job_statuses now_s ON now_s.status = n.status
              WHERE was_s.is_active <> now_s.is_active
              GROUP BY n.tenant) AS c
        $sql$ INTO tenants, deltas;
    END IF;
    INSERT INTO tenant_active_jobs AS t (tenant, shard, jobs)
    SELECT c.tenant, (txid_current() % 16)::smallint, c.delta
    FROM unnest(tenants, deltas) AS c(tenant, delta)
    ORDER BY c.tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION jobs_track_dead_letters() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows OFFSET 64) THEN
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
    ELSE
        EXECUTE $sql$
        INSERT INTO dead_letters (job_id, tenant, queue, job_type, error_type, reason)
        SELECT n.id, n.tenant, n.queue, n.type,
               COALESCE(n.error->>'type', 'unknown'),
               COALESCE(n.error->>'title', '') || ': ' || COALESCE(n.error->>'detail', '')
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        WHERE n.status = 'failed' AND o.status <> 'failed'
        ORDER BY n.id
        ON CONFLICT (job_id) DO UPDATE
            SET error_type = EXCLUDED.error_type, reason = EXCLUDED.reason, dead_at = now()
        $sql$;
        EXECUTE $sql$
        DELETE FROM dead_letters d
        USING old_rows o JOIN new_rows n ON n.id = o.id
        WHERE d.job_id = n.id AND o.status = 'failed' AND n.status <> 'failed'
        $sql$;
    END IF;
    RETURN NULL;
END
$$;
