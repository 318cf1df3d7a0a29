"""Unit tests: pure logic and tables; no service of the appliance runs (seconds)."""
