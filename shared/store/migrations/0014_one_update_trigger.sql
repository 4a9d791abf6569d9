-- One statement trigger on UPDATE of `jobs` instead of three. The transition check, the active-job
-- counter and the dead-letter filing each had their own (0007, 0012), so every UPDATE of `jobs` called
-- three PL/pgSQL functions that ran five statements between them, most of them on nothing: a worker's
-- round (claims, queued -> running, and successes, running -> succeeded) has no row entering or leaving
-- `failed`, yet it ran the dead-letter INSERT and DELETE, and its claims change no active count.
--
-- Now one function reads the statement's changed rows once: whether a transition is illegal, whether
-- an active count moves, whether a row enters or leaves `failed`; then it runs only the writes that
-- have something to write. A worker's round of 2 claims and 2 successes cost its Postgres backend
-- 763-767 us of CPU with the three triggers and 717-733 us with this one; of 1 + 1, 620-637 against
-- 577-583 us; of 4 + 4, 897-937 against 880-883 us (3,000 rounds in a loop on one connection, two
-- alternations each, docs/performance.md). A trigger that does nothing still costs a round 30-60 us,
-- and the 2 + 2 round with no trigger on UPDATE at all cost 537-543 us.
--
-- What the triggers enforce and maintain is unchanged: an illegal transition
-- raises check_violation (the store's IllegalTransition) and undoes the statement; the active jobs
-- move per tenant on the transaction's shard, tenants in name order; a job entering `failed` gets its
-- dead letter and one leaving it loses it. As in 0012, above 64 changed rows the statements run through
-- EXECUTE, planned for the rows at hand, so each is written twice: the two copies must stay identical.
--
-- The INSERT and DELETE triggers stay as they were (jobs_count_active keeps only their branches):
-- merged, the two INSERT triggers cost a submission the same (597-640 against 623-630 us).
--
-- Replacing the triggers takes a lock on `jobs` for a moment; `conveyor migrate` waits for it as for
-- any other (shared/store/migrate.py).

DROP TRIGGER jobs_status_transition_on_update ON jobs;
DROP TRIGGER jobs_active_count_on_update ON jobs;
DROP TRIGGER jobs_dead_letters ON jobs;
DROP FUNCTION jobs_check_transition();
DROP FUNCTION jobs_track_dead_letters();

CREATE FUNCTION jobs_after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    few boolean := NOT EXISTS (SELECT FROM new_rows OFFSET 64);
    bad_from text;
    bad_to text;
    counts_move boolean;
    failed_moves boolean;
BEGIN
    IF few THEN
        SELECT (array_agg(o.status) FILTER (WHERE t.from_status IS NULL))[1],
               (array_agg(n.status) FILTER (WHERE t.from_status IS NULL))[1],
               coalesce(bool_or(coalesce(was_s.is_active, false) <> coalesce(now_s.is_active, false)), false),
               coalesce(bool_or(n.status = 'failed' OR o.status = 'failed'), false)
          INTO bad_from, bad_to, counts_move, failed_moves
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        LEFT JOIN job_statuses was_s ON was_s.status = o.status
        LEFT JOIN job_statuses now_s ON now_s.status = n.status
        LEFT JOIN job_status_transitions t ON t.from_status = o.status AND t.to_status = n.status
        WHERE n.status <> o.status;
    ELSE
        EXECUTE $sql$
        SELECT (array_agg(o.status) FILTER (WHERE t.from_status IS NULL))[1],
               (array_agg(n.status) FILTER (WHERE t.from_status IS NULL))[1],
               coalesce(bool_or(coalesce(was_s.is_active, false) <> coalesce(now_s.is_active, false)), false),
               coalesce(bool_or(n.status = 'failed' OR o.status = 'failed'), false)
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        LEFT JOIN job_statuses was_s ON was_s.status = o.status
        LEFT JOIN job_statuses now_s ON now_s.status = n.status
        LEFT JOIN job_status_transitions t ON t.from_status = o.status AND t.to_status = n.status
        WHERE n.status <> o.status
        $sql$ INTO bad_from, bad_to, counts_move, failed_moves;
    END IF;
    IF bad_to IS NOT NULL THEN  -- a status is never NULL
        RAISE EXCEPTION 'illegal job status transition: % -> %', bad_from, bad_to
            USING ERRCODE = 'check_violation';
    END IF;

    IF counts_move AND few THEN
        INSERT INTO tenant_active_jobs AS t (tenant, shard, jobs)
        SELECT n.tenant, (txid_current() % 16)::smallint, sum(CASE WHEN now_s.is_active THEN 1 ELSE -1 END)
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        JOIN job_statuses was_s ON was_s.status = o.status
        JOIN job_statuses now_s ON now_s.status = n.status
        WHERE was_s.is_active <> now_s.is_active
        GROUP BY n.tenant
        ORDER BY n.tenant
        ON CONFLICT (tenant, shard) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs;
    ELSIF counts_move THEN
        EXECUTE $sql$
        INSERT INTO tenant_active_jobs AS t (tenant, shard, jobs)
        SELECT n.tenant, (txid_current() % 16)::smallint, sum(CASE WHEN now_s.is_active THEN 1 ELSE -1 END)
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        JOIN job_statuses was_s ON was_s.status = o.status
        JOIN job_statuses now_s ON now_s.status = n.status
        WHERE was_s.is_active <> now_s.is_active
        GROUP BY n.tenant
        ORDER BY n.tenant
        ON CONFLICT (tenant, shard) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs
        $sql$;
    END IF;

    IF failed_moves AND few THEN
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
    ELSIF failed_moves THEN
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

CREATE TRIGGER jobs_after_update
    AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_after_update();

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
    ELSE
        SELECT array_agg(tenant), array_agg(delta) INTO tenants, deltas
        FROM (SELECT o.tenant, -count(*) AS delta FROM old_rows o JOIN job_statuses s USING (status)
              WHERE s.is_active GROUP BY o.tenant) AS c;
    END IF;
    INSERT INTO tenant_active_jobs AS t (tenant, shard, jobs)
    SELECT c.tenant, (txid_current() % 16)::smallint, c.delta
    FROM unnest(tenants, deltas) AS c(tenant, delta)
    ORDER BY c.tenant
    ON CONFLICT (tenant, shard) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs;
    RETURN NULL;
END
$$;
