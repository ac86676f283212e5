"""The cluster section (issue 13): what loads, with its defaults, and what is refused, with the
message ``fastgw check`` prints."""

from __future__ import annotations

import pytest

from fastgw.config import ConfigError, loads

API = """\
apis:
  - name: echo
    path: /echo
    assembly:
      - {policy: count-limit, key: client-ip, max: 10}
      - {policy: websocket-upgrade, target-url: "ws://127.0.0.1:9000/"}
"""


def load(cluster: str):
    return loads("listeners: [{port: 8080}]\n" + cluster + API, "yaml", "gw.yaml")


def error_of(cluster: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(cluster)
    return str(info.value)


def test_the_issues_example_loads_with_its_defaults():
    cl = load("cluster:\n  redis:\n    url: redis://127.0.0.1:6379/0\n    timeout: 50ms\n"
              "  node-id: edge-a\n  lease: 5s\n  refresh: 500ms\n  on-unreachable: hold\n").cluster
    assert (cl.redis.url, float(cl.redis.timeout), cl.node_id, float(cl.lease),
            float(cl.refresh), cl.on_unreachable) == ("redis://127.0.0.1:6379/0", 0.05, "edge-a",
                                                       5.0, 0.5, "hold")
    cl = load("cluster: {redis: {url: 'rediss://r.internal:6380'}}\n").cluster
    assert (cl.node_id, float(cl.lease), float(cl.refresh), cl.on_unreachable,
            float(cl.redis.timeout)) == (None, 5.0, 0.5, "hold", 0.05)
    assert load("").cluster is None


def test_cluster_nodes_and_the_policies_cluster_key():
    cfg = loads("listeners: [{port: 8080}]\ncluster:\n  redis:\n    cluster-nodes:"
                " [redis://10.0.0.1:7000, redis://10.0.0.2:7000]\n"
                + API.replace("max: 10}", "max: 10, cluster: false}"), "yaml", "gw.yaml")
    assert cfg.cluster.redis.cluster_nodes == ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]
    assert cfg.apis[0].assembly[0].cluster is False
    assert load("").apis[0].assembly[0].cluster is True


@pytest.mark.parametrize("cluster, message", [
    ("cluster: {redis: {}}\n", "gw.yaml:2: cluster.redis needs url or cluster-nodes - at `$.cluster.redis`"),
    ("cluster: {redis: {url: 'redis://a', cluster-nodes: ['redis://b']}}\n",
     "gw.yaml:2: cluster.redis needs either url or cluster-nodes (not both) - at `$.cluster.redis`"),
    ("cluster: {redis: {url: 'http://a:6379'}}\n",
     "gw.yaml:2: Invalid Redis URL 'http://a:6379' (the scheme must be redis or rediss)"
     " - at `$.cluster.redis.url`"),
    ("cluster: {redis: {url: 'redis://'}}\n",
     "gw.yaml:2: Invalid Redis URL 'redis://' (missing host) - at `$.cluster.redis.url`"),
    ("cluster: {redis: {url: 'redis://a:99999'}}\n",
     "gw.yaml:2: Invalid Redis URL 'redis://a:99999' (Port out of range 0-65535)"
     " - at `$.cluster.redis.url`"),
    ("cluster: {redis: {cluster-nodes: []}}\n",
     "gw.yaml:2: cluster-nodes must list at least one node - at `$.cluster.redis.cluster-nodes`"),
    ("cluster: {redis: {cluster-nodes: ['redis://a', 'rediss://b']}}\n",
     "gw.yaml:2: cluster-nodes must all be redis:// or all rediss://"
     " - at `$.cluster.redis.cluster-nodes`"),
    ("cluster: {redis: {url: 'redis://a', tls-profile: x}}\n",
     "gw.yaml:2: Unknown tls-profile 'x' (known: none) - at `$.cluster.redis.tls-profile`"),
    ("tls-profiles: {x: {}}\ncluster: {redis: {url: 'redis://a', tls-profile: x}}\n",
     "gw.yaml:3: tls-profile 'x' needs rediss:// - at `$.cluster.redis.tls-profile`"),
    ("cluster: {redis: {url: 'redis://a', timeout: 0}}\n",
     "gw.yaml:2: timeout must be greater than 0 - at `$.cluster.redis.timeout`"),
    ("cluster: {redis: {url: 'redis://a'}, lease: 0}\n",
     "gw.yaml:2: lease must be greater than 0 - at `$.cluster.lease`"),
    ("cluster: {redis: {url: 'redis://a'}, lease: 1s, refresh: 600ms}\n",
     "gw.yaml:2: refresh (0.6s) must be at most half of lease (1s): a share must survive a lost"
     " renewal - at `$.cluster.refresh`"),
    ("cluster: {redis: {url: 'redis://a', timeout: 1s}, refresh: 1s}\n",
     "gw.yaml:2: cluster.redis.timeout (1s) must be less than refresh (1s)"
     " - at `$.cluster.redis.timeout`"),
    ("cluster: {redis: {url: 'redis://a'}, on-unreachable: wait}\n",
     "gw.yaml:2: Invalid value 'wait' - expected one of: hold, open, closed"
     " - at `$.cluster.on-unreachable`"),
    ("cluster: {redis: {url: 'redis://a'}, nodeid: a}\n",
     "gw.yaml:2: Object contains unknown field `nodeid` - at `$.cluster`"),
])
def test_refused(cluster, message):
    assert error_of(cluster) == message


def test_fastgw_check_accepts_the_section(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "gw.yaml"
    path.write_text("listeners: [{port: 0}]\ncluster: {redis: {url: 'redis://127.0.0.1:1'}}\n"
                    + API)
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out
    path.write_text("listeners: [{port: 0}]\ncluster: {redis: {url: 'http://127.0.0.1:1'}}\n" + API)
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "$.cluster.redis.url" in out.stderr, out


def test_a_refused_reload_of_the_cluster_section_shows_no_password():
    from fastgw import config as cfgmod
    from fastgw.gateway import _unreloadable
    text = ("listeners: [{port: 0}]\ncluster: {redis: {url: 'redis://user:s3cret@127.0.0.1:6379/0'}}\n"
            + API)
    old = cfgmod.loads(text, "yaml")
    new = cfgmod.loads(text.replace("6379", "6380").replace("s3cret", "other"), "yaml")
    why = _unreloadable(old, new)
    assert why is not None and "cluster" in why and "127.0.0.1:6380" in why
    assert "s3cret" not in why and "other" not in why and "user" not in why


def test_a_bad_redis_url_is_shown_without_its_password():
    from fastgw.config.web import redact_url
    assert redact_url("http://u:pw@h:1/0") == "http://***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("redis://h/a@b") == "redis://h/a@b"          # an @ after the host is kept
    why = error_of("cluster: {redis: {url: 'http://admin:hunter2@127.0.0.1:6379/0'}}\n")
    assert "hunter2" not in why and "admin" not in why and "***@127.0.0.1:6379" in why
