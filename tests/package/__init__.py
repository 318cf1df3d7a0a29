"""The deb and rpm packages, built and installed into clean roots (`-m package`, root)."""
