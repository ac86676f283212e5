"""The refusal kinds are declared once (fastgw.verdicts) and read everywhere else:
metrics, events and the README's tables list exactly them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastgw.observe import events, metrics
from fastgw.identity import AuthError
from fastgw.verdicts import HANDSHAKE_LIMIT, KINDS, REJECT_REASONS, STATUSES, Refusal

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else len(README)]


def test_the_readme_refusal_table_lists_exactly_the_statuses_of_the_kinds():
    rows = [line for line in section("## The contract for refusals and closes").splitlines()
            if line.startswith("| ") and not line.startswith("| situation")]
    client_gets = [row.split(" | ")[1] for row in rows]
    documented = {int(s) for cell in client_gets for s in re.findall(r"HTTP (\d{3})", cell)}
    assert documented == STATUSES
    assert STATUSES == {s for kind in KINDS.values() for s in kind.statuses}


def test_the_readme_metrics_table_lists_exactly_the_kinds():
    row = next(line for line in section("### Metrics").splitlines()
               if line.startswith("| `fastgw_upgrades_rejected_total`"))
    labels = row.split("`reason`:", 1)[1]
    assert set(re.findall(r"`([a-z_]+)`", labels)) == set(REJECT_REASONS) | {HANDSHAKE_LIMIT}


def test_metrics_and_events_read_the_kinds_from_one_place():
    assert metrics.REJECT_REASONS is REJECT_REASONS
    assert events.REJECT_REASONS is REJECT_REASONS
    assert events.RejectReason.__args__ == REJECT_REASONS
    assert "timeout" in REJECT_REASONS and "internal" in REJECT_REASONS


@pytest.mark.parametrize("status, kind, blame", [
    (400, "bad_request", "client"), (405, "bad_request", "client"), (426, "bad_request", "client"),
    (431, "bad_request", "client"), (404, "not_found", "client"), (401, "unauthorized", "client"),
    (403, "forbidden", "client"), (408, "timeout", "client"), (503, "capacity", "gateway"),
    (500, "internal", "gateway"), (502, "upstream_error", "backend"),
    (504, "upstream_timeout", "backend"),
])
def test_a_status_with_one_kind_gets_it_and_its_blame(status, kind, blame):
    refusal = Refusal(status, "why")
    assert (refusal.kind, refusal.blame, refusal.headers, refusal.api, refusal.client) == (
        kind, blame, [], None, None)


def test_a_status_of_several_kinds_needs_one_named_and_a_kind_its_own_status():
    with pytest.raises(ValueError):
        Refusal(429, "too many")
    assert Refusal(429, "too many", kind="count_limit").kind == "count_limit"
    assert Refusal(429, "too many", [("Retry-After", "1")], kind="rate_limit").headers == [
        ("Retry-After", "1")]
    with pytest.raises(ValueError):
        Refusal(503, "no", kind="rate_limit")
    with pytest.raises(ValueError):
        Refusal(418, "teapot")


def test_identity_refusals_are_refusals():
    err = AuthError(401, "missing API key", [("WWW-Authenticate", "ApiKey")])
    assert isinstance(err, Refusal) and (err.kind, err.blame) == ("unauthorized", "client")
