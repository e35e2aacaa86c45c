"""The Grafana dashboards' PromQL, checked by Prometheus itself (Debian's `prometheus` package).

Notable:
- every panel query is made concrete as Grafana would send it: `$__rate_interval` becomes a window and
  each template variable its "All" value, then `promtool check rules` parses them (fast, no server)
- the live check, every serving panel returning data from a real Prometheus scraping `nanochat serve`, is in
  tests/system/test_serve_ray.py, on that file's server
- the training dashboard needs a training run's gauges (MFU only exists on GPUs), so only its syntax is
  checked here; tests/deploy/test_helm.py checks that it queries exactly what services/telemetry.py exports
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.dashboards import dashboard, panel_queries


def test_every_panel_query_is_concrete_after_substitution():
    for name in ("serving", "training"):
        for title, expr in panel_queries(dashboard(name)):
            assert "$" not in expr, f"{name}/{title}: unresolved variable in {expr}"


def test_every_panel_query_parses_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    exprs = [expr for name in ("serving", "training") for _, expr in panel_queries(dashboard(name))]
    rules = [{"record": f"nanochat:check_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
