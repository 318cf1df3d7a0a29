"""The whole appliance, or the token service, as real processes under temporary roots on
free loopback ports (nginx, registry, supervisord, gunicorn, pebble, skopeo, oras, moto)."""
