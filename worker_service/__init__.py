"""The worker: dramatiq consumers that claim jobs in Postgres, run their handlers and record outcomes,
plus the relay that moves the outbox to RabbitMQ."""
