-- The active-job counter picked a random shard for every row, so a transaction inserting many jobs (a
-- batch) locked several counter rows in random order, and two such transactions could deadlock. Now
-- every row of one transaction goes to the same shard, chosen from its transaction id: a transaction
-- holds at most one counter row, and concurrent transactions still spread over the 16 shards.
CREATE OR REPLACE FUNCTION jobs_count_active() RETURNS trigger
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
                (txid_current() % 16)::smallint, delta)
        ON CONFLICT (tenant, shard) DO UPDATE SET jobs = t.jobs + EXCLUDED.jobs;
    END IF;
    RETURN NULL;
END
$$;
