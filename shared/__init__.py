"""What the API and the worker share: the message contract, settings, the Postgres store and the broker
adapter."""
