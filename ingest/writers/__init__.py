"""Batch writers, one module per database, chosen by dialect name through the registry."""

from ingest.errors import BatchRefused
from ingest.writers.base import EventWriter, WriteStatus, get_writer, register_writer
from ingest.writers.postgres import PostgresCopyWriter
from ingest.writers.sqlite import SqliteWriter

register_writer("postgresql", PostgresCopyWriter)
register_writer("sqlite", SqliteWriter)

__all__ = [
    "BatchRefused",
    "EventWriter",
    "PostgresCopyWriter",
    "SqliteWriter",
    "WriteStatus",
    "get_writer",
    "register_writer",
]
