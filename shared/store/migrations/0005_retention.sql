-- The relay prunes finished jobs in small batches, oldest first.
CREATE INDEX jobs_finished_by_time ON jobs (finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
