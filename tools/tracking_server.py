"""A shared MLflow tracking server on PostgreSQL: `python -m tools.tracking_server` from the repo root
(`make mlflow-server`). A team tool beside the pipeline, not part of it: no stage imports it.

    python -m tools.tracking_server [--dir .mlflow-server] [--host 127.0.0.1] [--port 5001] [--pg-port 5433]

Everything lives in `--dir`: a PostgreSQL cluster (`pgdata/`, created on first use with Debian's
`/usr/lib/postgresql/<version>/bin/initdb`, listening on 127.0.0.1 only, its unix socket in
`pgsocket/`, password in `pgpassword`), its log `postgresql.log`, and the artifacts the server
stores for its clients (`artifacts/`, `mlflow server --serve-artifacts`). The server runs in the
foreground; Ctrl-C or SIGTERM stops it, then PostgreSQL. The pipeline logs there unchanged with
`export MLFLOW_TRACKING_URI=http://<host>:<port>`.

As root, PostgreSQL (which refuses to run as root) runs as the `postgres` system user that
Debian's package creates, through `runuser`; the data directory is owned by that user.

`running(...)` is the same thing as a context manager (free ports by default), for tests; their
`free_port()` (tests/conftest.py) is this module's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline import cli
from pipeline.errors import UserError

INSTALL_HINT = (
    "install it with `sudo apt-get install postgresql` (Debian/Ubuntu), or run "
    "`make mlflow-server`, which installs it when run as root"
)
DRIVER_HINT = "install it with `.venv/bin/pip install -r requirements.txt` (package psycopg2-binary)"
PG_TOOLS = ("initdb", "pg_ctl", "postgres")
PG_HOST = "127.0.0.1"  # PostgreSQL only ever listens here; only the mlflow server talks to it
ROLE = DB = "mlflow"
SYSTEM_USER = "postgres"  # who runs PostgreSQL when we are root
SOCKET_PATH_MAX = 100  # a unix socket path must fit in 108 bytes: <dir>/.s.PGSQL.<port>


# --- what is installed --------------------------------------------------------------------------


def find_postgres() -> Path:
    """The bin directory holding initdb, pg_ctl and postgres: `$MAEPIPE_PG_BIN`, else Debian's
    newest `/usr/lib/postgresql/<version>/bin`, else the directory of `initdb` on PATH."""

    def complete(d: Path) -> bool:
        return all(os.access(d / tool, os.X_OK) for tool in PG_TOOLS)

    if os.environ.get("MAEPIPE_PG_BIN"):
        d = Path(os.environ["MAEPIPE_PG_BIN"])
        if complete(d):
            return d
        raise UserError(f"MAEPIPE_PG_BIN = {d} does not hold PostgreSQL's {', '.join(PG_TOOLS)}")

    def version(d: str) -> tuple:
        return tuple(int(n) for n in re.findall(r"\d+", Path(d).parent.name)) or (0,)

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if complete(Path(d)):
            return Path(d)
    initdb = shutil.which("initdb")
    if initdb and complete(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    raise UserError(f"PostgreSQL is not installed (no /usr/lib/postgresql/<version>/bin/initdb); {INSTALL_HINT}")


def check_driver() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise UserError(f"the PostgreSQL driver psycopg2 is not installed in {sys.prefix}; {DRIVER_HINT}") from None


def _system_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: None means ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise UserError(
            f"running as root, but there is no `{SYSTEM_USER}` system user to run PostgreSQL as "
            f"(PostgreSQL refuses root); {INSTALL_HINT}, which creates it"
        ) from None
    if not shutil.which("runuser"):
        raise UserError(
            "running as root, but `runuser` (util-linux) is missing: it is needed to run PostgreSQL "
            f"as `{SYSTEM_USER}`; install util-linux or run as a normal user"
        )
    return user


# --- ports --------------------------------------------------------------------------------------


def free_port(host: str = PG_HOST) -> int:
    """A TCP port free on `host` now (the kernel's pick; another process may take it before we do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int, flag: str) -> None:
    """UserError unless we could listen on host:port now (SO_REUSEADDR: a TIME_WAIT is no conflict)."""
    if not 0 < port < 65536:
        raise UserError(f"{flag} {port}: not a TCP port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1)
    except PermissionError:
        raise UserError(
            f"{flag} {port}: not allowed to listen on {host}:{port} "
            f"(ports below 1024 need root); pick another with {flag}"
        ) from None
    except OSError as e:
        if e.errno == 98:  # EADDRINUSE
            raise UserError(
                f"port {port} on {host} is already in use; stop what holds it or pick another port with {flag}"
            ) from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); check --host / {flag}") from None


# --- PostgreSQL ---------------------------------------------------------------------------------


class PostgreSQL:
    """One cluster in `<root>/pgdata`, run with the binaries of `bindir`."""

    def __init__(self, root: Path, port: int, bindir: Path | None = None):
        self.root = Path(root).resolve()
        self.port = port
        self.bindir = bindir or find_postgres()
        self.data = self.root / "pgdata"
        self.log = self.root / "postgresql.log"
        self.password_file = self.root / "pgpassword"
        self.socket_dir = self.root / "pgsocket"
        self.user = _system_user()
        self._tmp_socket_dir: str | None = None

    # Commands run as the postgres user when we are root, else as ourselves. Each runs in its own
    # session so that a Ctrl-C in the terminal reaches us only and we stop things in order.
    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user.pw_name, "--", *cmd]
        try:
            return subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd="/",
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise UserError(
                f"PostgreSQL: `{tool} {' '.join(args[:2])}` did not finish in {timeout:.0f} s; see {self.log}"
            ) from None

    def _own(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self.user:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    @property
    def password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            raise UserError(
                f"{self.password_file} is missing, so the cluster in {self.data} cannot be used; "
                f"remove {self.root} to start afresh (its runs and artifacts go with it)"
            ) from None

    def init(self) -> bool:
        """Create the cluster unless it exists. True when it was created now."""
        if (self.data / "PG_VERSION").is_file():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        if self.data.exists() and any(self.data.iterdir()):
            raise UserError(f"{self.data} exists but holds no PostgreSQL cluster; remove it or pick another --dir")
        self.data.mkdir(exist_ok=True)
        self._own(self.data, 0o700)
        if not self._reachable(self.data):
            raise UserError(
                f"PostgreSQL runs as the `{SYSTEM_USER}` user, which cannot reach {self.data} "
                f"(a parent directory is not searchable by others); pick a --dir under a "
                f"directory like /srv or /tmp, or run as a normal user"
            )
        password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        # initdb reads the superuser's password from a file; it must be readable by who runs it.
        pwfile = self.data.parent / f".pgpassword-{os.getpid()}"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        self._own(pwfile, 0o600)
        try:
            out = self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                ROLE,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-instructions",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if out.returncode != 0:
            detail = (out.stderr or out.stdout).strip().splitlines()
            shutil.rmtree(self.data, ignore_errors=True)
            raise UserError(f"PostgreSQL: initdb failed in {self.data}: {detail[-1] if detail else out.returncode}")
        return True

    def _reachable(self, path: Path) -> bool:
        if not self.user:
            return os.access(path, os.W_OK | os.X_OK)
        return (
            subprocess.run(
                ["runuser", "-u", self.user.pw_name, "--", "test", "-w", str(path), "-a", "-x", str(path)],
                capture_output=True,
            ).returncode
            == 0
        )

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").is_file():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data)).returncode == 0

    def start(self) -> None:
        sock = self.socket_dir
        if len(str(sock)) > SOCKET_PATH_MAX:  # too long for a unix socket path: a short one in /tmp
            self._tmp_socket_dir = tempfile.mkdtemp(prefix="maepipe-pg-")
            sock = Path(self._tmp_socket_dir)
        sock.mkdir(exist_ok=True)
        self._own(sock, 0o700)
        if not self.log.exists():
            self.log.touch()
        self._own(self.log, 0o640)
        options = " ".join(
            shlex.quote(o)
            for o in (
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={PG_HOST}",
                "-c",
                f"unix_socket_directories={sock}",
            )
        )
        out = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "90", "-o", options)
        if out.returncode != 0:
            raise UserError(f"PostgreSQL did not start on {PG_HOST}:{self.port}: {self._log_tail()} (log: {self.log})")

    def stop(self) -> None:
        try:
            if self.running():
                out = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
                if out.returncode != 0:
                    self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30")
        finally:
            if self._tmp_socket_dir:
                shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
                self._tmp_socket_dir = None

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1].strip() if lines else "empty log"

    def ensure_database(self, name: str = DB) -> bool:
        """Create database `name` unless it exists. True when it was created now."""
        import psycopg2

        try:
            conn = psycopg2.connect(
                host=PG_HOST, port=self.port, user=ROLE, password=self.password, dbname="postgres", connect_timeout=10
            )
        except psycopg2.OperationalError as e:
            first = str(e).strip().splitlines()
            raise UserError(
                f"PostgreSQL on {PG_HOST}:{self.port} refused us ({first[-1] if first else e}); log: {self.log}"
            ) from None
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone():
                    return False
                cur.execute(f'CREATE DATABASE "{name}"')
                return True
        finally:
            conn.close()

    @property
    def backend_uri(self) -> str:
        """For `mlflow server --backend-store-uri`. The password goes in PGPASSWORD, not here,
        so that it shows neither in `ps` nor in MLflow's logs."""
        return f"postgresql+psycopg2://{ROLE}@{PG_HOST}:{self.port}/{DB}"


# --- the MLflow server --------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    uri: str  # what clients use as MLFLOW_TRACKING_URI
    host: str
    port: int
    pg_port: int
    root: Path
    artifacts: Path
    backend_uri: str
    process: subprocess.Popen


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def mlflow_command(backend_uri: str, artifacts: Path, host: str, port: int, workers: int) -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"  # this environment's mlflow
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]
    return [
        *base,
        "server",
        "--backend-store-uri",
        backend_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def wait_healthy(uri: str, process: subprocess.Popen, timeout: float, log: Path | None) -> None:
    see = f" (log: {log})" if log else ""
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise UserError(f"mlflow server exited with code {code} before it was ready{see}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UserError(f"mlflow server did not answer {uri}/health within {timeout:.0f} s{see}")
        time.sleep(0.5)


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let teardown finish: a second Ctrl-C must not leave PostgreSQL running.

    Ignoring the signals, not pipeline/signals.py's `held()`: held() only defers what its own
    handler receives, so it works once `cli.guarded` has installed that handler (`main`), but
    `running()` is also used without it (tests/test_tracking_server.py, any other caller), where
    under Python's default handlers a Ctrl-C would still raise mid-teardown and a SIGTERM kill us
    outright, leaving PostgreSQL running. SIG_IGN is right in both cases. Under `main` the only
    difference is that a signal during teardown is dropped instead of raised afterwards; we are
    stopping anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def running(
    root: Path | str,
    host: str = "127.0.0.1",
    port: int | None = None,
    pg_port: int | None = None,
    workers: int = 2,
    log: Path | IO | None = None,
    timeout: float = 180,
    on_note=None,
) -> Iterator[Server]:
    """PostgreSQL + `mlflow server` for the duration of the block; both stopped afterwards, even
    on errors. Free ports when `port` / `pg_port` are None. `log`: a path (or open file) for the
    server's output; None lets it through to ours. `on_note(str)`: told about notable steps."""
    note = on_note or (lambda _msg: None)
    root = Path(root).resolve()
    bindir = find_postgres()
    check_driver()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port(host) if port is None else port
    pg_port = free_port(PG_HOST) if pg_port is None else pg_port
    pg = PostgreSQL(root, pg_port, bindir)
    if pg.running():  # left behind by a killed server: restart it on the port asked for now
        note(f"PostgreSQL in {pg.data} was still running; restarting it")
        pg.stop()
    if port == pg_port:
        raise UserError(f"--port and --pg-port are both {port}; pick two different ports")
    check_port(host, port, "--port")
    check_port(PG_HOST, pg_port, "--pg-port")
    if pg.init():
        note(f"created a PostgreSQL cluster in {pg.data}")
    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    process = None
    log_file = None
    try:
        pg.start()
        if pg.ensure_database():
            note(f"created database {DB!r}")
        if isinstance(log, (str, Path)):
            log_file = open(log, "ab")
        out = log_file or log
        env = dict(os.environ, PGPASSWORD=pg.password)
        env.pop("MLFLOW_TRACKING_URI", None)
        # MLflow's job runner (GenAI scoring, trace archival: 8 more processes importing mlflow)
        # is nothing this pipeline uses; set the variable to true to have it anyway.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        process = subprocess.Popen(
            mlflow_command(pg.backend_uri, artifacts, host, port, workers),
            env=env,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        uri = f"http://{client_host(host)}:{port}"
        wait_healthy(uri, process, timeout, Path(log) if isinstance(log, (str, Path)) else None)
        yield Server(
            uri=uri,
            host=host,
            port=port,
            pg_port=pg_port,
            root=root,
            artifacts=artifacts,
            backend_uri=pg.backend_uri,
            process=process,
        )
    finally:
        with _no_interrupts():
            try:
                if process is not None:
                    stop_process(process)
            finally:
                pg.stop()
                if log_file:
                    log_file.close()


# --- the command --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m tools.tracking_server",
        description="An MLflow tracking server on PostgreSQL, serving artifacts itself.",
    )
    parser.add_argument(
        "--dir",
        default=".mlflow-server",
        type=Path,
        help="where the PostgreSQL cluster, its log and the artifacts live (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface the MLflow server binds to (default: %(default)s; 0.0.0.0 for all; "
        "PostgreSQL always listens on 127.0.0.1 only)",
    )
    parser.add_argument("--port", type=int, default=5001, help="MLflow server port (default: %(default)s)")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="MLflow server worker processes (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"argument --workers: {args.workers} is not a positive number")

    def serve() -> int:
        with running(
            args.dir,
            host=args.host,
            port=args.port,
            pg_port=args.pg_port,
            workers=args.workers,
            timeout=300,
            on_note=lambda msg: print(f"maepipe: {msg}", file=sys.stderr),
        ) as server:
            print(
                f"maepipe: MLflow server ready (PostgreSQL on {PG_HOST}:{server.pg_port}, data in {server.root}); "
                f"to log there: export MLFLOW_TRACKING_URI={server.uri}   (Ctrl-C stops it)",
                flush=True,
            )
            code = server.process.wait()
        if code != 0:
            raise UserError(f"mlflow server exited with code {code}")
        return 0

    # Ctrl-C / SIGTERM: stop the server and PostgreSQL (running()'s teardown), say so, exit 0.
    return cli.guarded(serve, on_stop="stopped the MLflow server and PostgreSQL")


if __name__ == "__main__":
    sys.exit(main())
