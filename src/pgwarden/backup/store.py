"""Where backups live: a directory or an S3 bucket, behind the few operations a repository needs.

Keys are '/'-separated paths under the location ("wal/000000010000000000000003",
"backups/<label>/pgwarden-backup.json"). Two promises matter for an archive, and both stores
keep them: `put_new` never replaces a different file of the same name (the same content counts
as success, so a retried archive_command is harmless), and `write` replaces a small metadata
file whole or not at all.

S3 goes through boto3 with the usual AWS credential chain (environment, shared files, instance
or pod role); `endpoint_url` points it at an S3-compatible store. boto3 is imported only when an
S3 location is used: `pip install 'pgwarden[s3]'`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pgwarden.errors import UserError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class ArchiveConflict(UserError):
    """A different file of the same name is already in the location: never overwritten."""


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    modified: datetime


class Readable(Protocol):
    """A stream read once, front to back (pg_basebackup's output on its way)."""

    def read(self, size: int = -1, /) -> bytes: ...


class Store(Protocol):
    @property
    def where(self) -> str:
        """The location as a user wrote it, for messages."""
        ...

    def read(self, key: str) -> bytes | None: ...

    def write(self, key: str, data: bytes) -> None: ...

    def put_new(self, key: str, source: Path) -> bool:
        """Store a file under a new name; False when the same content is already there."""
        ...

    def upload(self, key: str, source: Readable) -> None:
        """Store a (possibly large) stream of a backup being written, read to its end."""
        ...

    def fetch(self, key: str, dest: Path) -> bool:
        """Copy one object to a local file; False when there is none."""
        ...

    def reading(self, key: str) -> contextlib.AbstractContextManager[Readable | None]:
        """One object as a stream read front to back (a backup's tar, unpacked as it comes,
        with no copy of it on disk); None when there is none."""
        ...

    def entries(self, prefix: str) -> list[Entry]: ...

    def children(self, prefix: str) -> list[str]:
        """The names one level below a prefix ("backups/" → the labels)."""
        ...

    def delete(self, keys: list[str]) -> None: ...

    def delete_tree(self, prefix: str) -> None: ...


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return sha256_of(a) == sha256_of(b)


@dataclass(frozen=True)
class DirStore:
    root: Path

    @property
    def where(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def put_new(self, key: str, source: Path) -> bool:
        path = self.path(key)
        if path.exists():
            if _same_file(path, source):
                return False
            raise ArchiveConflict(f"{path} already exists with other content; not overwritten")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.copyfile(source, tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if a file of that name appeared meanwhile
        except FileExistsError:
            tmp.unlink()
            return self.put_new(key, source)
        tmp.unlink()
        return True

    def upload(self, key: str, source: Readable) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)

    @contextlib.contextmanager
    def reading(self, key: str) -> Iterator[Readable | None]:
        try:
            handle = self.path(key).open("rb")
        except FileNotFoundError:
            yield None
            return
        with handle:
            yield handle

    def fetch(self, key: str, dest: Path) -> bool:
        try:
            shutil.copyfile(self.path(key), dest)
        except FileNotFoundError:
            return False
        return True

    def entries(self, prefix: str) -> list[Entry]:
        base = self.path(prefix.rstrip("/")) if prefix else self.root
        found: list[Entry] = []
        if not base.is_dir():
            return found
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath) / name
                try:
                    stat = full.stat()
                except OSError:
                    continue
                key = full.relative_to(self.root).as_posix()
                found.append(Entry(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        return found

    def children(self, prefix: str) -> list[str]:
        base = self.path(prefix.rstrip("/"))
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix.rstrip("/")), ignore_errors=True)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> S3Location:
        return cls(
            bucket=str(data["bucket"]),
            prefix=str(data.get("prefix") or ""),
            endpoint_url=data.get("endpoint_url"),
            region=data.get("region"),
        )

    @classmethod
    def load(cls, path: Path) -> S3Location:
        return cls.from_json(json.loads(path.read_text()))


def _s3_client(location: S3Location) -> S3Client:
    try:
        import boto3  # noqa: PLC0415  (optional dependency, only for S3 locations)
        from botocore.config import Config as BotoConfig  # noqa: PLC0415
    except ImportError:
        raise UserError(
            f"backup location {location.where} needs boto3, which is not installed",
            hint="pip install 'pgwarden[s3]'",
        ) from None
    return boto3.client(
        "s3",
        endpoint_url=location.endpoint_url,
        region_name=location.region or os.environ.get("AWS_REGION") or "us-east-1",
        config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}),
    )


@dataclass
class S3Store:
    location: S3Location
    _client: Any = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return self.location.where

    @property
    def client(self) -> S3Client:
        if self._client is None:
            self._client = _s3_client(self.location)
        return self._client  # type: ignore[no-any-return]

    def _key(self, key: str) -> str:
        prefix = self.location.prefix.strip("/")
        return f"{prefix}/{key}" if prefix else key

    def _call(self, what: str, func: Any, **kwargs: Any) -> Any:
        """One S3 request, with the errors a user can fix said as such."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            return func(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._said(what, exc) from None

    def _said(self, what: str, exc: Exception) -> Exception:
        """A UserError for what the user can fix (credentials, bucket, rights, endpoint); the
        error itself otherwise."""
        from botocore.exceptions import BotoCoreError, NoCredentialsError  # noqa: PLC0415

        if isinstance(exc, NoCredentialsError):
            return UserError(
                f"{self.where}: no AWS credentials found",
                hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the "
                "environment pgwarden runs in (never in pgwarden.yaml), or use an instance role",
            )
        if isinstance(exc, BotoCoreError):
            return UserError(
                f"{self.where}: cannot {what}: {exc}",
                hint="check backup.s3.endpoint_url and the network",
            )
        code = _code(exc)
        if code == "NoSuchBucket" or (code == "404" and what == "reach the bucket"):
            return UserError(
                f"{self.where}: bucket {self.location.bucket} does not exist",
                hint="create it (pgwarden never creates buckets), or fix backup.s3.bucket",
            )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return UserError(
                f"{self.where}: access denied while trying to {what} ({code})",
                hint="check the credentials in the environment and the bucket's policy",
            )
        return exc

    def _pages(self, what: str, prefix: str, **extra: Any) -> list[Any]:
        """Every page of a listing under `prefix` (a key of ours, prefix included)."""
        paginator = self.client.get_paginator("list_objects_v2")
        return self._call(  # type: ignore[no-any-return]
            what,
            lambda: list(paginator.paginate(Bucket=self.location.bucket, Prefix=prefix, **extra)),
        )

    def check_reachable(self) -> None:
        self._call("reach the bucket", self.client.head_bucket, Bucket=self.location.bucket)

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            return self.client.head_object(  # type: ignore[return-value]
                Bucket=self.location.bucket, Key=self._key(key)
            )
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise self._said("look up " + key, exc) from None

    @contextlib.contextmanager
    def reading(self, key: str) -> Iterator[Readable | None]:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            got = self.client.get_object(Bucket=self.location.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                yield None
                return
            raise self._said("read " + key, exc) from None
        body = got["Body"]
        try:
            yield _Body(body, self, key)
        finally:
            with contextlib.suppress(BotoCoreError, OSError):
                body.close()

    def read(self, key: str) -> bytes | None:
        with self.reading(key) as body:
            return None if body is None else body.read()

    def write(self, key: str, data: bytes) -> None:
        # A single PUT replaces an object atomically: readers see the old one or the new one.
        self._call(
            "write " + key, self.client.put_object,
            Bucket=self.location.bucket, Key=self._key(key), Body=data,
        )  # fmt: skip

    def put_new(self, key: str, source: Path) -> bool:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        digest = sha256_of(source)
        existing = self._head(key)
        if existing is not None:
            return self._same_as(key, existing, digest, source)
        try:
            with source.open("rb") as body:
                # If-None-Match: S3 refuses the PUT when the key appeared since the HEAD.
                self.client.put_object(
                    Bucket=self.location.bucket, Key=self._key(key), Body=body,
                    Metadata={"sha256": digest}, IfNoneMatch="*",
                )  # fmt: skip
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                again = self._head(key)
                if again is not None:
                    return self._same_as(key, again, digest, source)
            raise self._said("store " + key, exc) from None
        return True

    def _same_as(self, key: str, head: dict[str, Any], digest: str, source: Path) -> bool:
        recorded = (head.get("Metadata") or {}).get("sha256")
        if recorded is None and int(head.get("ContentLength", -1)) == source.stat().st_size:
            # Not written by pgwarden: compare the content itself.
            body = self.read(key) or b""
            recorded = hashlib.sha256(body).hexdigest()
        if recorded == digest:
            return False
        raise ArchiveConflict(
            f"{self.where}/{key} already exists with other content; not overwritten"
        )

    def upload(self, key: str, source: Readable) -> None:
        # A stream that cannot seek: boto3 reads it in parts (8 MiB, a few in memory at once)
        # and sends them as a multipart upload, aborted if anything fails.
        self._call(
            "upload " + key, self.client.upload_fileobj,
            Fileobj=source, Bucket=self.location.bucket, Key=self._key(key),
        )  # fmt: skip

    def fetch(self, key: str, dest: Path) -> bool:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            self.client.download_file(self.location.bucket, self._key(key), str(dest))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise self._said("fetch " + key, exc) from None
        return True

    def entries(self, prefix: str) -> list[Entry]:
        strip = len(self._key(""))
        return [
            Entry(item["Key"][strip:], int(item["Size"]), item["LastModified"])
            for page in self._pages("list " + prefix, self._key(prefix))
            for item in page.get("Contents", [])
        ]

    def children(self, prefix: str) -> list[str]:
        base = self._key(prefix)
        return sorted(
            common["Prefix"][len(base) :].rstrip("/")
            for page in self._pages("list " + prefix, base, Delimiter="/")
            for common in page.get("CommonPrefixes", [])
        )

    def delete_tree(self, prefix: str) -> None:
        self.delete([e.key for e in self.entries(prefix.rstrip("/") + "/")])

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # S3's limit per request
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call(
                "delete", self.client.delete_objects,
                Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True},
            )  # fmt: skip


_MISSING = ("404", "NoSuchKey", "NotFound")


class _Body:
    """An object's body as it downloads, with a dropped connection said as the store's error."""

    def __init__(self, body: Any, store: S3Store, key: str) -> None:
        self.body, self.store, self.key = body, store, key

    def read(self, size: int = -1, /) -> bytes:
        from botocore.exceptions import BotoCoreError  # noqa: PLC0415

        try:
            return bytes(self.body.read(None if size < 0 else size))
        except BotoCoreError as exc:
            raise self.store._said("read " + self.key, exc) from None


def _code(exc: Any) -> str:
    """An S3 error's code ("NoSuchKey", "404", …)."""
    return str(exc.response.get("Error", {}).get("Code", ""))
