"""Fixtures for Urza tests: a real PostgreSQL server started on a free loopback port."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a throwaway PostgreSQL cluster (trust auth, loopback only) for this test session.

    PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` system user
    (created by the Debian package). Skips with the reason when the binaries or that user are missing.
    """
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (initdb not found); `make build` installs it via APT_PACKAGES")
    as_user: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="esper-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            shutil.rmtree(workdir, ignore_errors=True)
            pytest.skip("running as root and `runuser` is missing: cannot start PostgreSQL as a non-root user")
        try:
            import pwd

            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(workdir, ignore_errors=True)
            pytest.skip("running as root and there is no `postgres` system user to run PostgreSQL as")
        os.chown(workdir, pg_user.pw_uid, pg_user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    datadir = workdir / "data"
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, env=env, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "esper", "--no-sync", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(workdir / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "esper", "urza")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (workdir / "server.log").read_text() if (workdir / "server.log").exists() else ""
        shutil.rmtree(workdir, ignore_errors=True)
        stderr = getattr(exc, "stderr", "")
        pytest.skip(f"could not start PostgreSQL: {exc}; stderr: {stderr}; log: {log[-500:]}")
    try:
        yield f"postgresql://esper@127.0.0.1:{port}/urza"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast", "-w", "stop"],
                       capture_output=True, env=env, timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)
