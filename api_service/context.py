"""What a request needs from the process: settings, the database pool and the publisher."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from api_service.published_rows import PublishedRows
from shared.broker import Publisher
from shared.settings import Settings
from shared.store import Database


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    publisher: Publisher
    #: Outbox rows of messages this process published, deleted in batches.
    published: PublishedRows


EXTENSION = "conveyor"


def services() -> Services:
    svc: Services = current_app.extensions[EXTENSION]
    return svc
