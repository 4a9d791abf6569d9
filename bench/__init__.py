"""Conveyor's benchmark harness: ``make bench`` (``python -m bench``).

It measures Conveyor side by side with raw dramatiq, raw Celery (and Flower), and a minimal Flask +
Postgres endpoint, in one run on the same Postgres and RabbitMQ, and writes the table to
``docs/performance.md``. Each run uses its own database and queue prefix (``conveyor_bench_<pid>``),
removed at the end, so it never touches ``make run``, a test run or another benchmark.

Modules: ``run`` (the command line and the order of the phases), ``phases`` (one measurement per
subject), ``services`` (the processes and the run's isolation), ``load`` (wrk and the paced Python
load generator), ``profile`` (py-spy), ``report`` (the table, the targets and the document), and the
comparison subjects ``raw_dramatiq``, ``raw_celery`` (with ``stamps``) and ``minimal_app``.
"""
