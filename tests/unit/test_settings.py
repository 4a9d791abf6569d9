"""Settings read from the environment (shared/settings.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from shared.settings import Settings, SettingsError, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"
FIELDS = dataclasses.fields(Settings)
ENV_NAMES = [f.metadata["env"] for f in FIELDS]


def test_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_an_explicit_mapping_is_read_instead_of_the_process_environment() -> None:
    # tests/conftest.py sets CONVEYOR_QUEUE_PREFIX=conveyor_test. in os.environ; it must not leak in.
    assert Settings.from_env({}).queue_prefix == "conveyor."
    assert Settings.from_env({"CONVEYOR_QUEUE_PREFIX": "other."}).queue_prefix == "other."


def test_integer_setting_is_parsed_as_int() -> None:
    settings = Settings.from_env({"CONVEYOR_DB_POOL_SIZE": "16", "CONVEYOR_API_WORKERS": " 3 "})
    assert settings.db_pool_size == 16
    assert type(settings.db_pool_size) is int
    assert settings.api_workers == 3


def test_float_setting_is_parsed_as_float() -> None:
    settings = Settings.from_env({"CONVEYOR_RETRY_BASE_SECONDS": "0.25", "CONVEYOR_RETRY_MAX_SECONDS": "5"})
    assert settings.retry_base_seconds == 0.25
    assert settings.retry_max_seconds == 5.0
    assert type(settings.retry_max_seconds) is float


def test_string_setting_is_taken_verbatim() -> None:
    url = "postgresql://app:s3cret@db.internal:5433/jobs?sslmode=require"
    settings = Settings.from_env({"CONVEYOR_DATABASE_URL": url, "CONVEYOR_LOG_LEVEL": "DEBUG"})
    assert settings.database_url == url
    assert settings.log_level == "DEBUG"


def test_unrelated_variables_are_ignored() -> None:
    assert (
        Settings.from_env({"DATABASE_URL": "postgresql://elsewhere/db", "CONVEYOR_NOPE": "1"}) == Settings()
    )


@pytest.mark.parametrize(
    ("env", "raw"),
    [
        ("CONVEYOR_DB_POOL_SIZE", "eight"),
        ("CONVEYOR_DB_POOL_SIZE", "3.5"),
        ("CONVEYOR_DB_POOL_SIZE", ""),
        ("CONVEYOR_RETRY_BASE_SECONDS", "two"),
        ("CONVEYOR_RELAY_POLL_SECONDS", "0,5"),
    ],
)
def test_unparseable_value_raises_settings_error_naming_the_variable(env: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=env) as caught:
        Settings.from_env({env: raw})
    assert repr(raw) in str(caught.value)


@pytest.mark.parametrize(
    ("env", "raw"),
    [
        ("CONVEYOR_DB_POOL_SIZE", "0"),
        ("CONVEYOR_JOB_LEASE_SECONDS", "1"),
        ("CONVEYOR_MAX_BODY_BYTES", "1023"),
        ("CONVEYOR_RETRY_BASE_SECONDS", "-0.5"),
        ("CONVEYOR_RELAY_POLL_SECONDS", "0.001"),
    ],
)
def test_value_below_its_minimum_is_rejected(env: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=f"{env} must be at least"):
        Settings.from_env({env: raw})


def test_value_equal_to_its_minimum_is_accepted() -> None:
    settings = Settings.from_env({"CONVEYOR_JOB_LEASE_SECONDS": "2", "CONVEYOR_RETRY_BASE_SECONDS": "0"})
    assert settings.job_lease_seconds == 2
    assert settings.retry_base_seconds == 0.0


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize("f", FIELDS, ids=[f.name for f in FIELDS])
def test_every_default_satisfies_its_own_minimum(f: dataclasses.Field[object]) -> None:
    minimum = f.metadata["minimum"]
    assert minimum is None or f.default >= minimum


def test_every_setting_has_a_unique_conveyor_variable_and_a_doc() -> None:
    assert len(set(ENV_NAMES)) == len(ENV_NAMES)
    assert all(name.startswith("CONVEYOR_") for name in ENV_NAMES)
    assert all(f.metadata["doc"].strip() for f in FIELDS)


def test_redacted_broker_url_hides_the_password() -> None:
    settings = Settings(broker_url="amqp://conveyor:hunter2@rabbit:5672/%2F")
    redacted = settings.redacted_broker_url()
    assert "hunter2" not in redacted
    assert redacted == "amqp://conveyor:***@rabbit:5672/%2F"


def test_redacted_database_url_hides_the_password() -> None:
    settings = Settings(database_url="postgresql://app:s3cret@db:5432/conveyor")
    assert settings.redacted_database_url() == "postgresql://app:***@db:5432/conveyor"


def test_redaction_handles_a_password_with_reserved_characters() -> None:
    settings = Settings(database_url="postgresql://app:p%40ss:w0rd@db/conveyor")
    redacted = settings.redacted_database_url()
    assert "p%40ss" not in redacted
    assert "w0rd" not in redacted
    assert redacted == "postgresql://app:***@db/conveyor"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("host=db user=app password=hunter2 dbname=x", "host=db user=app password=*** dbname=x"),
        ("host=db password = 'hunt er\\'2' dbname=x", "host=db password = *** dbname=x"),
        ("PASSWORD=hunter2 host=db", "PASSWORD=*** host=db"),
        ("postgresql://app:hunt#er2@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:hunt?er2@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:s3cret@[::1]:5432/x", "postgresql://app:***@[::1]:5432/x"),
        ("postgresql://[::1]:5432/x?application_name=a@b", "postgresql://[::1]:5432/x?application_name=a@b"),
        (
            "host=db dbname=x options=-ch=http://z password=secret",
            "host=db dbname=x options=-ch=http://z password=***",
        ),
        (
            "postgresql://u:pw@host:5432?sslmode=require&application_name=a@b",
            "postgresql://u:***@host:5432?sslmode=require&application_name=a@b",
        ),
    ],
)
def test_redaction_covers_every_form_psycopg2_takes(dsn: str, shown: str) -> None:
    """psycopg2 also takes libpq's keyword/value strings; `conveyor settings` and the CLI's "cannot
    reach Postgres" printed their password. A URL with an unencoded # or ? in its password too."""
    assert Settings(database_url=dsn).redacted_database_url() == shown


def test_url_without_a_password_is_shown_unchanged() -> None:
    url = "postgresql://postgres@127.0.0.1:5432/conveyor"
    assert Settings(database_url=url).redacted_database_url() == url


def test_markdown_table_lists_every_variable_with_its_default() -> None:
    table = markdown_table()
    lines = table.splitlines()
    assert lines[0] == "| Variable | Default | What it does |"
    assert len(lines) == 2 + len(FIELDS)
    for f in FIELDS:
        default = f"`{f.default}`" if f.default != "" else "(empty)"
        assert f"| `{f.metadata['env']}` | {default} |" in table


def test_readme_documents_every_environment_variable() -> None:
    assert README.is_file(), f"{README} is missing"
    text = README.read_text(encoding="utf-8")
    missing = [name for name in ENV_NAMES if not re.search(rf"\b{name}\b", text)]
    assert not missing, f"README.md does not mention {missing}"
