-- The partial indexes of active and running jobs are keyed on finished_at and lease_expires_at instead
-- of status. Every statement that writes a job by its id also says which status it expects it in (a
-- claim: queued or retrying; a success, a failure, a lease renewal: running), and Postgres could take
-- that condition for a way into an index whose predicate it implies. When the statistics had been
-- gathered while few jobs were active (a quiet hour, then a burst), the planner believed those indexes
-- all but empty and chose a scan of one over the primary key: each round of a worker read the index
-- entry of every job in the backlog to record a few successes (1.2-1.5 ms of a 3 ms round with 20,000
-- jobs queued; docs/performance.md). No such statement names finished_at or lease_expires_at in its
-- condition, so none can take these indexes; the statements that want them (queue statistics, lease
-- recovery) name those columns as well as the status.
--
-- The columns follow the status: a job is unfinished exactly while it is queued, retrying or running,
-- and holds a lease exactly while it runs. The statements that read these indexes still name the
-- statuses they want as well, so a row that broke that rule could only be missed, never taken for
-- a status it is not in.
--
-- Each new index is built before the old one is dropped: a build blocks writes to jobs while it reads
-- the table, and DROP INDEX takes a lock that blocks reads too, held until the migration commits.
CREATE INDEX jobs_active_by_queue_0010 ON jobs (queue, run_at) WHERE finished_at IS NULL;
CREATE INDEX jobs_running_by_lease_0010 ON jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
DROP INDEX jobs_active_by_queue;
DROP INDEX jobs_running_by_lease;
ALTER INDEX jobs_active_by_queue_0010 RENAME TO jobs_active_by_queue;
ALTER INDEX jobs_running_by_lease_0010 RENAME TO jobs_running_by_lease;
