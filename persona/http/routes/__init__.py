"""The server's routes, one ``APIRouter`` per group: completions, models, admin (health, metrics, schema)."""
