"""Recipe tests: what each recipe renders and which service each file notifies, checked
by the real `nginx -t` and supervisord's own parser; no service runs."""
