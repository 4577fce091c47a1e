"""Schema migrations (Alembic), callable from the CLI, the demo and the tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from ingest.db import normalise_url
from ingest.settings import get_settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be doubled for configparser interpolation (passwords may contain it).
    config.set_main_option(
        "sqlalchemy.url", normalise_url(url or get_settings().effective_database_url).replace("%", "%%")
    )
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "-1") -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str | None = None) -> None:
    command.current(alembic_config(url), verbose=True)
