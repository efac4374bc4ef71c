"""Hypothesis strategies for hostile MQTT payloads: what passes a naive validator and
explodes later (CONTRACT.md 4.14).

Payloads are built as JSON *text*, because the worst inputs (NaN, 5,000-digit integers,
lone surrogate escapes, 3,000 levels of nesting) cannot be produced by json.dumps.
A document is a status event, location fix, profile or assignment in which any field,
at any depth, may be replaced by a hostile fragment.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

DATES = [
    "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
    "2024-02-30T00:00:00Z",
    "2024-01-01T25:00:00Z",
    "2024-01-01T00:00:60Z",
    "2024-W01-1T00:00:00Z",
    "2024-01-01T00:00:00+0530",
    "2024-01-01T00:00:00+24:00",
    "20240101T000000Z",
    "2024-01-01",
    "+002024-01-01T00:00:00Z",
    "2999-01-01T00:00:00Z",  # far in the future
]

fragments = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1e-400"]),
    st.integers(20, 6000).map(lambda n: "9" * n),  # huge integer literals
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from(['"\\ud800"', '"a\\udfff"', '"\\udc00\\ud800"', '"\\u0000"', '"x\\u0000y"']),
    # Ids that would forge a log line: C0, DEL, C1 (NEL), U+2028/U+2029 (CONTRACT.md 12).
    st.sampled_from(
        ['"o\\nINFO x"', '"\\r"', '"a\\u001b[31m"', '"\\u007f"', '"\\u0085"', '"\\u2028"']
    ),
    st.integers(1, 4000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(DATES).map(json.dumps),
    st.sampled_from(["[]", "{}", "true", "false", "null", "0", '""', '"x"', "1.5", "-0"]),
    st.text(max_size=300).map(json.dumps),
    st.text(min_size=200, max_size=2000).map(json.dumps),  # over the length limits
)

PROFILE: dict[str, object] = {
    "full_name": '"Mike Driver"',
    "phone": '"+15559876543"',
    "vehicle": {"color": '"Blue"', "make": '"Toyota"', "model": '"Camry"'},
}
EVENT: dict[str, object] = {
    "event_id": '"e-1"',
    "order_id": '"o-1"',
    "status": '"arrived_at_store"',
    "ts": '"2024-01-15T18:05:00Z"',
    "courier_info": PROFILE,
    "location": {"lat": "40.7", "lng": "-74.0"},
}
FIX: dict[str, object] = {
    "ts": '"2024-01-15T18:05:00Z"',
    "lat": "40.7",
    "lng": "-74.0",
    "accuracy_m": "5",
    "speed_mps": "7.5",
    "heading": "90",
}
ASSIGNMENT: dict[str, object] = {
    "order_id": '"o-1"',
    "courier_id": '"c-1"',
    "pickup": {"lat": "40.7", "lng": "-74.0", "radius_m": "80"},
    "dropoff": {"lat": "40.8", "lng": "-74.1"},
}
TOPICS: dict[str, dict[str, object]] = {
    "couriers/c-1/status": EVENT,
    "couriers/c-1/location": FIX,
    "couriers/c-1/profile": PROFILE,
    "dispatch/assignments": ASSIGNMENT,
}


def _paths(doc: dict[str, object], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in doc.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out


def _render(doc: object) -> str:
    if isinstance(doc, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_render(v)}" for k, v in doc.items()) + "}"
    return str(doc)


def _replace(doc: dict[str, object], path: tuple[str, ...], value: str) -> dict[str, object]:
    out = dict(doc)
    if len(path) == 1:
        out[path[0]] = value
    else:
        inner = out[path[0]]
        out[path[0]] = _replace(inner, path[1:], value) if isinstance(inner, dict) else value
    return out


@st.composite
def hostile_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """(topic, payload): a known kind of message with hostile fragments at any depth."""
    topic = draw(st.sampled_from(sorted(TOPICS)))
    doc: dict[str, object] = dict(TOPICS[topic])
    for path in draw(st.lists(st.sampled_from(_paths(doc)), min_size=1, max_size=3)):
        doc = _replace(doc, path, draw(fragments))
    if draw(st.booleans()):
        doc[draw(st.text(max_size=20))] = draw(fragments)  # an unknown extra field
    text = _render(doc)
    if draw(st.integers(0, 9)) == 0:
        text = draw(fragments)  # not an object at all
    return topic, text.encode("utf-8", "surrogatepass")


any_topic = st.one_of(
    st.sampled_from(sorted(TOPICS)),
    st.text(max_size=60).map(lambda t: f"couriers/{t}/status"),
    st.text(max_size=60),
)
