"""pg_dump / pg_restore discovery and version checks, libpq connection targets for child tools."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from pg_partition.core.archive.policy import MiB
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import (
    PreflightError,
)

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- pg tools


@dataclass(frozen=True)
class PgTool:
    """A PostgreSQL client program and its version (``pg_dump (PostgreSQL) 15.18`` -> major 15)."""

    path: str
    version: str
    major: int


_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def tool_version(path: str) -> PgTool:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise PreflightError(f"cannot run {path}: {exc}", fix="install the PostgreSQL client programs "
                             "(Debian: apt-get install postgresql-client) or pass the full path") from exc
    m = _VERSION_RE.search(out.stdout)
    if out.returncode != 0 or not m:
        raise PreflightError(f"{path} --version did not report a PostgreSQL version: {out.stdout or out.stderr!r}",
                             fix="pass the path of a real pg_dump/pg_restore")
    version = m.group(1) + (f".{m.group(2)}" if m.group(2) else "")
    return PgTool(path, version, int(m.group(1)))


def _candidates(name: str) -> list[str]:
    paths: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        paths.append(Path(os.environ["PG_BINDIR"]) / name)
    paths += sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    found = shutil.which(name)
    if found:
        paths.append(Path(found))
    out: list[str] = []
    for p in paths:
        if p.exists() and str(p) not in out:
            out.append(str(p))
    return out


def find_pg_tool(name: str, min_major: int, explicit: str | None = None, *, server: str = "") -> PgTool:
    """The ``pg_dump``/``pg_restore`` to use: ``explicit`` if given, else the newest installed one.

    Why the check: a pg_dump older than the server refuses to run ("server version mismatch") or, worse, a
    hand-patched one silently misses newer catalog features; a pg_restore older than the pg_dump that wrote an
    archive cannot read it. We check before anything is uploaded and say which version to install.
    """
    # pg_dump has a way around it: Parquet/CSV archives are written by our own COPY, no client program needed
    instead = (" -- or archive without pg_dump: format: parquet (or csv) works with every server version"
               if name == "pg_dump" else "")
    if explicit:
        tools = [tool_version(explicit)]
    else:
        tools = []
        for cand in _candidates(name):
            with contextlib.suppress(PreflightError):
                tools.append(tool_version(cand))
        if not tools:
            raise PreflightError(
                f"{name} was not found (looked in $PG_BINDIR, /usr/lib/postgresql/*/bin and PATH)",
                fix=f"install the PostgreSQL {min_major} client programs (Debian: apt-get install "
                f"postgresql-client-{min_major}) or pass the path of {name}{instead}")
    best = max(tools, key=lambda t: t.major)
    if best.major < min_major:
        what = server or f"PostgreSQL {min_major}"
        raise PreflightError(
            f"{name} {best.version} ({best.path}) is older than {what}: {name} must be at least the "
            f"server's major version ({min_major})",
            where=name,
            fix=f"install the PostgreSQL {min_major} (or newer) client programs (Debian: apt-get install "
            f"postgresql-client-{min_major}) and pass its path, e.g. /usr/lib/postgresql/{min_major}/bin/{name}, "
            f"or set PG_BINDIR{instead}",
        )
    return best


def server_version(conn: psycopg.Connection[Any]) -> tuple[int, str]:
    """(major, full text) of the server, e.g. (15, '15.18 (Debian 15.18-0+deb12u1)')."""
    num = catalog.server_version_num(conn)
    text = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    return num // 10000, text


def check_pg_dump(conn: psycopg.Connection[Any], pg_dump: str | None = None) -> PgTool:
    major, text = server_version(conn)
    return find_pg_tool("pg_dump", major, pg_dump, server=f"the server (PostgreSQL {text})")


def pg_restore_for(dump_major: int, pg_restore: str | None = None, pg_dump: str | None = None) -> PgTool:
    """A pg_restore able to read archives written by pg_dump ``dump_major`` (prefers pg_dump's sibling)."""
    if pg_restore is None and pg_dump:
        sibling = Path(pg_dump).with_name("pg_restore")
        if sibling.exists():
            tool = tool_version(str(sibling))
            if tool.major >= dump_major:
                return tool
    return find_pg_tool("pg_restore", dump_major, pg_restore, server=f"the pg_dump {dump_major} that wrote it")


_LIBPQ_PORTABLE = {"host", "hostaddr", "port", "dbname", "user", "passfile", "connect_timeout", "options",
                   "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword", "service",
                   "target_session_attrs", "gssencmode", "krbsrvname", "channel_binding", "keepalives",
                   "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout"}


SECRET_PARAMS = ("password", "sslpassword")
SERVICE = "pg_partition_child"


def libpq_params(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The connection's libpq parameters without its secrets (``password``, ``sslpassword``).

    Only options every libpq since PG 12 knows: psycopg's bundled (newer) libpq reports options such as
    sslcertmode that an older pg_dump's libpq rejects as "invalid connection option".
    """
    params = {k: v for k, v in conn.info.get_parameters().items() if k in _LIBPQ_PORTABLE and k not in SECRET_PARAMS}
    params["application_name"] = "pg_partition_archive"
    return params


def private_file(name: str, content: str) -> str:
    """Write a secret for a libpq client (a passfile, a service file) to a new file only this user can read (0600
    in a fresh 0700 folder), so it never goes through argv, the environment of other processes or a log; returns
    its path. The caller removes the folder (:func:`remove_private_file`) once the client has read it."""
    folder = tempfile.mkdtemp(prefix="pg_partition_")  # mode 0700
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    return path


def remove_private_file(path: str | None) -> None:
    """Remove a :func:`private_file` and its folder (nothing when ``path`` is None or already gone)."""
    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def libpq_target(conn: psycopg.Connection[Any]) -> tuple[str, dict[str, str]]:
    """A conninfo for client programs reaching the same database, and an environment carrying the secrets.

    No secret is ever on the command line, where ``ps`` and /proc/<pid>/cmdline show it to every local user:
    the password goes in ``PGPASSWORD``; ``sslpassword`` (which has no environment variable) goes in a private
    service file (mode 0600 in a private directory) named by ``PGSERVICEFILE``/``PGSERVICE``. Call
    :func:`release_target` with the environment once the child has connected or ended, to remove that file.
    """
    all_params = conn.info.get_parameters()
    params = libpq_params(conn)
    env = dict(os.environ)
    env.pop("PGSERVICEFILE", None)
    env.pop("PGSERVICE", None)
    if conn.info.password:
        env["PGPASSWORD"] = conn.info.password
    ssl_password = all_params.get("sslpassword")
    if ssl_password:
        if "\n" in ssl_password or "\r" in ssl_password:
            raise ValueError("sslpassword contains a line break; it cannot be passed to pg_dump safely")
        env["PGSERVICEFILE"] = private_file("pg_service.conf", f"[{SERVICE}]\nsslpassword={ssl_password}\n")
        params["service"] = SERVICE
    return psycopg.conninfo.make_conninfo(**params), env


def release_target(env: dict[str, str]) -> None:
    """Remove the private service file :func:`libpq_target` may have written (idempotent)."""
    path = env.get("PGSERVICEFILE")
    if path and os.path.basename(os.path.dirname(path)).startswith("pg_partition_"):
        remove_private_file(path)


def dump_pattern(table: QualifiedName) -> str:
    """A pg_dump ``--table`` pattern that matches exactly this table (quotes make ``* ? .`` literal)."""
    def q(part: str) -> str:
        return '"' + part.replace('"', '""') + '"'

    return f"{q(table.schema)}.{q(table.name)}"


class TailReader(threading.Thread):
    """Drains a child's stderr (so it can never block on a full pipe) and keeps the last bytes for errors."""

    def __init__(self, stream: IO[bytes], limit: int = 16_384) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.limit = limit
        self.data = b""

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read(65_536), b""):
            self.data = (self.data + chunk)[-self.limit:]

    def text(self) -> str:
        self.join(10)
        return self.data.decode("utf-8", "replace").strip()


def grow_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe (F_SETPIPE_SZ): fewer wake-ups per GB; harmless where unsupported."""
    with contextlib.suppress(Exception):
        import fcntl

        fcntl.fcntl(fd, 1031, MiB)
