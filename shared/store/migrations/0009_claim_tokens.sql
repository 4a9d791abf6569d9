-- Each delivery of a job's message claims it with a token of its own. A worker whose claim committed
-- but whose connection broke before the answer arrived tries again with the same token and gets its
-- claim back, instead of finding the job running and skipping it: that job then sat out its lease and
-- lost an attempt, and a job with one attempt failed without ever running.
ALTER TABLE jobs ADD COLUMN claim_token uuid;
