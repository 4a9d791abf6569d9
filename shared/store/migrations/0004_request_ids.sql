-- The X-Request-ID of the request that submitted a job, carried into the worker's logs.
ALTER TABLE jobs ADD COLUMN request_id text;
