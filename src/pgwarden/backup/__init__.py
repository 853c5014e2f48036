"""Backups of the local server: base backups, WAL archiving, restores, retention."""
