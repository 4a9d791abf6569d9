"""What a request needs from the process: settings, the database pool and the publisher."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from shared.broker import Publisher
from shared.settings import Settings
from shared.store import Database


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    publisher: Publisher


EXTENSION = "conveyor"


def services() -> Services:
    svc: Services = current_app.extensions[EXTENSION]
    return svc
