"""Backups on a real server: WAL archiving, base backups, restores to a time, to just before a
transaction and to the end of the archive, verification, retention, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml

from pgwarden.backup.create import still_writing
from pgwarden.backup.prune import plan_prune
from pgwarden.backup.repo import BackupInfo, Repository, Writing
from pgwarden.backup.store import DirStore
from pgwarden.config import parse_config_file
from pgwarden.server.cluster import LocalServer, free_port
from pgwarden.server.local import local_server
from pgwarden.server.osuser import clean_env
from tests.conftest import Run

YAML = """\
database: app
server:
  port: {port}
history:
  tables: ['public.*']
backup:
  location: {location}
  keep: 1
  archive_timeout: 1
"""


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory the user PostgreSQL runs as can enter (as root that is not the caller):
    the backup location and restore targets live here."""
    path = Path(tempfile.mkdtemp(prefix="pgwarden-backup-test-"))
    os.chmod(path, 0o711)  # noqa: S103 - entering, not listing
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def site(tmp_path: Path, reachable: Path, run: Run) -> Iterator[tuple[LocalServer, Path]]:
    """A managed server with backup.location set, up; stopped and purged afterwards, with any
    restored copy left running by a test."""
    config = tmp_path / "pgwarden.yaml"
    config.write_text(YAML.format(port=free_port(), location=reachable / "backups"))
    server = local_server(parse_config_file(config), config, None)
    up = run("up")
    assert up.code == 0, up.err
    yield server, reachable
    for data in reachable.glob("restored-*"):
        if (data / "postmaster.pid").exists():
            server.runas.run([server.tool("pg_ctl"), "stop", "-D", data, "-m", "immediate"])
    server.purge()


def _sql(server: LocalServer, query: str, database: str = "app") -> list[tuple[object, ...]]:
    with psycopg.connect(server.url(database), autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def _archived_up_to_now(server: LocalServer) -> None:
    """Switch to a new segment and wait until the archiver has the one just finished."""
    # A commit first: with no WAL since the last switch, pg_switch_wal() does nothing.
    _sql(server, "SELECT pg_catalog.txid_current()", "postgres")
    row = _sql(server, "SELECT pg_walfile_name(pg_switch_wal())", "postgres")
    wanted = str(row[0][0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        last = _sql(server, "SELECT last_archived_wal FROM pg_stat_archiver", "postgres")[0][0]
        if last is not None and str(last) >= wanted:
            return
        time.sleep(0.2)
    log = [line for line in server.log_tail(3000).splitlines() if "connection " not in line]
    raise AssertionError(
        f"{wanted} was not archived within 60 s; the server log:\n" + "\n".join(log[-30:])
    )


def _archiver_failing(run: Run) -> dict[str, object]:
    """`status`'s archiver once it reports a failure (or after 30 s, as it then stands)."""
    deadline = time.monotonic() + 30
    while True:
        archiver: dict[str, object] = json.loads(run("status", "-o", "json").out)["archiver"]
        if archiver["failing"] or time.monotonic() > deadline:
            return archiver
        time.sleep(0.3)


def _restored(url: str, query: str) -> list[tuple[object, ...]]:
    url = url.rsplit("/", 1)[0] + "/app"  # restore prints the URL of its `postgres` database
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def _dumpall(server: LocalServer, port: int) -> str:
    """Everything in the cluster at `port`, as SQL: the strongest check that a restore is the
    source as it was."""
    env = clean_env()
    env["PGPASSWORD"] = server.state.password() or ""
    done = server.runas.run(
        [server.tool("pg_dumpall"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"], env=env
    )
    assert done.returncode == 0, done.stderr
    # pg_dumpall 18 guards its output with a random \restrict key per run. Sequences are
    # WAL-logged 32 values ahead, so after any recovery they may be ahead, never behind: their
    # setval lines are left out (the rows that used them are compared).
    skip = ("\\restrict", "\\unrestrict", "SELECT pg_catalog.setval(")
    return "\n".join(line for line in done.stdout.splitlines() if not line.startswith(skip))


def _stop(server: LocalServer, data: Path) -> None:
    server.runas.run([server.tool("pg_ctl"), "stop", "-D", data, "-m", "fast", "-w"])


def test_restore_to_a_time_before_a_transaction_and_to_the_end(
    site: tuple[LocalServer, Path], run: Run
) -> None:
    server, root = site
    _sql(server, "CREATE TABLE acct (id int PRIMARY KEY, bal numeric)")
    _sql(
        server, "INSERT INTO acct SELECT g, g * 1.000000000000000001 FROM generate_series(1, 100) g"
    )
    created = run("backup", "create")
    assert created.code == 0, created.err
    label = created.out.strip()
    assert (root / "backups" / "backups" / label / "data" / "backup_manifest").is_file()

    _sql(server, "UPDATE acct SET bal = bal + 0.5 WHERE id <= 10")
    dump_then = _dumpall(server, server.port)
    time.sleep(1.1)
    good_time = _sql(server, "SELECT now()")[0][0]
    good_lsn = _sql(server, "SELECT pg_current_wal_insert_lsn()::text", "postgres")[0][0]
    time.sleep(1.1)
    _sql(server, "DELETE FROM acct WHERE id > 50")  # the mistake
    events = json.loads(run("history", "acct", "--op", "delete", "-o", "json").out)
    bad_tx = events[0]["tx"]
    _archived_up_to_now(server)

    listed = json.loads(run("backup", "list", "-o", "json").out)
    assert [b["label"] for b in listed["backups"]] == [label]
    # The size recorded from the manifest is the bytes on disk, every file counted once.
    on_disk = sum(
        p.stat().st_size
        for p in (root / "backups" / "backups" / label / "data").rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    assert listed["backups"][0]["size_bytes"] == on_disk
    assert listed["archiver"]["active"] is True
    assert listed["archiver"]["failing"] is False
    assert listed["window"]["earliest"] <= listed["window"]["latest"]
    assert listed["missing_segment"] is None

    expected_good = "SELECT count(*), sum(bal)::text FROM acct"
    before = _restored(server.url(), expected_good)  # 50 rows now

    at_time = run("backup", "restore", "--to-time", good_time.isoformat(),
                  "--target-dir", str(root / "restored-time"), "--start")  # fmt: skip
    assert at_time.code == 0, at_time.err
    assert "restore plan" in at_time.err
    rows = _restored(at_time.out.strip(), expected_good)
    assert rows[0][0] == 100
    assert _dumpall(server, int(at_time.out.strip().rsplit(":", 1)[1].split("/")[0])) == dump_then
    assert rows[0][1] == "5055.000000000000005050"  # exact: 5050·(1+1e-18) + 10·0.5
    _stop(server, root / "restored-time")

    before_tx = run("backup", "restore", "--before-tx", str(bad_tx),
                    "--target-dir", str(root / "restored-tx"), "--start")  # fmt: skip
    assert before_tx.code == 0, before_tx.err
    assert "recovery stopping before commit" in before_tx.err
    assert _restored(before_tx.out.strip(), expected_good) == rows
    _stop(server, root / "restored-tx")

    at_lsn = run("backup", "restore", "--to-lsn", str(good_lsn),
                 "--target-dir", str(root / "restored-lsn"), "--start")  # fmt: skip
    assert at_lsn.code == 0, at_lsn.err
    assert _restored(at_lsn.out.strip(), expected_good) == rows
    _stop(server, root / "restored-lsn")

    latest = run("backup", "restore", "--to-latest", "--target-dir", str(root / "restored-latest"))
    assert latest.code == 0, latest.err
    assert "stopped" in latest.err
    assert not (root / "restored-latest" / "postmaster.pid").exists()
    started = server.runas.run(
        [
            server.tool("pg_ctl"),
            "start",
            "-D",
            root / "restored-latest",
            "-w",
            "-l",
            root / "restored-latest" / "pgwarden-restore.log",
        ]
    )
    assert started.returncode == 0, started.stderr
    port = _port_of(root / "restored-latest")
    url = server.url().rsplit(":", 1)[0] + f":{port}/app"
    assert _restored(url, expected_good) == before
    assert _restored(url, "SELECT pg_is_in_recovery()") == [(False,)]

    # The live server was never touched.
    assert _restored(server.url(), expected_good) == before


def _port_of(data: Path) -> int:
    for line in (data / "pgwarden.conf").read_text().splitlines():
        if line.startswith("port = "):
            return int(line.split("=")[1])
    raise AssertionError("no port in pgwarden.conf")


def test_restore_refuses_what_would_overwrite_or_cannot_work(
    site: tuple[LocalServer, Path], run: Run
) -> None:
    server, root = site
    nothing = run("backup", "restore", "--to-latest", "--target-dir", str(root / "restored-x"))
    assert nothing.code == 2
    assert "no backups" in nothing.err
    assert run("backup", "create").code == 0
    busy = root / "restored-busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("mine")
    refused = run("backup", "restore", "--to-latest", "--target-dir", str(busy))
    assert refused.code == 2
    assert "not empty" in refused.err
    assert (busy / "precious.txt").read_text() == "mine"
    inside = run("backup", "restore", "--to-latest",
                 "--target-dir", str(server.state.data_dir / "sub"))  # fmt: skip
    assert inside.code == 2
    assert "data directory of the managed server" in inside.err
    early = run("backup", "restore", "--to-time", "2000-01-01T00:00:00+00:00",
                "--target-dir", str(root / "restored-early"))  # fmt: skip
    assert early.code == 2
    assert "before the earliest" in early.err
    both = run("backup", "restore", "--to-latest", "--to-lsn", "0/1",
               "--target-dir", str(root / "restored-y"))  # fmt: skip
    assert both.code == 2
    unknown_tx = run("backup", "restore", "--before-tx", "999999999",
                     "--target-dir", str(root / "restored-z"))  # fmt: skip
    assert unknown_tx.code == 2
    assert "not in history" in unknown_tx.err


def test_verify_names_the_first_missing_segment_and_prune_keeps_what_is_needed(
    site: tuple[LocalServer, Path], run: Run
) -> None:
    server, root = site
    wal = root / "backups" / "wal"
    assert run("backup", "create").code == 0
    _sql(server, "CREATE TABLE t (id int)")
    for _ in range(3):
        _sql(server, "INSERT INTO t SELECT generate_series(1, 1000)")
        _archived_up_to_now(server)
    ok = run("backup", "verify")
    assert ok.code == 0, ok.out
    assert "WAL chain: complete" in ok.out
    segments = sorted(p.name for p in wal.iterdir() if len(p.name) == 24)
    victim = segments[len(segments) // 2]
    shutil.move(wal / victim, root / victim)
    broken = run("backup", "verify", "-o", "json")
    assert broken.code == 1
    assert json.loads(broken.out)["missing_segment"] == victim
    past = run("backup", "restore", "--to-latest", "--target-dir", str(root / "restored-gap"))
    assert past.code == 2
    assert victim in past.err
    assert not (root / "restored-gap").exists()  # refused before anything was copied
    shutil.move(root / victim, wal / victim)
    assert run("backup", "verify").code == 0

    second = run("backup", "create").out.strip()
    first = json.loads(run("backup", "list", "-o", "json").out)["backups"][0]["label"]
    dry = run("backup", "prune", "--dry-run")
    assert dry.code == 0
    assert f"would remove backup {first}" in dry.out
    assert (root / "backups" / "backups" / first).is_dir()  # a dry run removes nothing
    pruned = run("backup", "prune")
    assert pruned.code == 0
    assert not (root / "backups" / "backups" / first).exists()
    assert (root / "backups" / "backups" / second).is_dir()
    assert not (wal / segments[0]).exists()  # before the kept backup: no longer needed
    assert run("backup", "verify").code == 0  # what is left is complete


def test_archiving_never_overwrites_and_its_failure_shows(
    site: tuple[LocalServer, Path], run: Run
) -> None:
    server, root = site
    wal = root / "backups" / "wal"
    current = str(_sql(server, "SELECT pg_walfile_name(pg_current_wal_lsn())", "postgres")[0][0])
    foreign = wal / current
    foreign.write_bytes(b"not this cluster's WAL")
    server.runas.chown(foreign)
    _sql(server, "SELECT pg_switch_wal()", "postgres")
    archiver = _archiver_failing(run)
    assert archiver["failing"] is True
    assert archiver["last_failed_wal"] == current
    assert foreign.read_bytes() == b"not this cluster's WAL"  # never overwritten
    assert "archiving FAILS" in run("status").out
    foreign.unlink()  # the operator removes the stray file: archiving resumes
    _archived_up_to_now(server)
    assert json.loads(run("status", "-o", "json").out)["archiver"]["failing"] is False


def test_another_cluster_cannot_share_a_location(
    site: tuple[LocalServer, Path], run: Run, tmp_path: Path
) -> None:
    _, root = site
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    config = other_dir / "pgwarden.yaml"
    config.write_text(YAML.format(port=free_port(), location=root / "backups"))
    other = local_server(parse_config_file(config), config, None)
    try:
        refused = run("--config", str(config), "up")
        assert refused.code == 2
        assert "archive of another cluster" in refused.err
    finally:
        other.purge()


def test_incremental_backups(site: tuple[LocalServer, Path], run: Run, pg_major: int) -> None:
    server, root = site
    if pg_major < 17:
        refused = run("backup", "create", "--incremental")
        assert refused.code == 2
        assert "PostgreSQL 17" in refused.err
        return
    assert run("backup", "create", "--incremental").code == 2  # nothing to build on yet
    assert run("backup", "create").code == 0
    _sql(server, "CREATE TABLE inc (id int PRIMARY KEY, v text)")
    _sql(server, "INSERT INTO inc SELECT g, 'v' || g FROM generate_series(1, 500) g")
    child = run("backup", "create", "--incremental")
    assert child.code == 0, child.err
    backups = json.loads(run("backup", "list", "-o", "json").out)["backups"]
    assert [b["kind"] for b in backups] == ["full", "incremental"]
    assert backups[1]["parent"] == backups[0]["label"]
    _sql(server, "UPDATE inc SET v = 'after' WHERE id <= 5")
    _archived_up_to_now(server)
    restored = run("backup", "restore", "--to-latest",
                   "--target-dir", str(root / "restored-inc"), "--start")  # fmt: skip
    assert restored.code == 0, restored.err
    assert "pg_combinebackup" in restored.err
    url = restored.out.strip()
    assert _restored(url, "SELECT count(*), count(*) FILTER (WHERE v = 'after') FROM inc") == [
        (500, 5)
    ]
    _stop(server, root / "restored-inc")
    # prune never orphans an incremental from its full backup
    plan = run("backup", "prune", "--dry-run")
    assert "would remove backup" not in plan.out
    assert "keeping 2 backup(s)" in plan.out


def test_an_s3_location_is_the_s3_section_and_other_stores_are_refused() -> None:
    from pgwarden.config import parse_config_text
    from pgwarden.errors import ConfigError

    config = parse_config_text(
        "backup:\n  location: s3://my-bucket/pg/main/\n", source="pgwarden.yaml"
    )
    assert config.backup.location is None
    assert config.backup.s3 is not None
    assert (config.backup.s3.bucket, config.backup.s3.prefix) == ("my-bucket", "pg/main")
    with pytest.raises(ConfigError) as info:
        parse_config_text("backup:\n  location: gs://bucket/prefix\n", source="pgwarden.yaml")
    assert "backup.location" in info.value.message
    with pytest.raises(ConfigError) as info:
        parse_config_text(
            "backup:\n  location: s3://a-bucket/x\n  s3: {bucket: b-bucket}\n",
            source="pgwarden.yaml",
        )
    assert "different places" in info.value.message


def test_replace_puts_the_restored_data_in_place_and_keeps_the_old(
    site: tuple[LocalServer, Path], run: Run
) -> None:
    server, root = site
    _sql(server, "CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
    _sql(server, "INSERT INTO orders SELECT g, g FROM generate_series(1, 20) g")
    assert run("backup", "create").code == 0
    _sql(server, "DELETE FROM orders WHERE id <= 15")  # the mistake
    bad_tx = json.loads(run("history", "orders", "--op", "delete", "-o", "json").out)[0]["tx"]
    _archived_up_to_now(server)

    unconfirmed = run("backup", "restore", "--before-tx", str(bad_tx), "--replace")
    assert unconfirmed.code == 2
    assert "--yes" in unconfirmed.err
    assert _sql(server, "SELECT count(*) FROM orders") == [(5,)]  # nothing was done

    replaced = run("backup", "restore", "--before-tx", str(bad_tx), "--replace", "--yes")
    assert replaced.code == 0, replaced.err
    assert "kept in" in replaced.err
    assert _sql(server, "SELECT count(*) FROM orders") == [(20,)]
    asides = list(server.state.cluster.glob("data.before-restore-*"))
    assert len(asides) == 1
    assert (asides[0] / "PG_VERSION").is_file()  # the old data, kept
    # The server goes on: archiving on the new timeline, history recording.
    _sql(server, "UPDATE orders SET total = total + 1 WHERE id = 1")
    _archived_up_to_now(server)
    assert any(p.name.endswith(".history") for p in (root / "backups" / "wal").iterdir())
    status = json.loads(run("status", "-o", "json").out)
    assert status["state"] == "running"
    assert status["archiver"]["failing"] is False
    events = json.loads(run("history", "orders", "--op", "update", "-o", "json").out)
    assert len(events) == 1

    # A second restore, from the backup taken on timeline 1, follows the archived .history
    # file onto the promoted timeline and reaches the change made there.
    again = run("backup", "restore", "--to-latest", "--target-dir", str(root / "restored-tl2"),
                "--start")  # fmt: skip
    assert again.code == 0, again.err
    rows = _restored(again.out.strip(), "SELECT count(*), sum(total)::int FROM orders")
    assert rows == [(20, 211)]
    timeline = _restored(again.out.strip(), "SELECT timeline_id FROM pg_control_checkpoint()")
    assert timeline[0][0] >= 3  # 1, then the replace's 2, then this restore's own promotion
    _stop(server, root / "restored-tl2")


def test_a_crash_while_archiving_loses_no_committed_change(
    site: tuple[LocalServer, Path], run: Run
) -> None:
    """kill -9 of the server mid-load: crash recovery keeps every committed row, archiving
    resumes without a gap, and a restore to the end of the archive has them all."""
    server, root = site
    _sql(server, "CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    assert run("backup", "create").code == 0
    committed: list[int] = []
    next_id = 1
    for crash in range(3):
        pid = server.status().pid
        assert pid is not None
        kill_at = next_id + 300
        with psycopg.connect(server.url(), autocommit=True) as conn:
            while True:
                try:
                    conn.execute("INSERT INTO ledger VALUES (%s, repeat('x', 2000))", (next_id,))
                except psycopg.OperationalError:
                    break  # the server is gone: this one was not acknowledged
                committed.append(next_id)
                next_id += 1
                if next_id == kill_at:
                    os.kill(pid, signal.SIGKILL)
        next_id += 1  # the unacknowledged one may or may not be there: never reused
        assert run("status").code == 3, crash
        up = run("up")
        assert up.code == 0, up.err
        live = _sql(server, "SELECT array_agg(id ORDER BY id) FROM ledger")[0][0]
        assert isinstance(live, list)
        assert set(committed) <= set(live), crash  # every acknowledged commit survived
        assert len(live) - len(committed) <= crash + 1  # at most the in-flight ones besides
        committed = sorted(live)  # what the next round starts from
    _archived_up_to_now(server)
    verified = run("backup", "verify")
    assert verified.code == 0, verified.out
    restored = run("backup", "restore", "--to-latest",
                   "--target-dir", str(root / "restored-crash"), "--start")  # fmt: skip
    assert restored.code == 0, restored.err
    assert _restored(restored.out.strip(), "SELECT array_agg(id ORDER BY id) FROM ledger") == [
        (committed,)
    ]
    # History recorded each committed row too, crash or not.
    with psycopg.connect(server.url()) as conn:
        count = conn.execute("SELECT count(*) FROM pgwarden.event WHERE table_name = 'ledger'")
        assert count.fetchone() == (len(committed),)


def test_an_unwritable_archive_shows_and_resumes_without_a_gap(
    site: tuple[LocalServer, Path], run: Run
) -> None:
    server, root = site
    wal = root / "backups" / "wal"
    assert run("backup", "create").code == 0
    os.chmod(wal, 0o500)  # the share went read-only
    try:
        _sql(server, "CREATE TABLE w (id int)")
        _sql(server, "INSERT INTO w SELECT generate_series(1, 1000)")  # writes go on
        _sql(server, "SELECT pg_switch_wal()", "postgres")
        assert _archiver_failing(run)["failing"] is True
        assert "archiving FAILS" in run("backup", "list").err
    finally:
        os.chmod(wal, 0o700)
    _sql(server, "INSERT INTO w SELECT generate_series(1, 10)")
    _archived_up_to_now(server)
    assert json.loads(run("status", "-o", "json").out)["archiver"]["failing"] is False
    assert run("backup", "verify").code == 0
    assert _sql(server, "SELECT count(*) FROM w") == [(1010,)]


def test_the_kubernetes_backup_job_writes_what_pgwarden_backup_reads(
    site: tuple[LocalServer, Path], run: Run, tmp_path: Path
) -> None:
    """The statefulset flavor's CronJob script (as rendered into its ConfigMap), run against a
    real server: its backup is listed, verified and restored by pgwarden like its own."""
    from pgwarden.config import parse_config_text
    from pgwarden.kube.service import render

    server, root = site
    config = parse_config_text(
        "kubernetes:\n  storage: {kind: efs, efs: {file_system_id: fs-0123456789abcdef0}}\n"
        "  tools_image: registry.example.com/pgwarden:1\n"
        "backup: {volume: {size: 50Gi}, keep: 1}\n",
        source="pgwarden.yaml",
    )
    state = tmp_path / "k8s-state"
    state.mkdir()
    objects = render(config, state).objects
    (scripts_map,) = [o for o in objects if o["metadata"]["name"] == "postgres-backup-scripts"]
    (cronjob,) = [o for o in objects if o["kind"] == "CronJob"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (job,) = pod["initContainers"]
    (prune,) = pod["containers"]
    scripts = root / "scripts"
    scripts.mkdir()
    os.chmod(scripts, 0o755)  # noqa: S103 - the job's read-only scripts
    for name, text in scripts_map["data"].items():
        (scripts / name).write_text(text)
        os.chmod(scripts / name, 0o644)

    def job_run(backup_root: Path) -> tuple[int, str]:
        env = clean_env()
        env.update(
            BACKUP_ROOT=str(backup_root), PGWARDEN_SCRIPTS=str(scripts), PGHOST="127.0.0.1",
            PGPORT=str(server.port), PGUSER="postgres", PGPASSWORD=server.state.password() or "",
            PATH=f"{server.tool('psql').parent}:{env.get('PATH', '/usr/bin:/bin')}",
        )  # fmt: skip
        done = server.runas.run([*job["command"][:1], str(scripts / "backup.sh")], env=env)
        return done.returncode, done.stdout + done.stderr

    _sql(server, "CREATE TABLE marker (id int PRIMARY KEY)")
    _sql(server, "INSERT INTO marker SELECT generate_series(1, 10)")
    code, output = job_run(root / "backups")
    assert code == 0, output
    listed = json.loads(run("backup", "list", "-o", "json").out)
    assert len(listed["backups"]) == 1
    info = listed["backups"][0]
    assert (info["kind"], info["timeline"]) == ("full", 1)
    assert info["label"] in output
    assert run("backup", "verify").code == 0
    _sql(server, "INSERT INTO marker SELECT generate_series(11, 20)")
    _archived_up_to_now(server)
    restored = run("backup", "restore", "--to-latest",
                   "--target-dir", str(root / "restored-job"), "--start")  # fmt: skip
    assert restored.code == 0, restored.err
    assert _restored(restored.out.strip(), "SELECT count(*) FROM marker") == [(20,)]
    _stop(server, root / "restored-job")

    # A second run: the backup, then the pod's prune (keep: 1), as pgwarden from the tools
    # image with the ConfigMap's pgwarden.yaml (here the volume is root, not /backup), in a
    # read-only mount: the first backup goes, and the WAL only it needed; nothing is written
    # beside the config.
    first = info["label"]
    code, output = job_run(root / "backups")
    assert code == 0, output
    job_config = yaml.safe_load(scripts_map["data"]["pgwarden.yaml"])
    assert job_config == {"backup": {"location": "/backup", "keep": 1}}
    job_config["backup"]["location"] = str(root / "backups")
    config_dir = tmp_path / "job-config"
    config_dir.mkdir()
    (config_dir / "pgwarden.yaml").write_text(yaml.safe_dump(job_config))
    os.chmod(config_dir, 0o555)  # noqa: S103 - a read-only ConfigMap mount
    command = prune["command"]
    assert command[:2] == ["pgwarden", "--config"]
    pruned = run("--config", str(config_dir / "pgwarden.yaml"), *command[3:])
    assert pruned.code == 0, pruned.err
    assert f"removing backup {first}" in pruned.out
    listed = json.loads(run("backup", "list", "-o", "json").out)
    (kept,) = listed["backups"]
    assert kept["label"] != first
    assert kept["label"] in output
    assert run("backup", "verify").code == 0
    assert sorted(p.name for p in config_dir.iterdir()) == ["pgwarden.yaml"]

    # Another cluster's archive: the job refuses, writes nothing.
    foreign = root / "foreign"
    (foreign / "backups").mkdir(parents=True)
    server.runas.chown_tree(foreign)
    (foreign / "pgwarden-backups.json").write_text('{"system_identifier": "1", "format": 1}\n')
    code, output = job_run(foreign)
    assert code == 2
    assert "another cluster" in output
    assert list((foreign / "backups").iterdir()) == []


def test_a_backup_killed_midway_is_never_restored_from_and_prune_removes_it(
    site: tuple[LocalServer, Path], run: Run, tmp_path: Path
) -> None:
    import subprocess
    import sys

    server, root = site
    _sql(server, "CREATE TABLE bulk (id int, pad text)")
    first = run("backup", "create")
    assert first.code == 0, first.err
    _sql(server, "INSERT INTO bulk SELECT g, repeat('x', 500) FROM generate_series(1, 600000) g")
    backups = root / "backups" / "backups"
    before = set(backups.iterdir())
    # The CLI and its pg_basebackup, killed together (SIGKILL to the process group: what a
    # crash of the machine or an OOM kill does to both) once the copy has begun.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgwarden", "backup", "create"],
        cwd=tmp_path, env={**os.environ}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    started: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        started = [p for p in set(backups.iterdir()) - before if (p / "data").exists()]
        if started and any((started[0] / "data").iterdir()):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert started, "the backup never began"
    (interrupted,) = started
    assert not (interrupted / "pgwarden-backup.json").exists(), "finished before the kill"

    listed = run("backup", "list", "-o", "json")
    data = json.loads(listed.out)
    assert [b["label"] for b in data["backups"]] == [first.out.strip()]
    assert data["incomplete"] == [{"label": interrupted.name, "state": "interrupted"}]
    verified = run("backup", "verify")
    assert verified.code == 0, verified.out
    assert "interrupted" in verified.out
    again = run("backup", "create")  # the lock died with the killed process
    assert again.code == 0, again.err

    dry = run("backup", "prune", "--dry-run")
    assert f"would remove interrupted backup {interrupted.name}" in dry.out
    assert interrupted.exists()
    pruned = run("backup", "prune")
    assert pruned.code == 0, pruned.err
    assert not interrupted.exists()
    _archived_up_to_now(server)
    latest = run("backup", "restore", "--to-latest", "--target-dir", str(root / "restored-k"),
                 "--start")  # fmt: skip
    assert latest.code == 0, latest.err
    assert _restored(latest.out.strip(), "SELECT count(*) FROM bulk") == [(600000,)]
    _stop(server, root / "restored-k")


def test_a_backup_being_written_is_told_from_an_interrupted_one(tmp_path: Path) -> None:
    """Backups without a record: in progress while their writer lives (a process on this
    machine, checked; another machine's, for 24 hours from its start), interrupted otherwise.
    prune removes only interrupted ones; the record, written last, takes the marker away."""
    repo = Repository(DirStore(tmp_path))
    now = datetime.now(UTC)
    dead = subprocess.Popen(["true"])
    dead.wait()
    writers = {
        "20261201T000000Z": None,  # no marker (an older pgwarden, or cut before it)
        "20261201T000001Z": Writing("backup-job-pod-x7k2p", 1, now - timedelta(minutes=5)),
        "20261201T000002Z": Writing("backup-job-pod-x7k2p", 1, now - timedelta(hours=25)),
        "20261201T000003Z": Writing(socket.gethostname(), os.getpid(), now - timedelta(days=3)),
        "20261201T000004Z": Writing(socket.gethostname(), dead.pid, now),
    }
    for label, writer in writers.items():
        (tmp_path / "backups" / label).mkdir(parents=True)
        if writer is not None:
            repo.begin(label, writer)
    contents = repo.observe()
    assert sorted(contents.incomplete) == sorted(writers)
    writing = {
        label for label in contents.incomplete
        if still_writing(label, contents, local_create=False)
    }  # fmt: skip
    assert writing == {"20261201T000001Z", "20261201T000003Z"}
    assert all(still_writing(label, contents, local_create=True) for label in writers)
    plan = plan_prune(contents, keep=None, keep_days=None, now=now, writing=frozenset(writing))
    assert sorted(plan.remove_interrupted) == sorted(set(writers) - writing)

    label = "20261201T000001Z"
    info = BackupInfo(
        label=label, kind="full", parent=None, timeline=1, start_lsn="0/2000028",
        stop_lsn="0/2000100", start_time=now, stop_time=now, size_bytes=1,
        system_identifier="1", pg_major=18, pg_version="18.1", data_checksums=True,
        format="plain",
    )  # fmt: skip
    repo.record(info)
    assert not (tmp_path / "backups" / label / "pgwarden-writing.json").exists()
    assert label not in repo.observe().incomplete
