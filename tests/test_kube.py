"""Kubernetes rendering: golden files, strict schema validation, bad config, and the rendered
settings and bootstrap SQL running a real PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from pgwarden.config import Config, parse_config_text
from pgwarden.history import wal
from pgwarden.history.catalog import DEFAULT_SCHEMA
from pgwarden.kube.cnpg import RestoreRequest
from pgwarden.kube.service import render
from pgwarden.kube.validate import SUPPORTED, validate_objects
from pgwarden.server.cluster import LocalServer
from tests.conftest import Run, free_port

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PGWARDEN_UPDATE_GOLDEN") == "1"

CONFIGS = {
    "ebs": "history: {tables: ['public.*']}\n"
    "access: {managers: [alice], roles: {alice: {login: true}}}\n",
    "efs": "kubernetes:\n  storage: {kind: efs, efs: {file_system_id: fs-0123456789abcdef0}}\n",
    "efs-static": "kubernetes:\n  namespace: data\n  storage:\n    kind: efs-static\n"
    "    size: 50Gi\n    efs: {file_system_id: fs-0123456789abcdef0}\n",
    "cnpg": "history: {tables: ['public.*']}\n"
    "access: {managers: [alice], roles: {alice: {login: true}, "
    "app_rw: {login: true, tables: {'public.*': [SELECT, INSERT]}}}}\n"
    "kubernetes: {flavor: cloudnative-pg, instances: 3}\n"
    "backup: {s3: {bucket: my-backups, prefix: pg/prod}, retention: 30d}\n",
    "efs-backup": "kubernetes:\n  storage: {kind: ebs}\n"
    "backup: {volume: {size: 200Gi, efs: {file_system_id: fs-0123456789abcdef0}}, "
    "schedule: '0 30 1 * * *', archive_timeout: 30}\n",
    "ebs-wal": "history: {tables: ['public.*'], capture: wal, wal_lag_alarm: 2GB}\n"
    "kubernetes: {storage: {kind: ebs}, tools_image: registry.example.com/pgwarden:0.1.0}\n",
    "cnpg-wal": "history: {tables: ['public.*'], capture: wal}\n"
    "kubernetes: {flavor: cloudnative-pg, tools_image: registry.example.com/pgwarden:0.1.0}\n"
    "backup: {s3: {bucket: my-backups}}\n",
    "efs-backup-keep": "kubernetes:\n  storage: {kind: ebs}\n"
    "  tools_image: registry.example.com/pgwarden:1\n"
    "backup: {volume: {size: 200Gi, efs: {file_system_id: fs-0123456789abcdef0}}, keep: 7, "
    "keep_days: 14}\n",
    "ebs-s3": "kubernetes: {storage: {kind: ebs}, tools_image: registry.example.com/pgwarden:1}\n"
    "backup: {location: 's3://my-backups/pg/prod', schedule: '0 15 3 * * *'}\n",
    "existing": "kubernetes:\n  existing_secret: pg-admin\n"
    "  storage: {kind: existing, class_name: fast-ssd}\n  allowed_cidrs: [172.16.0.0/12]\n",
}


def _render(
    text: str, tmp_path: Path, pg_bin: Path | None = None, restore: RestoreRequest | None = None
) -> Any:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "k8s-password").write_text("fixed-password-for-golden-files\n")
    config = parse_config_text(text, source="test.yaml")
    return render(config, state, pg_bin=pg_bin, restore=restore)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_golden_and_deterministic(name: str, tmp_path: Path) -> None:
    first = _render(CONFIGS[name], tmp_path).stream()
    assert _render(CONFIGS[name], tmp_path).stream() == first  # byte-identical
    golden = GOLDEN / f"k8s-{name}.yaml"
    if UPDATE or not golden.exists():
        golden.write_text(first)
    assert first == golden.read_text(), f"re-run with PGWARDEN_UPDATE_GOLDEN=1 if {golden} is stale"


@pytest.fixture(scope="module")
def rendered_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {
        name: _render(text, tmp_path_factory.mktemp(name)).objects for name, text in CONFIGS.items()
    }


@pytest.mark.parametrize("version", SUPPORTED)
def test_strict_schema_validation_for_every_config(
    version: str, rendered_configs: dict[str, Any]
) -> None:
    for name, objects in rendered_configs.items():
        report = validate_objects(objects, version)
        assert report.errors == [], name
    kinds = {o["kind"] for o in rendered_configs["ebs"]}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_validation_catches_what_schemas_miss(tmp_path: Path) -> None:
    objects = _render(CONFIGS["ebs"], tmp_path).objects
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] = "other"
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and "pg_hba.conf" in o["data"])
    cm["data"]["pg_hba.conf"] += "host all all 0.0.0.0/0 trust\n"
    sts["spec"]["template"]["spec"]["containers"][0]["resources"] = {}
    sts["spec"]["template"]["spec"]["containers"][0]["spec_typo"] = 1
    errors = "\n".join(validate_objects(objects).errors)
    assert "does not match the pod labels" in errors
    assert "trust" in errors
    assert "sets no requests.cpu" in errors
    assert "selects no pod" in errors
    assert "spec_typo" in errors  # strict: unknown fields fail


def test_efs_pgdata_warns_and_statefulset_is_hardened(tmp_path: Path) -> None:
    rendered = _render(CONFIGS["efs"], tmp_path)
    assert any("EBS" in w and "EFS" in w for w in rendered.warnings)
    sts = next(o for o in rendered.objects if o["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert pod["securityContext"]["runAsUser"] == 999
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    assert "fast" in container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert pod["terminationGracePeriodSeconds"] >= 100
    env = {e["name"]: e for e in container["env"]}
    assert env["PGDATA"]["value"].endswith("/pgdata")
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    sc = next(o for o in rendered.objects if o["kind"] == "StorageClass")
    assert sc["parameters"]["provisioningMode"] == "efs-ap"
    assert sc["parameters"]["uid"] == "999"
    for cm in (o for o in rendered.objects if o["kind"] == "ConfigMap"):
        assert "fixed-password" not in yaml.safe_dump(cm)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kubernetes: {replicas: 2, storage: {kind: efs-static, "
            "efs: {file_system_id: fs-0123456789abcdef0}}}",
            "cloudnative-pg",
        ),
        ("kubernetes: {replicas: 3}", "independent primaries"),
        ("kubernetes: {storage: {kind: efs}}", "file_system_id is required"),
        ("kubernetes: {storage: {size: 20GB}}", "did you mean 20Gi"),
        ("kubernetes: {flavor: helm}", "kubernetes.flavor"),
        ("kubernetes: {storage: {kind: existing}}", "class_name is required"),
    ],
)  # fmt: skip
def test_bad_config_is_refused_and_nothing_written(
    text: str, message: str, run: Run, tmp_path: Path
) -> None:
    (tmp_path / "pgwarden.yaml").write_text(text + "\n")
    result = run("k8s", "render", "--out", str(tmp_path / "deploy"))
    assert result.code == 2
    assert message in result.err
    assert "Traceback" not in result.err
    assert not (tmp_path / "deploy").exists()


def test_render_out_writes_files_and_kustomization(run: Run, tmp_path: Path) -> None:
    result = run("k8s", "render", "--out", str(tmp_path / "deploy"))
    assert result.code == 0, result.err
    files = sorted(p.name for p in (tmp_path / "deploy").iterdir())
    assert "kustomization.yaml" in files
    kustomization = yaml.safe_load((tmp_path / "deploy" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        f for f in files if f != "kustomization.yaml"
    )
    assert run("k8s", "validate", str(tmp_path / "deploy")).code == 0
    assert (
        run("k8s", "validate", str(tmp_path / "deploy"), "--kubernetes-version", "1.29").code == 0
    )
    assert (tmp_path / ".pgwarden" / "k8s-password").stat().st_mode & 0o777 == 0o600


# The CRD schemas are read from ../shared (their README asks that they not be copied into the
# project); CI has that folder, and there the test must run, not skip.
CRDS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "cloudnative-pg"
REQUIRE_CRDS = bool(os.environ.get("PGWARDEN_CI"))


def test_cloudnative_pg_objects(tmp_path: Path) -> None:
    rendered = _render(CONFIGS["cnpg"], tmp_path)
    kinds = [o["kind"] for o in rendered.objects]
    assert kinds == ["StorageClass", "ConfigMap", "Cluster", "ObjectStore", "ScheduledBackup"]
    cluster = rendered.objects[2]["spec"]
    assert cluster["instances"] == 3
    assert cluster["postgresql"]["synchronous"] == {"method": "any", "number": 1,
                                                     "dataDurability": "required"}  # fmt: skip
    assert cluster["affinity"]["topologyKey"] == "topology.kubernetes.io/zone"
    assert cluster["plugins"][0]["name"] == "barman-cloud.cloudnative-pg.io"
    assert "barmanObjectStore" not in yaml.safe_dump(cluster)  # deprecated since 1.26
    roles = {r["name"]: r for r in cluster["managed"]["roles"]}
    assert roles["alice"]["inRoles"] == ["manager"]
    assert roles["alice"]["passwordSecret"] == {"name": "postgres-role-alice"}
    assert all("trust" not in line for line in cluster["postgresql"]["pg_hba"])
    assert any("postgres-role-alice" in w for w in rendered.warnings)
    store = rendered.objects[3]["spec"]
    assert store["configuration"]["destinationPath"] == "s3://my-backups/pg/prod"
    assert store["retentionPolicy"] == "30d"


@pytest.mark.skipif(
    not CRDS.is_dir() and not REQUIRE_CRDS, reason="CloudNativePG CRD schemas not present"
)
def test_cloudnative_pg_objects_match_the_crds(tmp_path: Path) -> None:
    import jsonschema

    assert CRDS.is_dir(), f"CI runs with ../shared beside the project: {CRDS} is missing"
    schemas = {}
    for file in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(file.read_text())
        version = crd["spec"]["versions"][0]
        schemas[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = version["schema"][
            "openAPIV3Schema"
        ]["properties"]["spec"]
    restore = RestoreRequest(datetime(2026, 12, 2, 10, 15, tzinfo=UTC), "postgres-restored")
    objects = [
        *_render(CONFIGS["cnpg"], tmp_path).objects,
        *_render(CONFIGS["cnpg"], tmp_path, restore=restore).objects,
        *_render(CONFIGS["cnpg-wal"], tmp_path).objects,
    ]
    checked = 0
    for obj in objects:
        group = obj["apiVersion"].split("/")[0]
        schema = schemas.get((group, obj["kind"]))
        if schema is not None:
            jsonschema.validate(obj["spec"], schema)
            checked += 1
    # Cluster, ObjectStore, ScheduledBackup; the recovered Cluster, its own; with WAL capture
    assert checked == 8


def test_cloudnative_pg_restore_to_a_time_is_a_new_cluster(run: Run, tmp_path: Path) -> None:
    (tmp_path / "pgwarden.yaml").write_text(CONFIGS["cnpg"])
    result = run("k8s", "render", "--restore-to-time", "2026-12-02T11:15:00+01:00")
    assert result.code == 0, result.err
    objects = list(yaml.safe_load_all(result.out))
    assert [o["kind"] for o in objects] == ["Cluster", "ScheduledBackup"]
    cluster = objects[0]
    assert cluster["metadata"]["name"] == "postgres-restored"
    recovery = cluster["spec"]["bootstrap"]["recovery"]
    assert recovery["recoveryTarget"] == {"targetTime": "2026-12-02T10:15:00+00:00"}
    source = {c["name"]: c for c in cluster["spec"]["externalClusters"]}[recovery["source"]]
    assert source["plugin"]["parameters"] == {
        "barmanObjectName": "postgres-backup", "serverName": "postgres",
    }  # fmt: skip
    # It archives under its own name: never into the WAL of the cluster it came from.
    assert cluster["spec"]["plugins"][0]["parameters"]["serverName"] == "postgres-restored"
    assert objects[1]["spec"]["cluster"] == {"name": "postgres-restored"}
    assert "postgres is not touched" in result.err

    same = run("k8s", "render", "--restore-to-time", "1h", "--restore-as", "postgres")
    assert same.code == 2
    assert "name of its own" in same.err
    (tmp_path / "pgwarden.yaml").write_text("kubernetes: {flavor: cloudnative-pg}\n")
    no_backups = run("k8s", "render", "--restore-to-time", "1h")
    assert no_backups.code == 2
    assert "no backup.s3" in no_backups.err
    (tmp_path / "pgwarden.yaml").write_text("history: {tables: ['public.*']}\n")
    statefulset = run("k8s", "render", "--restore-to-time", "1h")
    assert statefulset.code == 2
    assert "pgwarden backup restore" in statefulset.err


def test_cloudnative_pg_refuses_a_shared_volume(run: Run, tmp_path: Path) -> None:
    (tmp_path / "pgwarden.yaml").write_text(
        "kubernetes: {flavor: cloudnative-pg, storage: {kind: efs-static, "
        "efs: {file_system_id: fs-0123456789abcdef0}}}\n"
    )
    result = run("k8s", "render")
    assert result.code == 2
    assert "volume of its own" in result.err


def test_kubectl_missing_or_no_cluster(
    run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl here
    result = run("k8s", "status")
    assert result.code == 2
    assert "kubectl is not installed" in result.err
    if shutil.which("kubectl", path="/usr/local/bin:/usr/bin:/bin") is None:
        pytest.skip("no kubectl on this machine to try an unreachable cluster")
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    result = run("k8s", "status")
    assert result.code == 2
    assert "kubectl get" in result.err
    assert "failed" in result.err


@pytest.mark.parametrize("capture", ["trigger", "wal"])
def test_rendered_settings_and_bootstrap_run_a_real_postgres(
    tmp_path: Path, pg_bin: Path, pg_major: int, monkeypatch: pytest.MonkeyPatch, capture: str
) -> None:
    """Start PostgreSQL on the rendered postgresql.conf / pg_hba.conf / pg_ident.conf, run the
    bootstrap SQL files in their order on an empty database, then the seed's history and
    manager scenarios. With WAL capture the publication and the slot come from files of their
    own, and the slot is named after the database it runs in (not the one it was planned on)."""
    text = (
        f"history: {{tables: ['public.*'], capture: {capture}}}\n"
        "access: {managers: [alice], roles: {alice: {login: true}, bob: {login: true, "
        "schemas: [public], tables: {'public.*': [SELECT, INSERT, UPDATE, DELETE]}}}}\n"
        "kubernetes: {allowed_cidrs: [127.0.0.1/32], tools_image: registry.example/pgwarden:t}\n"
    )
    config = parse_config_text(text, source="k8s.yaml")
    # Planned with the binaries of this leg: the SQL must fit the server it runs on.
    objects = _render(text, tmp_path, pg_bin).objects
    cms = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    files, bootstrap = cms["postgres-config"], cms["postgres-bootstrap"]
    assert ("005-pgwarden-02.sql" in bootstrap) == (capture == "wal")

    server = LocalServer(
        Config(), tmp_path / "local" / ".pgwarden", pg_bin=pg_bin, port=free_port()
    )
    try:
        server.up()
        server.down()
        conf_dir = server.state.cluster / "rendered"
        conf_dir.mkdir()
        server.runas.chown(conf_dir)
        for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
            path = conf_dir / name
            path.write_text(files[name])
            server.runas.chown(path)
        port = free_port()
        options = " ".join([
            f"-c config_file={conf_dir}/postgresql.conf",
            f"-c hba_file={conf_dir}/pg_hba.conf",
            f"-c ident_file={conf_dir}/pg_ident.conf",
            f"-c data_directory={server.state.data_dir}",
            f"-c unix_socket_directories={server.state.socket_dir}",
            "-c listen_addresses=127.0.0.1",
            f"-p {port}",
        ])  # fmt: skip
        started = server.runas.run(
            [server.binaries.tool("pg_ctl"), "start", "-w", "-D", str(server.state.data_dir),
             "-l", str(server.state.log_file), "-o", options],
        )  # fmt: skip
        assert started.returncode == 0, server.log_tail()
        password = server.state.password()
        admin = f"postgresql://postgres:{password}@127.0.0.1:{port}"
        with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
            assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(config.database)))
        with psycopg.connect(f"{admin}/{config.database}", autocommit=True) as conn:
            for name in sorted(bootstrap):  # as the image's entrypoint runs them
                conn.execute(bootstrap[name])
            for role in ("alice", "bob"):
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD 'pw'").format(sql.Identifier(role)))
            conn.execute("SET ROLE manager")  # as a manager would: tables belong to manager
            conn.execute("CREATE TABLE test_table (id int PRIMARY KEY, name text)")
            conn.execute("RESET ROLE")
            conn.execute("INSERT INTO test_table VALUES (1, 'Test Data')")
            conn.execute("UPDATE test_table SET name = 'Changed'")
            conn.execute("DELETE FROM test_table")
            if capture == "wal":
                wal.catch_up(conn, DEFAULT_SCHEMA)
                (oid,) = conn.execute(
                    "SELECT oid FROM pg_database WHERE datname = current_database()"
                ).fetchone() or (None,)
                assert wal.setup(conn, DEFAULT_SCHEMA) == wal.WalSetup(
                    f"pgwarden_{oid}", "pgwarden_capture"
                )
            ops = [r[0] for r in conn.execute("SELECT op FROM pgwarden.event ORDER BY stmt_id")]
            assert ops == ["INSERT", "UPDATE", "DELETE"]
        with psycopg.connect(
            f"postgresql://bob:pw@127.0.0.1:{port}/{config.database}", autocommit=True
        ) as conn:
            conn.execute("INSERT INTO test_table VALUES (2, 'by bob')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("ALTER TABLE test_table ADD COLUMN x int")
        with psycopg.connect(
            f"postgresql://alice:pw@127.0.0.1:{port}/{config.database}", autocommit=True
        ) as conn:
            if pg_major >= 16:
                conn.execute("SET ROLE manager")
            conn.execute("ALTER TABLE test_table ADD COLUMN x int")
    finally:
        server.down()
        server.purge()
    del monkeypatch


def test_statefulset_backups_go_to_their_own_volume(run: Run, tmp_path: Path) -> None:
    rendered = _render(CONFIGS["efs-backup"], tmp_path)
    by_kind: dict[str, list[Any]] = {}
    for obj in rendered.objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    claim = next(
        o for o in by_kind["PersistentVolumeClaim"] if o["metadata"]["name"] == "postgres-backup"
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "postgres-backup-efs"
    classes = {o["metadata"]["name"]: o for o in by_kind["StorageClass"]}
    assert classes["postgres-backup-efs"]["reclaimPolicy"] == "Retain"
    (job,) = by_kind["CronJob"]
    assert job["spec"]["schedule"] == "30 1 * * *"
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]
    # The job's pods never match the server's Service selector.
    (service,) = [o for o in by_kind["Service"] if o["spec"].get("type") == "ClusterIP"]
    selector = service["spec"]["selector"]
    assert not all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert "value" not in env["PGPASSWORD"]  # from the Secret, never in the manifest
    conf = next(o for o in by_kind["ConfigMap"] if o["metadata"]["name"] == "postgres-config")
    text = conf["data"]["postgresql.conf"]
    assert "archive_library = 'basic_archive'" in text
    assert "basic_archive.archive_directory = '/backup/wal'" in text
    assert "archive_timeout = 30" in text
    (sts,) = by_kind["StatefulSet"]
    pod_spec = sts["spec"]["template"]["spec"]
    assert pod_spec["initContainers"][0]["command"][:2] == ["mkdir", "-p"]
    (policy,) = by_kind["NetworkPolicy"]
    assert any(
        "podSelector" in source for rule in policy["spec"]["ingress"] for source in rule["from"]
    )

    (tmp_path / "pgwarden.yaml").write_text("backup: {volume: {size: 10Gi}}\n")
    no_rwx = run("k8s", "render")
    assert no_rwx.code == 2
    assert "ReadWriteMany" in no_rwx.err
    (tmp_path / "pgwarden.yaml").write_text(
        "backup: {volume: {class_name: nfs}, schedule: '30 0 2 * * *'}\n"
    )
    seconds = run("k8s", "render")
    assert seconds.code == 2
    assert "at a given second" in seconds.err
    (tmp_path / "pgwarden.yaml").write_text("backup: {s3: {bucket: my-backups}}\n")
    s3_no_image = run("k8s", "render")
    assert s3_no_image.code == 2
    assert "kubernetes.tools_image" in s3_no_image.err
    (tmp_path / "pgwarden.yaml").write_text(
        "backup: {volume: {efs: {file_system_id: fs-0123456789abcdef0}}, keep: 3}\n"
    )
    keep_no_image = run("k8s", "render")
    assert keep_no_image.code == 2
    assert "backup.keep" in keep_no_image.err
    assert "kubernetes.tools_image" in keep_no_image.err


@pytest.mark.parametrize("name", ["efs-backup-keep", "ebs-s3-keep"])
def test_backup_jobs_prune_after_a_backup_that_succeeded(name: str, tmp_path: Path) -> None:
    """With backup.keep / keep_days the job's pod prunes, with pgwarden from the tools image,
    and only once the backup (its init container) has succeeded; the prune reads its own
    pgwarden.yaml from the ConfigMap, with what to keep and no secret."""
    text = CONFIGS.get(name) or CONFIGS["ebs-s3"].replace("schedule:", "keep: 2, schedule:")
    objects = _render(text, tmp_path).objects
    (job,) = [o for o in objects if o["kind"] == "CronJob"]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (backup,) = pod["initContainers"]
    (prune,) = pod["containers"]
    assert prune["image"] == "registry.example.com/pgwarden:1"
    assert prune["command"][0] == "pgwarden"
    assert prune["command"][-2:] == ["backup", "prune"]
    config_file = prune["command"][prune["command"].index("--config") + 1]
    mount = next(m for m in prune["volumeMounts"] if config_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"] == volume["configMap"]["name"]]  # fmt: skip
    job_config = parse_config_text(
        config_map["data"][config_file.rsplit("/", 1)[1]], source="job.yaml"
    )
    if name == "efs-backup-keep":
        assert (job_config.backup.keep, job_config.backup.keep_days) == (7, 14)
        assert job_config.backup.location == "/backup"
        assert backup["command"][-1].endswith("backup.sh")
        assert {m["mountPath"] for m in prune["volumeMounts"]} >= {"/backup", "/scripts"}
    else:
        assert (job_config.backup.keep, job_config.backup.keep_days) == (2, None)
        assert job_config.backup.s3 is not None
        assert backup["command"][-2:] == ["backup", "create"]
        env = {e["name"]: e for e in prune["env"]}
        assert "valueFrom" in env["AWS_SECRET_ACCESS_KEY"]  # from the Secret


def test_statefulset_backups_to_s3_run_pgwarden_from_the_tools_image(tmp_path: Path) -> None:
    """backup.s3 with the statefulset flavor: the server runs the tools image and archives
    with pgwarden's own command; a CronJob runs `pgwarden backup create` against the server
    from the same image. The keys come from the Secret; the ConfigMap says where, not how."""
    rendered = _render(CONFIGS["ebs-s3"], tmp_path)
    by_kind: dict[str, list[Any]] = {}
    for obj in rendered.objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    conf = next(o for o in by_kind["ConfigMap"] if o["metadata"]["name"] == "postgres-config")
    text = conf["data"]["postgresql.conf"]
    assert "archive_mode = 'on'" in text
    assert (
        "archive_command = 'python3 -m pgwarden.backup.walcmd push "
        "/etc/pgwarden-backup/location.json %p'" in text
    )
    where = next(o for o in by_kind["ConfigMap"] if o["metadata"]["name"] == "postgres-backup-s3")
    location = json.loads(where["data"]["location.json"])
    assert location == {"bucket": "my-backups", "prefix": "pg/prod", "endpoint_url": None,
                        "region": None}  # fmt: skip
    job_config = parse_config_text(where["data"]["pgwarden.yaml"], source="job.yaml")
    assert job_config.backup.s3 is not None
    assert (job_config.backup.s3.bucket, job_config.backup.s3.prefix) == ("my-backups", "pg/prod")

    (sts,) = by_kind["StatefulSet"]
    (server,) = sts["spec"]["template"]["spec"]["containers"]
    assert server["image"] == "registry.example.com/pgwarden:1"
    env = {e["name"]: e for e in server["env"]}
    for name, key in (("AWS_ACCESS_KEY_ID", "ACCESS_KEY_ID"),
                      ("AWS_SECRET_ACCESS_KEY", "ACCESS_SECRET_KEY")):  # fmt: skip
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": "backup-s3-credentials", "key": key,
        }  # fmt: skip
    assert {"name": "backup-s3", "mountPath": "/etc/pgwarden-backup", "readOnly": True} in (
        server["volumeMounts"]
    )

    (job,) = by_kind["CronJob"]
    assert job["spec"]["schedule"] == "15 3 * * *"
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/pgwarden:1"
    assert container["command"][-2:] == ["backup", "create"]
    dsn = container["command"][container["command"].index("--dsn") + 1]
    assert "password" not in dsn
    job_env = {e["name"]: e for e in container["env"]}
    assert "value" not in job_env["PGPASSWORD"]
    assert "value" not in job_env["AWS_SECRET_ACCESS_KEY"]
    (policy,) = by_kind["NetworkPolicy"]
    assert any(
        "podSelector" in source for rule in policy["spec"]["ingress"] for source in rule["from"]
    )
    assert "no backups" not in " ".join(rendered.warnings)


def test_wal_capture_runs_a_consumer_in_the_cluster(run: Run, tmp_path: Path) -> None:
    """history.capture: wal in Kubernetes: the consumer is a container of the statefulset's pod
    (on the pod's socket, no password) or, with cloudnative-pg, a Deployment on the primary's
    Service as a REPLICATION role, with logical slots following failovers. Without an image
    that holds pgwarden it is refused, before anything is rendered."""
    sts = next(
        o for o in _render(CONFIGS["ebs-wal"], tmp_path).objects if o["kind"] == "StatefulSet"
    )
    containers = {c["name"]: c for c in sts["spec"]["template"]["spec"]["containers"]}
    sidecar = containers["history-consumer"]
    assert sidecar["image"] == "registry.example.com/pgwarden:0.1.0"
    assert sidecar["command"][-3:] == ["history", "follow", "--wait"]
    assert {"name": "run", "mountPath": "/var/run/postgresql"} in sidecar["volumeMounts"]
    assert not any("valueFrom" in e or "PASSWORD" in e["name"] for e in sidecar["env"])

    objects = _render(CONFIGS["cnpg-wal"], tmp_path).objects
    cluster = next(o for o in objects if o["kind"] == "Cluster")
    ha = cluster["spec"]["replicationSlots"]["highAvailability"]
    assert ha["synchronizeLogicalDecoding"] is True
    role = next(r for r in cluster["spec"]["managed"]["roles"] if r["name"] == "pgwarden_consumer")
    assert role["replication"] is True
    assert role["inRoles"] == ["pgwarden_owner"]
    assert role["comment"] != "managed by pgwarden"  # outside access's scope: apply keeps it
    refs = cluster["spec"]["bootstrap"]["initdb"]["postInitApplicationSQLRefs"]["configMapRefs"]
    assert [r["key"] for r in refs] == [
        "005-pgwarden-01.sql",  # the publication, then the slot: each in a query of its own
        "005-pgwarden-02.sql",
        "010-pgwarden.sql",
    ]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "host=postgres-rw " in env["PGWARDEN_DSN"]["value"]
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "postgres-role-pgwarden-consumer"
    )

    (tmp_path / "pgwarden.yaml").write_text("history: {tables: ['public.*'], capture: wal}\n")
    refused = run("k8s", "render")
    assert refused.code == 2
    assert "kubernetes.tools_image" in refused.err
    assert "Traceback" not in refused.err
