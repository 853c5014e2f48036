"""archive_command and restore_command for object-store locations.

PostgreSQL runs `python -m pgwarden.backup.walcmd push <location.json> %p` for every finished
WAL segment and timeline history file, and `... get <location.json> %f %p` during recovery.
Exit 0 means stored (or already there, identical); anything else makes PostgreSQL keep the
file and retry, which `pg_stat_archiver` (and so `pgwarden status`) shows as a failure. A
different file of the same name is never overwritten. Messages go to stderr: the server log.

Kept small on purpose: it starts once per segment, so it imports only what it needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgwarden.backup.repo import Repository
from pgwarden.backup.store import S3Location, S3Store
from pgwarden.errors import PgwardenError


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("push", "get"):
        print("usage: walcmd push LOCATION.json PATH | get LOCATION.json NAME PATH",
              file=sys.stderr)  # fmt: skip
        return 64
    repo = Repository(S3Store(S3Location.load(Path(argv[1]))))
    try:
        if argv[0] == "push":
            repo.put_wal(Path(argv[2]))
            return 0
        name, dest = argv[2], Path(argv[3])
        tmp = dest.with_name(dest.name + ".pgwarden-partial")
        if not repo.fetch_wal(name, tmp):
            tmp.unlink(missing_ok=True)
            return 1  # not archived (yet): the normal end of archive recovery
        tmp.replace(dest)
        return 0
    except PgwardenError as exc:
        print(f"pgwarden walcmd {argv[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
