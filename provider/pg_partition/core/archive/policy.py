"""The archive policy (one model, used by the fleet config and the archive engine) and shared constants.

Why one pydantic model: the YAML fleet config, the archive DAG's params and the queue row's stored policy all
describe the same thing; one set of rules (aliases, bounds, consistency) means a value the config accepts is a
value the engine runs, and the config's error messages (file, line, field) come from the same validators.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.params import parse_bool

log = logging.getLogger("pg_partition")


MiB = 1024 * 1024
S3_MIN_PART = 5 * MiB
S3_MAX_PARTS = 10_000
MANIFEST_VERSION = 1
FORMATS = ("pg_dump", "parquet", "csv")
MODES = ("stream", "rds")
EXTENSIONS = {"pg_dump": ".dump", "parquet": ".parquet", "csv": ".csv.gz", "rds_csv": ".csv"}
CONTENT_TYPES = {"pg_dump": "application/octet-stream", "parquet": "application/vnd.apache.parquet",
                 "csv": "application/gzip", "rds_csv": "text/csv"}
DONE = ("dropped", "kept", "restored")
RESTORE_SCHEMA = "pgpartition_restore"  # not "pg_...": PostgreSQL reserves that prefix
DEFAULT_PREFIX = "pg-partition"
MARKER = "pg_partition restore of "

# --------------------------------------------------------------------------------------------------- policy

S3_MAX_PART = 5 * 1024 * MiB
PARQUET_CODECS = ("snappy", "zstd", "gzip", "lz4", "brotli", "none")
_FORMAT_ALIASES = {"dump": "pg_dump", "custom": "pg_dump", "csv_gzip": "csv", "csv.gz": "csv"}
_SSE_ALIASES = {"aes256": "AES256", "sse-s3": "AES256", "s3": "AES256", "aws:kms": "aws:kms", "kms": "aws:kms",
                "sse-kms": "aws:kms"}


class ArchivePolicy(BaseModel):
    """Where and how one table is archived. Built from layers: DAG defaults, then the queue row's ``policy``.

    ``sse``: ``AES256`` (SSE-S3) or ``aws:kms`` (SSE-KMS, with ``kms_key_id`` or the bucket's default key).
    ``mode``: ``stream`` (pg_dump/COPY through this worker) or ``rds`` (``aws_s3.query_export_to_s3`` run by
    the RDS/Aurora server itself: CSV only, no pg_dump).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str = Field(min_length=3, max_length=63, description="S3 bucket for archived partitions.")
    prefix: str = Field(DEFAULT_PREFIX, description="Key prefix: prefix/<db>/<schema>/<table>/...")
    format: Literal["pg_dump", "parquet", "csv"] = Field(
        "pg_dump", description="pg_dump (custom format), parquet or csv (gzip).")
    drop: bool = Field(True, description="Drop the table after the archive is verified (false keeps it).")
    aws_conn_id: str | None = Field(
        None, min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Airflow AWS connection id (null: the archive DAG's aws_conn_id, by default aws_default).")
    sse: Literal["AES256", "aws:kms"] | None = Field(
        None, description="Server-side encryption: AES256 (SSE-S3) or aws:kms (SSE-KMS).")
    kms_key_id: str | None = Field(None, description="KMS key id when sse is aws:kms.")
    mode: Literal["stream", "rds"] = Field(
        "stream", description="stream (through the worker) or rds (aws_s3.query_export_to_s3 on RDS/Aurora, csv).")
    storage_class: str | None = Field(None, description="S3 storage class, e.g. STANDARD_IA, GLACIER_IR.")
    compress: int | None = Field(None, ge=0, le=9, description="pg_dump compression level.")
    part_size: int = Field(8 * MiB, ge=S3_MIN_PART, le=S3_MAX_PART, description="Multipart upload part size, bytes.")
    max_inflight: int = Field(2, ge=1, le=64, description="Parts uploaded at once.")
    parquet_compression: Literal["snappy", "zstd", "gzip", "lz4", "brotli", "none"] = Field(
        "zstd", description="Parquet codec (zstd: about half snappy's bytes for the same CPU).")
    region: str | None = Field(None, description="AWS region of the bucket (rds mode).")

    @field_validator("format", mode="before")
    @classmethod
    def _format_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().lower().replace("-", "_")
            return _FORMAT_ALIASES.get(text, text)
        return value

    @field_validator("mode", "parquet_compression", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("sse", mode="before")
    @classmethod
    def _sse_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None
            return _SSE_ALIASES.get(value.strip().lower(), value)
        return value

    @field_validator("drop", mode="before")
    @classmethod
    def _drop(cls, value: Any) -> Any:
        return parse_bool(value, what="drop", default=True)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return value.strip("/")

    @model_validator(mode="after")
    def _consistent(self) -> ArchivePolicy:
        if self.kms_key_id and self.sse != "aws:kms":
            raise ValueError("kms_key_id is only used with sse: aws:kms (set it, or remove kms_key_id)")
        if self.mode == "rds" and self.format != "csv":
            raise ValueError("mode: rds exports with aws_s3.query_export_to_s3, which writes csv only "
                             "(set format: csv, or mode: stream)")
        return self

    @classmethod
    def build(cls, *layers: Mapping[str, Any] | None) -> ArchivePolicy:
        """Merge layers (later wins; ``None`` and "" never override) and validate the result."""
        names = set(cls.model_fields)
        merged: dict[str, Any] = {}
        for layer in layers:
            for k, v in (layer or {}).items():
                if k not in names:
                    raise InvalidInputError(f"unknown archive policy field {k!r}",
                                            fix="use only: " + ", ".join(sorted(names)))
                if v is not None and v != "":
                    merged[k] = v
        if not merged.get("bucket"):
            raise InvalidInputError(
                "no S3 bucket for the archive",
                fix="set archive.bucket in the rotation config for this table, or the DAG's bucket param",
            )
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'policy'}: "
                                 f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
            raise InvalidInputError(f"invalid archive policy: {problems}",
                                    fix="correct the archive settings named above") from None

    def put_args(self) -> dict[str, Any]:
        """Encryption/storage arguments for CreateMultipartUpload and PutObject."""
        args: dict[str, Any] = {}
        if self.sse:
            args["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        return args

    @property
    def object_format(self) -> str:
        return "rds_csv" if self.mode == "rds" else self.format

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
