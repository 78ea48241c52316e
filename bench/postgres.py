"""A throwaway PostgreSQL cluster on 127.0.0.1 for the benchmark's scale step.

Uses the server binaries on this machine (PATH, then Debian's /usr/lib/postgresql/*/bin);
when there are none and the script runs as root, installs Debian's ``postgresql`` package
first. PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres``
user. Trust authentication on loopback only; the data directory is deleted on stop.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from localstack import free_port


def _bin_dir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        # Debian links pg_ctl alone onto PATH; initdb and createdb sit beside its target.
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if candidates:
        return Path(candidates[-1]).parent
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing PostgreSQL from Debian's packages...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
            check=True,
            env=env,
        )
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if candidates:
            return Path(candidates[-1]).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: install the postgresql package (Debian) "
        "or put pg_ctl on PATH"
    )


class Postgres:
    """``with Postgres() as pg: pg.database("name")`` gives a SQLAlchemy URI of a new database."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.port = free_port()
        self.datadir = Path(tempfile.mkdtemp(prefix="kafka-mlflow-sink-pg-"))
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"PostgreSQL's {args[0]} failed: {said or done.returncode}")

    def start(self) -> None:
        if self._as_root:
            shutil.chown(self.datadir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.datadir / "data"), "-U", "postgres", "--auth=trust")
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl", "-D", str(self.datadir / "data"), "-o", options,
            "-l", str(self.datadir / "server.log"), "-w", "start",
        )  # fmt: skip

    def database(self, name: str) -> str:
        """Create database ``name`` and return its URI for MLflow."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        # The driver is named: SQLAlchemy 2.1 would otherwise look for psycopg 3.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.datadir / "data"), "-m", "fast", "-w", "stop")
        finally:
            time.sleep(0.2)
            shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
