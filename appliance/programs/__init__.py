"""Programs that supervisord runs around a service binary (wrappers and daemons), not recipes."""
