"""Programs supervisord runs: process wrappers and daemons, not recipes."""
