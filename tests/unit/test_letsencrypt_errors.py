"""What the operator reads for each ACME problem type.

Pebble 2.4 produces connection, DNS, contact and identifier problems (see
test_letsencrypt.py) but never CAA or rate limits, so the translation table is checked
here on the problem documents Let's Encrypt sends.
"""

from __future__ import annotations

import pytest
from acme import messages

from appliance import letsencrypt
from appliance.errors import ApplianceError


def problem(code: str, detail: str, identifier: str | None = None) -> messages.Error:
    extra = {}
    if identifier is not None:
        extra["identifier"] = messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=identifier)
    return messages.Error.with_code(code, detail=detail, **extra)


@pytest.mark.parametrize(
    "acme_problem, error_class, expected",
    [
        (
            problem("caa", "CAA record for registry.example.com prevents issuance"),
            letsencrypt.CAAForbidden,
            "The DNS CAA records of registry.example.com forbid this CA from issuing: CAA "
            "record for registry.example.com prevents issuance. Add a CAA record allowing it "
            '(for Let\'s Encrypt: 0 issue "letsencrypt.org") or remove the restriction.',
        ),
        (
            problem(
                "rateLimited",
                "too many certificates already issued for this exact set "
                "of domains in the last 168h0m0s",
            ),
            letsencrypt.RateLimited,
            "The CA rate-limited the order for registry.example.com: too many certificates "
            "already issued for this exact set of domains in the last 168h0m0s. Wait before "
            "retrying (the renewer retries on its own schedule); use the staging directory "
            "for tests.",
        ),
        (
            problem(
                "connection",
                "203.0.113.7: Timeout during connect (likely firewall problem)",
                identifier="registry.example.com",
            ),
            letsencrypt.ChallengeFailed,
            "The CA could not validate registry.example.com: 203.0.113.7: Timeout during "
            "connect (likely firewall problem). Check that registry.example.com resolves "
            "(DNS A/AAAA records) to this host, that port 80 is reachable from the internet, "
            "and that http://registry.example.com/.well-known/acme-challenge/ is served from "
            "the appliance's ACME webroot (no redirect or other proxy in front).",
        ),
        (
            problem(
                "unauthorized",
                "Invalid response from http://registry.example.com/"
                ".well-known/acme-challenge/abc: 404",
            ),
            letsencrypt.ChallengeFailed,
            "The CA could not validate registry.example.com: Invalid response",
        ),
        (
            problem("dns", "no valid A records found for registry.example.com"),
            letsencrypt.ChallengeFailed,
            "resolves (DNS A/AAAA records) to this host",
        ),
        (
            problem("rejectedIdentifier", "Domain name is an internal name"),
            letsencrypt.IdentifierRejected,
            "The CA will not issue a certificate for registry.example.com: Domain name is an "
            "internal name. Use a public DNS name",
        ),
        (
            problem("invalidContact", 'contact email "root@localhost" has invalid domain'),
            letsencrypt.AccountRejected,
            'The CA refused the account contact address: contact email "root@localhost" has '
            "invalid domain. Check letsencrypt.contact_emails.",
        ),
        (
            problem("externalAccountRequired", "EAB required"),
            letsencrypt.AccountRejected,
            "requires external account binding, which this appliance does not support",
        ),
        (
            problem("serverInternal", "The service is down for maintenance.\n"),
            letsencrypt.IssuanceError,
            "The ACME server refused the order for registry.example.com: The service is down "
            "for maintenance.",
        ),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_each_problem_type_says_what_to_check(acme_problem, error_class, expected):
    error = letsencrypt.error_for_problem(acme_problem, "registry.example.com")
    assert type(error) is error_class
    assert isinstance(error, ApplianceError)
    assert expected in str(error)
