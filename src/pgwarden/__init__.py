"""pgwarden: a PostgreSQL that loses no data, remembers every change and guards its schema."""

from pgwarden.config import Config, load_config
from pgwarden.errors import PgwardenError, UserError

__version__ = "0.1.0"

__all__ = ["Config", "PgwardenError", "UserError", "__version__", "load_config"]
