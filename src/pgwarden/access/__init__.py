"""Access control: declarative roles and privileges, and the manager role that owns the schema."""

from pgwarden.access.planner import plan_access
from pgwarden.access.report import access_report

__all__ = ["access_report", "plan_access"]
