"""The web interface of the auth service: pages, sessions, the usage chart."""
