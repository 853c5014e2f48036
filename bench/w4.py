"""W4: backups. A base backup and a restore of a pgbench database with pgwarden, side by side
with plain `pg_basebackup` to the same disk and a plain restore (copy + WAL replay from the same
archive), and an incremental backup after 1 % of the rows changed (PostgreSQL 17+)."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.w2 import _pgbench
from pgwarden.backup.create import create_backup, local_source
from pgwarden.backup.repo import Repository
from pgwarden.backup.restore import RecoveryTarget, plan_restore, run_restore
from pgwarden.config import Config
from pgwarden.server.cluster import LocalServer, free_port
from pgwarden.server.local import bring_up
from pgwarden.server.osuser import clean_env

Log = Callable[[str], None]


@dataclass
class W4Result:
    scale: int
    size_bytes: int = 0
    seconds: dict[str, list[float]] = field(
        default_factory=lambda: {
            k: []
            for k in (
                "plain-backup",
                "pgwarden-backup",
                "plain-restore",
                "pgwarden-restore",
                "pgwarden-incremental",
                "plain-incremental",
            )
        }
    )

    def median(self, kind: str) -> float | None:
        values = self.seconds[kind]
        return statistics.median(values) if values else None

    def ratio(self, plain: str, ours: str) -> float:
        """Throughput of ours / throughput of plain, on the same bytes: total times, over an
        even number of rounds in which each went first half the time (on this disk the second
        of two 1 GB restores in a row is the slow one, whichever it is)."""
        return sum(self.seconds[plain]) / sum(self.seconds[ours])

    def incremental_ratio(self) -> float | None:
        inc, full = self.seconds["pgwarden-incremental"], self.seconds["pgwarden-backup"]
        return sum(inc) / sum(full) if inc and full else None

    def to_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "size_bytes": self.size_bytes,
            "seconds": self.seconds,
            "backup_throughput_ratio": self.ratio("plain-backup", "pgwarden-backup"),
            "restore_throughput_ratio": self.ratio("plain-restore", "pgwarden-restore"),
            "incremental_over_full": self.incremental_ratio(),
            "plain_incremental_over_full": (
                sum(self.seconds["plain-incremental"]) / sum(self.seconds["plain-backup"])
                if self.seconds["plain-incremental"]
                else None
            ),
        }


@contextlib.contextmanager
def _server(pg_bin: Path | None, base: Path) -> Iterator[LocalServer]:
    config = Config.model_validate(
        {
            "server": {"settings": {"max_wal_size": "4GB"}},
            "backup": {"location": str(base / "backups"), "archive_timeout": 0},
        }
    )
    server = LocalServer(config, base / ".pgwarden", pg_bin=pg_bin, port=free_port(),
                         backup_root=base / "backups")  # fmt: skip
    bring_up(server)
    try:
        yield server
    finally:
        server.purge()


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _plain_backup(server: LocalServer, target: Path, *extra: str | Path) -> None:
    env = clean_env()
    env["PGPASSWORD"] = server.state.password() or ""
    done = server.runas.run(
        [
            server.tool("pg_basebackup"),
            "-D",
            target,
            "-X",
            "stream",
            "-c",
            "fast",
            "-d",
            f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres",
            *extra,
        ],
        env=env,
        timeout=None,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)


def _plain_restore(server: LocalServer, backup: Path, target: Path, wal: Path) -> None:
    """What one would do by hand: copy, recovery.signal, a restore_command, start, wait for the
    end of recovery, stop."""
    shutil.copytree(backup, target, symlinks=True)
    port = free_port()
    with (target / "postgresql.auto.conf").open("a") as conf:
        conf.write(
            f"port = {port}\nunix_socket_directories = ''\narchive_mode = off\n"
            f"restore_command = 'cp {wal}/%f %p'\nrecovery_target_action = 'promote'\n"
        )
    (target / "recovery.signal").write_text("")
    server.runas.chown_tree(target)
    log = target / "restore.log"
    pg_ctl = server.tool("pg_ctl")
    server.runas.run([pg_ctl, "start", "-D", target, "-l", log, "-w", "-t", "600"], timeout=700)
    url = f"postgresql://postgres:{server.state.password()}@127.0.0.1:{port}/postgres"
    while not _promoted(url):
        time.sleep(0.1)
    server.runas.run([pg_ctl, "stop", "-D", target, "-m", "fast", "-w"], timeout=300)


def _settle(url: str) -> None:
    """Let the loading's WAL be archived and its dirty pages written before anything is timed:
    otherwise the first round measures the archiver copying a gigabyte beside it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        conn.execute("SELECT pg_catalog.txid_current()")
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None
        while True:
            done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
            if done is not None and done[0] is not None and str(done[0]) >= str(row[0]):
                break
            time.sleep(0.2)
    os.sync()


def _promoted(url: str) -> bool:
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            return row is not None and not row[0]
    except psycopg.OperationalError:
        return False


def run_w4(pg_bin: Path | None, scale: int, reps: int, log: Log) -> W4Result:
    base = Path(tempfile.mkdtemp(prefix="pgwarden-bench-w4-"))
    os.chmod(base, 0o755)  # our own temp dir: the server user must reach it
    result = W4Result(scale=scale)
    try:
        with _server(pg_bin, base) as server:
            url = server.url("postgres")
            log(f"  W4 pgbench -i -s {scale}")
            _pgbench(server.binaries.bindir, url, "-i", "-q", "-s", str(scale))
            with psycopg.connect(url, autocommit=True) as conn:
                size = conn.execute("SELECT pg_database_size('postgres')").fetchone()
                assert size is not None
                result.size_bytes = int(size[0])
            _settle(url)
            repo = Repository.at(base / "backups")
            work = base / "work"  # written by pg_basebackup, as the server's user
            work.mkdir()
            server.runas.chown(work)
            for rep in range(reps):
                _rep(server, repo, work, rep, reps, result, log)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _rep(
    server: LocalServer, repo: Repository, work: Path, rep: int, reps: int, result: W4Result,
    log: Log,
) -> None:  # fmt: skip
    plain, restored, ours = work / "plain", work / "plain-restored", work / "restored"
    latest = RecoveryTarget("latest")
    assert repo.root is not None and repo.wal_dir is not None  # W4 measures a directory location
    wal_dir = repo.wal_dir

    def our_restore() -> None:
        plan = plan_restore(repo.observe(), repo, latest, ours, live_data_dir=server.state.data_dir)
        run_restore(server, plan, start=False)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("plain-backup", lambda: _plain_backup(server, plain)),
        ("pgwarden-backup", lambda: create_backup(local_source(server))),
        ("plain-restore", lambda: _plain_restore(server, plain, restored, wal_dir)),
        ("pgwarden-restore", our_restore),
    ]
    if rep % 2:  # alternate who goes first
        steps = [steps[1], steps[0], steps[3], steps[2]]
    for kind, action in steps:
        os.sync()  # the last step's dirty pages are not this step's cost
        seconds = _timed(action)
        result.seconds[kind].append(seconds)
        log(f"  W4 rep {rep + 1}/{reps} {kind:22s} {seconds:.2f} s")
    if server.binaries.major >= 17:
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            # 1 % of the rows, in one range (a day's orders, a batch): block-level incremental
            # backups copy the blocks that changed, so 1 % spread over every page would not be
            # 1 % of the blocks (docs/benchmarks.md).
            conn.execute(
                "UPDATE pgbench_accounts SET abalance = abalance + 1 "
                "WHERE aid <= (SELECT count(*) / 100 FROM pgbench_accounts)"
            )
            conn.execute("CHECKPOINT")
        # Ours and PostgreSQL's own (plain pg_basebackup --incremental on the plain full
        # backup), in alternating order: the first one also waits for the WAL summarizer.
        plain_inc = work / "plain-incremental"
        manifest = plain / "backup_manifest"
        pair: list[tuple[str, Callable[[], object]]] = [
            ("pgwarden-incremental", lambda: create_backup(local_source(server), incremental=True)),
            ("plain-incremental",
             lambda: _plain_backup(server, plain_inc, "--incremental", manifest)),
        ]  # fmt: skip
        for kind, action in pair if rep % 2 == 0 else pair[::-1]:
            os.sync()
            seconds = _timed(action)
            result.seconds[kind].append(seconds)
            log(f"  W4 rep {rep + 1}/{reps} {kind:22s} {seconds:.2f} s")
        shutil.rmtree(plain_inc, ignore_errors=True)
    for path in (plain, restored, ours, *(repo.root / "backups").iterdir()):
        shutil.rmtree(path, ignore_errors=True)
