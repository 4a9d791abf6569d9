-- Two indexes that pruning and retries lacked (found by reading executed plans, with auto_explain's
-- nested statements, on tables of 40,000-150,000 rows).
--
-- Pruning a job deletes its idempotency key through the foreign key's ON DELETE CASCADE, and
-- idempotency_keys had no index on job_id: each pruned job cost a full read of the keys table. A
-- batch of 500 took 2.0 s with 60,000 live keys and 3.6 s with 107,000, and grew with both; with the
-- index, 44 ms.
CREATE INDEX idempotency_keys_by_job ON idempotency_keys (job_id);

-- The finished jobs by time, for pruning, had a status predicate, which the retries of failed and
-- cancelled jobs (a tenant's retry, an operator's replay: `status = ANY('{failed,cancelled}')` and an
-- id) implied: with statistics gathered while those statuses were rare, Postgres read every retained
-- finished job's entry to find one (72,000 rows read to keep 1). Keyed on finished_at alone, as
-- migration 0010 did for the active and running jobs; pruning names the statuses as well.
-- Built before the old one is dropped (see 0010).
CREATE INDEX jobs_finished_by_time_0011 ON jobs (finished_at) WHERE finished_at IS NOT NULL;
DROP INDEX jobs_finished_by_time;
ALTER INDEX jobs_finished_by_time_0011 RENAME TO jobs_finished_by_time;
