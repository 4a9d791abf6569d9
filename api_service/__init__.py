"""The HTTP API: accepts jobs, answers at once, shows every job to the end."""
