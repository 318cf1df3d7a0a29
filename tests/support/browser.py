"""Debian's chromium, headless, driven through Debian's chromedriver by Selenium.

Each browser gets a fresh profile (`--user-data-dir`) and a HOME of its own, whose NSS
database trusts the appliance's certificate (certutil from libnss3-tools): pages load
over real TLS with verification on, as a user's browser that trusts the host would.
Nothing is downloaded: Selenium is given the driver's path, so its driver manager never
runs.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
AXE = Path(__file__).resolve().parents[2] / ".cache/npm/node_modules/axe-core/axe.min.js"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
)


def trust_certificate(home: Path, certificate: Path) -> str:
    """Make the NSS database under `home` trust `certificate` (chromium on Linux reads
    ~/.pki/nssdb); returns how: 'nss' when certutil did it, else the SPKI pin flag's
    value for --ignore-certificate-errors-spki-list (this one key only)."""
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    certutil = shutil.which("certutil")
    if certutil:
        subprocess.run(
            [certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                certutil,
                "-d",
                f"sql:{nssdb}",
                "-A",
                "-n",
                "appliance",
                "-t",
                "CP,,",
                "-i",
                str(certificate),
            ],
            check=True,
            capture_output=True,
        )
        return "nss"
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def start_browser(
    workdir: Path, certificate: Path, pin_only: bool = False, javascript: bool = True
):
    """A headless chromium WebDriver with its own profile and HOME under `workdir`;
    `javascript=False` switches scripts off (the pages must still read)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    home = workdir / "home"
    profile = workdir / "profile"
    home.mkdir(parents=True, exist_ok=True)
    trust = "pin" if pin_only else trust_certificate(home, certificate)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    if trust != "nss":
        pin = trust if trust != "pin" else trust_certificate_pin(certificate)
        options.add_argument(f"--ignore-certificate-errors-spki-list={pin}")
    service = Service(
        executable_path=str(CHROMEDRIVER),
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        log_output=str(workdir / "chromedriver.log"),
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    return driver


def trust_certificate_pin(certificate: Path) -> str:
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()
