-- A tenant's submission rate must be a finite number. `> 0` let NaN and Infinity through (in Postgres
-- NaN is greater than every number), and the API's token bucket cannot work with either: every
-- submission of such a tenant failed after its job was written. `conveyor tenants set` refuses them
-- too; a rate already stored as one goes back to the default.
UPDATE tenants SET submit_rate_per_second = NULL WHERE NOT (submit_rate_per_second < 'Infinity');
ALTER TABLE tenants ADD CONSTRAINT tenants_submit_rate_finite CHECK (submit_rate_per_second < 'Infinity');
