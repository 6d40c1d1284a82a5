"""Schemathesis hooks for Conveyor's API (SCHEMATHESIS_HOOKS=this file).

The OpenAPI description names one string format of its own, `http-url`: the
URL an `http` job calls, which the API checks with a real URL parser (as the
worker will use it). Schemathesis cannot know that grammar, so valid ones are
generated here: a host name, IPv4 or IPv6 address, maybe a port, a path and
a query.
"""

import schemathesis
from hypothesis import strategies as st

label = st.from_regex(r"\A[a-z][a-z0-9]{0,10}\Z")
hosts = st.one_of(
    st.lists(label, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda parts: ".".join(map(str, parts))),
    st.sampled_from(["localhost", "[::1]", "[2001:db8::8a2e:370:7334]", "[::ffff:127.0.0.1]"]),
)
ports = st.one_of(st.just(""), st.integers(1, 65535).map(lambda port: f":{port}"))
paths = st.from_regex(r"\A(/[A-Za-z0-9._~%-]{0,12}){0,3}(\?[a-z]{1,5}=[A-Za-z0-9]{0,8})?\Z")

schemathesis.openapi.format(
    "http-url",
    st.builds(lambda host, port, path: f"http://{host}{port}{path}", hosts, ports, paths),
)
