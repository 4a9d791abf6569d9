"""What a request needs from the process: the settings and the database pool.

The API never talks to RabbitMQ on a request's behalf: the relay publishes what it commits.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from shared.settings import Settings
from shared.store import Database


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database


EXTENSION = "conveyor"


def services() -> Services:
    svc: Services = current_app.extensions[EXTENSION]
    return svc
