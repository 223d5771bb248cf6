"""Checks of the gateway's contract that openapi.yaml cannot state, run by
.ci/schemathesis.sh beside schemathesis' own (DESIGN.md, "Headers" and
"Error body")."""

import re

import schemathesis

TRACE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
GENERATED = re.compile(r"[0-9a-f]{32}")
TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})"
    r"-[0-9a-f]{2}(?P<rest>-.*)?"
)


def sent_header(response, name):
    """The request's header value as the gateway read it (surrounding
    spaces and tabs are not part of a field value, RFC 9110 §5.5)."""
    value = response.request.headers.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.strip(" \t")


def traceparent_trace_id(value):
    """The trace-id of a valid W3C traceparent, else None."""
    match = TRACEPARENT.fullmatch(value or "")
    if not match:
        return None
    version, trace, parent = match["version"], match["trace"], match["parent"]
    if version == "ff" or set(trace) == {"0"} or set(parent) == {"0"}:
        return None
    if version == "00" and match["rest"] is not None:
        return None
    return trace


@schemathesis.check
def trace_id_is_kept_and_matches_the_body(ctx, response, case):
    """X-Traceid: one on every response; a valid inbound X-Traceid is kept,
    else a valid traceparent's trace-id, else a generated one (32 lowercase
    hex); an error body's traceId is the same."""
    values = response.headers.get("x-traceid") or []
    assert len(values) == 1, f"expected one X-Traceid, got {values}"
    returned = values[0]
    inbound = sent_header(response, "X-Traceid")
    parent = traceparent_trace_id(sent_header(response, "traceparent"))
    if inbound is not None and TRACE_ID.fullmatch(inbound):
        assert returned == inbound, f"X-Traceid {inbound!r} was not kept: {returned!r}"
    elif parent is not None:
        assert returned == parent, f"traceparent's trace-id {parent} was not used: {returned!r}"
    else:
        assert GENERATED.fullmatch(returned), f"generated X-Traceid {returned!r} is not 32 hex"
    if response.status_code >= 400:
        trace_id = response.json().get("traceId")
        assert trace_id == returned, f"body traceId {trace_id!r} != X-Traceid {returned!r}"
