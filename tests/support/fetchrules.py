"""The model-fetch rules relaxed for test HTTP servers on 127.0.0.1: an explicit opt-in per test."""

LOOPBACK_FETCH = {"KILN_FETCH_ALLOW_HTTP": "1", "KILN_FETCH_ALLOW_PRIVATE": "1", "KILN_FETCH_REQUIRE_SHA256": "0"}
"""Plain http, a loopback address and no sha256, as an admin's policy could allow; tests/server/test_fetchguard.py
runs the strict defaults."""
