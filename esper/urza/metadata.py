"""Urza's metadata schema (SQLAlchemy Core): SQLite file by default, PostgreSQL by URL."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

metadata = sa.MetaData()

blueprints = sa.Table(
    "blueprints", metadata,
    sa.Column("blueprint_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("family", sa.String(64), nullable=False, index=True),
    sa.Column("input_kind", sa.Integer, nullable=False),
    # Deterministic serialisation of the BlueprintSpec and its SHA-256 (identity of the content).
    sa.Column("spec", sa.LargeBinary, nullable=False),
    sa.Column("spec_sha256", sa.String(64), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)

blueprint_tags = sa.Table(
    "blueprint_tags", metadata,
    sa.Column("blueprint_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.ForeignKeyConstraint(["blueprint_id", "version"], ["blueprints.blueprint_id", "blueprints.version"],
                            ondelete="CASCADE"),
)

artifacts = sa.Table(
    "artifacts", metadata,
    sa.Column("kernel_id", sa.String(200), primary_key=True),
    sa.Column("blueprint_id", sa.String(64), nullable=False, index=True),
    sa.Column("blueprint_version", sa.Integer, nullable=False),
    # Canonical text of the shape, e.g. "-1,32": exact-match queries compare this column.
    sa.Column("input_shape", sa.String(256), nullable=False, index=True),
    sa.Column("device", sa.Integer, nullable=False),
    sa.Column("dtype", sa.Integer, nullable=False),
    sa.Column("status", sa.Integer, nullable=False, index=True),
    sa.Column("status_reason", sa.Text, nullable=False, default=""),
    sa.Column("sha256", sa.String(64), nullable=False, default=""),
    sa.Column("size_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("parameter_count", sa.BigInteger, nullable=False, default=0),
    sa.Column("flops_per_sample", sa.BigInteger, nullable=False, default=0),
    sa.Column("latency_us", sa.Float, nullable=False, default=0.0),
    sa.Column("format", sa.String(64), nullable=False, default=""),
    sa.Column("preservation_error", sa.Float, nullable=False, default=0.0),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)

artifact_tags = sa.Table(
    "artifact_tags", metadata,
    sa.Column("kernel_id", sa.String(200), sa.ForeignKey("artifacts.kernel_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True, index=True),
)

# Learned Tamiyo policies: one row per (name, version); the weights are a blob in the same store.
policies = sa.Table(
    "policies", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("manifest_json", sa.Text, nullable=False),
    # SHA-256 of the manifest text and of the weights together: the identity of a publication.
    sa.Column("content_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("weights_sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("feature_schema", sa.String(128), nullable=False),
    sa.Column("policy_version", sa.String(200), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)


def normalise_database_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgresql://`` URLs (psycopg2 is not installed)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def create_metadata_engine(url: str) -> sa.Engine:
    """An engine for `url` with the schema created. SQLite gets WAL and a busy timeout so the
    server's worker threads can share one file."""
    url = normalise_database_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    metadata.create_all(engine)
    return engine
