"""Backups in S3, against a real S3-compatible server (moto's server mode) on 127.0.0.1: WAL
archived by PostgreSQL's archive_command, base backups streamed into the bucket as one tar,
restores fetched from the bucket, verification, retention, and the archive's no-overwrite
promise."""

from __future__ import annotations

import json
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden.backup.create import _describe, _Written, create_backup, local_source, repository
from pgwarden.backup.store import ArchiveConflict, S3Location, S3Store
from pgwarden.config import parse_config_file, parse_config_text
from pgwarden.kube.backups import s3_config_map
from pgwarden.server.cluster import LocalServer, free_port
from pgwarden.server.local import local_server
from pgwarden.server.osuser import clean_env
from tests.conftest import Run
from tests.test_backup import _archived_up_to_now, _restored, _sql, _stop, reachable

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

__all__ = ["reachable"]  # a fixture, used by name below

BUCKET = "pgwarden-test"
YAML = """\
database: app
server:
  port: {port}
history:
  tables: ['public.*']
backup:
  keep: 1
  archive_timeout: 1
  s3:
    bucket: {bucket}
    prefix: clusters/main
    endpoint_url: {endpoint}
"""


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """An S3-compatible server on a free port of 127.0.0.1, with one empty bucket; the
    credentials are in the environment, where PostgreSQL's archive_command finds them too."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "pgwarden-test",
        "AWS_SECRET_ACCESS_KEY": "pgwarden-test-secret",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in the process, across servers: each test starts from none.
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")  # noqa: S310
    urllib.request.urlopen(reset, timeout=30).close()  # noqa: S310 - the local moto server
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


@pytest.fixture
def s3_site(
    tmp_path: Path, reachable: Path, run: Run, s3: tuple[str, Any]
) -> Iterator[tuple[LocalServer, Path, Any]]:
    endpoint, client = s3
    config = tmp_path / "pgwarden.yaml"
    config.write_text(YAML.format(port=free_port(), bucket=BUCKET, endpoint=endpoint))
    server = local_server(parse_config_file(config), config, None)
    up = run("up")
    assert up.code == 0, up.err
    yield server, reachable, client
    for data in reachable.glob("restored-*"):
        if (data / "postmaster.pid").exists():
            server.runas.run([server.tool("pg_ctl"), "stop", "-D", data, "-m", "immediate"])
    server.purge()


def _body(client: Any, key: str) -> bytes:
    return bytes(client.get_object(Bucket=BUCKET, Key=f"clusters/main/{key}")["Body"].read())


def _size(client: Any, key: str) -> int:
    return int(client.head_object(Bucket=BUCKET, Key=f"clusters/main/{key}")["ContentLength"])


def _keys(client: Any, prefix: str) -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=f"clusters/main/{prefix}")
    return [item["Key"].removeprefix("clusters/main/") for item in found.get("Contents", [])]


def test_backup_to_s3_restores_to_a_time_verifies_and_prunes(
    s3_site: tuple[LocalServer, Path, Any], run: Run
) -> None:
    server, root, client = s3_site
    _sql(server, "CREATE TABLE marker (id int PRIMARY KEY, note text)")
    _sql(server, "INSERT INTO marker SELECT g, 'before backup' FROM generate_series(1, 50) g")
    created = run("backup", "create")
    assert created.code == 0, created.err
    first = created.out.strip()
    objects = _keys(client, f"backups/{first}/")
    assert sorted(k.rsplit("/", 1)[1] for k in objects) == [
        "backup_manifest", "base.tar", "pgwarden-backup.json",
    ]  # fmt: skip
    # Streamed (its WAL is the archive's), and its recorded size is what the bucket holds.
    record = json.loads(_body(client, f"backups/{first}/pgwarden-backup.json"))
    assert record["format"] == "base-tar"
    sizes = {k.rsplit("/", 1)[1]: _size(client, k) for k in objects}
    assert record["size_bytes"] == sizes["base.tar"] + sizes["backup_manifest"]

    _sql(server, "INSERT INTO marker VALUES (51, 'after backup, before target')")
    time.sleep(1.1)
    target = _sql(server, "SELECT now()")[0][0]
    time.sleep(1.1)
    _sql(server, "DELETE FROM marker WHERE id <= 25")  # the mistake
    _archived_up_to_now(server)
    assert any(k.startswith("wal/0000000") for k in _keys(client, "wal/"))

    listed = json.loads(run("backup", "list", "-o", "json").out)
    assert listed["location"] == f"s3://{BUCKET}/clusters/main"
    assert [b["label"] for b in listed["backups"]] == [first]
    assert listed["archiver"]["failing"] is False
    assert listed["missing_segment"] is None

    restored = run("backup", "restore", "--to-time", target.isoformat(),
                   "--target-dir", str(root / "restored-time"), "--start")  # fmt: skip
    assert restored.code == 0, restored.err
    rows = _restored(restored.out.strip(), "SELECT count(*), max(id) FROM marker")
    assert rows == [(51, 51)]
    _stop(server, root / "restored-time")

    verified = run("backup", "verify", "-o", "json")
    assert verified.code == 0, verified.out + verified.err
    assert json.loads(verified.out)["ok"] is True

    # Retention: a second backup, keep 1 → the first one's objects and the WAL before the
    # second's start go; the second still restores to the latest state.
    second = run("backup", "create")
    assert second.code == 0, second.err
    _archived_up_to_now(server)
    pruned = run("backup", "prune")
    assert pruned.code == 0, pruned.err
    assert _keys(client, f"backups/{first}/") == []
    latest = run("backup", "restore", "--to-latest",
                 "--target-dir", str(root / "restored-latest"), "--start")  # fmt: skip
    assert latest.code == 0, latest.err
    assert _restored(latest.out.strip(), "SELECT count(*) FROM marker") == [(26,)]
    _stop(server, root / "restored-latest")

    if server.binaries.major >= 17:
        # An incremental backup in the bucket: built on the full one's manifest (fetched),
        # combined at restore from both tars.
        _sql(server, "UPDATE marker SET note = 'changed after the full backup' WHERE id = 30")
        inc = run("backup", "create", "--incremental")
        assert inc.code == 0, inc.err
        _archived_up_to_now(server)
        combined = run("backup", "restore", "--to-latest",
                       "--target-dir", str(root / "restored-inc"), "--start")  # fmt: skip
        assert combined.code == 0, combined.err
        assert "pg_combinebackup" in combined.err
        assert _restored(combined.out.strip(), "SELECT note FROM marker WHERE id = 30") == [
            ("changed after the full backup",)
        ]
        _stop(server, root / "restored-inc")
        assert run("backup", "verify").code == 0

    # A segment lost from the bucket: verify names it, a restore past it is refused.
    _sql(server, "INSERT INTO marker VALUES (52, 'after the second backup')")
    _archived_up_to_now(server)
    segments = sorted(k for k in _keys(client, "wal/") if len(k) == len("wal/") + 24)
    assert len(segments) >= 3
    lost = segments[-2]
    client.delete_object(Bucket=BUCKET, Key=f"clusters/main/{lost}")
    broken = run("backup", "verify", "-o", "json")
    assert broken.code == 1
    assert json.loads(broken.out)["missing_segment"] == lost.removeprefix("wal/")
    refused = run("backup", "restore", "--to-latest", "--target-dir", str(root / "restored-gap"))
    assert refused.code == 2
    assert lost.removeprefix("wal/") in refused.err
    assert not (root / "restored-gap").exists()


def test_s3_archive_never_overwrites_a_different_file(s3: tuple[str, Any], tmp_path: Path) -> None:
    endpoint, client = s3
    store = S3Store(S3Location(BUCKET, "p", endpoint))
    segment = tmp_path / "000000010000000000000001"
    segment.write_bytes(b"a" * 1000)
    assert store.put_new("wal/000000010000000000000001", segment) is True
    assert store.put_new("wal/000000010000000000000001", segment) is False  # a retry: fine
    other = tmp_path / "other"
    other.write_bytes(b"b" * 1000)
    with pytest.raises(ArchiveConflict):
        store.put_new("wal/000000010000000000000001", other)
    body = client.get_object(Bucket=BUCKET, Key="p/wal/000000010000000000000001")["Body"].read()
    assert body == b"a" * 1000
    # A file put there by something else, without pgwarden's checksum: compared by content.
    client.put_object(Bucket=BUCKET, Key="p/wal/000000010000000000000002", Body=b"a" * 1000)
    assert store.put_new("wal/000000010000000000000002", segment) is False
    with pytest.raises(ArchiveConflict):
        store.put_new("wal/000000010000000000000002", other)


def test_s3_errors_a_user_can_fix_are_said_plainly(
    tmp_path: Path, run: Run, s3: tuple[str, Any]
) -> None:
    endpoint, _client = s3
    config = tmp_path / "pgwarden.yaml"
    config.write_text(YAML.format(port=free_port(), bucket="no-such-bucket", endpoint=endpoint))
    up = run("up")
    assert up.code == 2, up.err
    assert "bucket no-such-bucket does not exist" in up.err
    assert "Traceback" not in up.err


def test_a_server_elsewhere_is_backed_up_as_the_statefulset_cronjob_does(
    s3_site: tuple[LocalServer, Path, Any],
    run: Run,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The statefulset flavor's CronJob in miniature: `pgwarden --config <its ConfigMap's
    pgwarden.yaml> --dsn <server> backup create`, on a machine with no local server (that
    config names only the bucket), streamed into the bucket. The backup lists, verifies and restores
    like the local server's own. While a backup is being written elsewhere, `list` says so and
    `prune` here leaves it alone; a day later it is taken for interrupted."""
    server, root, client = s3_site
    endpoint = client.meta.endpoint_url
    _sql(server, "CREATE TABLE marker (id int PRIMARY KEY)")
    _sql(server, "INSERT INTO marker SELECT generate_series(1, 20)")
    kube = parse_config_text(
        "kubernetes: {storage: {kind: ebs}, tools_image: registry.example.com/pgwarden:1}\n"
        f"backup: {{s3: {{bucket: {BUCKET}, prefix: clusters/main, "
        f"endpoint_url: '{endpoint}'}}, keep: 1}}\n",
        source="test.yaml",
    )
    rendered = s3_config_map(kube)["data"]
    job = tmp_path / "job"
    job.mkdir()
    (job / "pgwarden.yaml").write_text(rendered["pgwarden.yaml"])
    (job / "location.json").write_text(rendered["location.json"])
    # The archive_command's location (what the server in the pod archives to) is this bucket.
    assert S3Location.load(job / "location.json") == S3Location(BUCKET, "clusters/main", endpoint)
    staging = tmp_path / "job-tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    params = conninfo_to_dict(server.url("postgres"))
    monkeypatch.setenv("PGPASSWORD", str(params.pop("password")))  # as the job gets it

    created = run("--config", str(job / "pgwarden.yaml"), "--dsn", make_conninfo("", **params),
                  "backup", "create")  # fmt: skip
    assert created.code == 0, created.err
    label = created.out.strip()
    assert sorted(k.rsplit("/", 1)[1] for k in _keys(client, f"backups/{label}/")) == [
        "backup_manifest", "base.tar", "pgwarden-backup.json",
    ]  # fmt: skip
    left = [p for p in staging.rglob("*") if p.is_file() and p.name != "backup-create.lock"]
    assert not left, "something stays behind in $TMPDIR"

    # Where pgwarden runs (the local config names the same bucket): an ordinary backup.
    _sql(server, "INSERT INTO marker SELECT generate_series(21, 30)")
    _archived_up_to_now(server)
    listed = json.loads(run("backup", "list", "-o", "json").out)
    assert [b["label"] for b in listed["backups"]] == [label]
    assert run("backup", "verify").code == 0
    latest = run("backup", "restore", "--to-latest",
                 "--target-dir", str(root / "restored-remote"), "--start")  # fmt: skip
    assert latest.code == 0, latest.err
    assert _restored(latest.out.strip(), "SELECT count(*) FROM marker") == [(30,)]
    _stop(server, root / "restored-remote")

    # A backup being written by the CronJob now: its first part is there, not its record.
    writing = "20990101T000000Z"
    client.put_object(Bucket=BUCKET, Key=f"clusters/main/backups/{writing}/base.tar",
                      Body=b"half a tar")  # fmt: skip

    def marker(age: timedelta) -> None:
        started = (datetime.now(UTC) - age).isoformat()
        body = json.dumps({"host": "postgres-backup-29145-x7k2p", "pid": 1, "started": started})
        key = f"clusters/main/backups/{writing}/pgwarden-writing.json"
        client.put_object(Bucket=BUCKET, Key=key, Body=body.encode())

    marker(timedelta(minutes=3))
    listed = json.loads(run("backup", "list", "-o", "json").out)
    assert listed["incomplete"] == [{"label": writing, "state": "in progress"}]
    dry = run("backup", "prune", "--dry-run")
    assert dry.code == 0, dry.err
    assert writing not in dry.out
    marker(timedelta(hours=25))
    listed = json.loads(run("backup", "list", "-o", "json").out)
    assert listed["incomplete"] == [{"label": writing, "state": "interrupted"}]
    # The job's own prune (after its backup, with retention): its pgwarden.yaml, no local server.
    pruned = run("--config", str(job / "pgwarden.yaml"), "backup", "prune")
    assert pruned.code == 0, pruned.err
    assert f"interrupted backup {writing}" in pruned.out
    assert "keeping 1 backup(s)" in pruned.out
    assert _keys(client, f"backups/{writing}/") == []
    assert [b["label"] for b in json.loads(run("backup", "list", "-o", "json").out)["backups"]] == [
        label
    ]


class _Interrupted(Exception):
    pass


def test_a_backup_interrupted_mid_stream_leaves_nothing_in_the_bucket(
    s3_site: tuple[LocalServer, Path, Any], run: Run
) -> None:
    """Ctrl-C (here: the progress callback raising) while the tar is on its way: pg_basebackup
    is stopped, the partial upload removed, and nothing is listed or half-listed."""
    server, _root, client = s3_site
    # Enough data that the first progress report comes while the tar is still flowing.
    _sql(server, "CREATE TABLE big (id int, pad text)")
    _sql(server, "INSERT INTO big SELECT g, repeat('x', 400) FROM generate_series(1, 150000) g")
    reports: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        reports.append((done, total))
        raise _Interrupted

    with pytest.raises(_Interrupted):
        create_backup(local_source(server), progress=progress)
    assert reports, "pg_basebackup reported no progress"
    assert _keys(client, "backups/") == []
    uploads = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert uploads == []
    contents = repository(server).observe()
    assert (contents.backups, contents.incomplete) == ([], [])
    assert not any(p.name == "pg_basebackup" for p in _processes())
    # The next backup is unaffected.
    info = create_backup(local_source(server))
    assert info.format == "base-tar"
    assert [b.label for b in repository(server).observe().backups] == [info.label]
    assert run("backup", "verify").code == 0
    # Its own WAL is the archive's: with its first segment gone, verify names that segment.
    contents = repository(server).observe()
    assert contents.cluster is not None
    first = info.start_segment(contents.cluster.wal_segment_size)
    name = first.name(contents.cluster.wal_segment_size)
    client.delete_object(Bucket=BUCKET, Key=f"clusters/main/wal/{name}")
    broken = json.loads(run("backup", "verify", "-o", "json").out)
    assert broken["backups"][0]["ok"] is False
    assert f"needs WAL segment {name}, which is missing" in broken["backups"][0]["detail"]


def _processes() -> list[Path]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found.append(Path((proc / "cmdline").read_bytes().split(b"\0")[0].decode()))
            except OSError:
                continue
    return found


def test_a_backup_written_by_earlier_versions_still_verifies_and_restores(
    s3_site: tuple[LocalServer, Path, Any], run: Run
) -> None:
    """Earlier pgwarden staged `pg_basebackup -F t -X stream` and uploaded base.tar,
    pg_wal.tar and backup_manifest (format "tar"). Buckets hold such backups: they list,
    verify and restore as before."""
    server, root, _client = s3_site
    _sql(server, "CREATE TABLE marker (id int PRIMARY KEY)")
    _sql(server, "INSERT INTO marker SELECT generate_series(1, 40)")
    staged = root / "old-layout"
    staged.mkdir()
    server.runas.chown(staged)
    env = clean_env()
    env["PGPASSWORD"] = server.state.password() or ""
    done = server.runas.run(
        [server.tool("pg_basebackup"), "-D", staged / "data", "-F", "t", "-X", "stream",
         "-c", "fast", "-d", f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"],
        env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    repo = repository(server)
    label = "20250101T000000Z"
    for part in ("base.tar", "pg_wal.tar", "backup_manifest"):
        with (staged / "data" / part).open("rb") as body:
            repo.store.upload(f"backups/{label}/{part}", body)
    with tarfile.open(staged / "data" / "base.tar") as tar:
        member = tar.extractfile("backup_label")
        assert member is not None
        backup_label = member.read().decode()
    cluster = repo.read_cluster()
    assert cluster is not None
    version = str(_sql(server, "SHOW server_version", "postgres")[0][0])
    written = _Written(
        fmt="tar",
        backup_label=backup_label,
        manifest=json.loads((staged / "data" / "backup_manifest").read_text()),
        size=sum(p.stat().st_size for p in (staged / "data").iterdir()),
    )
    stop_time = _sql(server, "SELECT now()", "postgres")[0][0]
    assert isinstance(stop_time, datetime)
    repo.record(_describe(label, written, None, cluster, version, stop_time=stop_time))
    _sql(server, "INSERT INTO marker SELECT generate_series(41, 45)")
    _archived_up_to_now(server)

    listed = json.loads(run("backup", "list", "-o", "json").out)
    assert [(b["label"], b["format"]) for b in listed["backups"]] == [(label, "tar")]
    verified = run("backup", "verify", "-o", "json")
    assert verified.code == 0, verified.out + verified.err
    latest = run("backup", "restore", "--to-latest",
                 "--target-dir", str(root / "restored-old"), "--start")  # fmt: skip
    assert latest.code == 0, latest.err
    assert _restored(latest.out.strip(), "SELECT count(*) FROM marker") == [(45,)]
    _stop(server, root / "restored-old")


def test_a_server_with_a_tablespace_is_refused_before_anything_is_written(
    s3_site: tuple[LocalServer, Path, Any], run: Run
) -> None:
    """pg_basebackup writes one tablespace to a pipe: refused up front, exit 2, nothing in
    the bucket."""
    server, root, client = s3_site
    space = root / "space"
    space.mkdir()
    server.runas.chown(space)
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLESPACE extra LOCATION {}").format(sql.Literal(str(space))))
    refused = run("backup", "create")
    assert refused.code == 2, refused.err
    assert "the server has tablespaces (extra)" in refused.err
    assert "Traceback" not in refused.err
    assert _keys(client, "backups/") == []
