"""The application commands behind the CLI: promotion, promote/rollback, restart, status, compare,
history."""
