#!/usr/bin/env python3
"""Checks the chart's observability objects as Helm renders them.

Usage: check_monitoring.py WITH_OPERATOR_CRDS.yaml WITHOUT.yaml RULES_OUT.yaml

WITH_OPERATOR_CRDS.yaml is the chart rendered with the monitoring.coreos.com/v1 kinds available:
it must hold a PodMonitor for the agents, a ServiceMonitor on the operator's metrics port and a
PrometheusRule whose spec is the committed rule file (written to RULES_OUT.yaml for promtool).
WITHOUT.yaml, rendered without them, must hold none of those kinds and the rules as a ConfigMap.
Both must carry every dashboard of charts/parallax/dashboards as a ConfigMap the Grafana sidecar
loads, its JSON as committed.
"""

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def objects(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def fail(message):
    sys.exit(f"check_monitoring: {message}")


def dashboards(docs, where):
    committed = {p.name: json.loads(p.read_text()) for p in (ROOT / "charts/parallax/dashboards").glob("*.json")}
    found = {}
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for key, text in d["data"].items():
                found[key.removeprefix("parallax-")] = json.loads(text)
    if found != committed:
        fail(f"{where}: dashboards {sorted(found)} are not the committed {sorted(committed)}")


def main():
    with_crds, without, rules_out = sys.argv[1:4]
    rule_file = yaml.safe_load((ROOT / "charts/parallax/rules/parallax.rules.yaml").read_text())
    docs = objects(with_crds)
    kinds = {d["kind"]: d for d in docs}
    pod_monitor = kinds.get("PodMonitor") or fail("no PodMonitor")
    selector = pod_monitor["spec"]["selector"]["matchExpressions"]
    if selector != [{"key": "parallax.dev/pool", "operator": "Exists"}]:
        fail(f"the PodMonitor selects {selector}")
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    if endpoint["port"] != "http" or endpoint["path"] != "/metrics":
        fail(f"the PodMonitor scrapes {endpoint}")
    relabel = endpoint["relabelings"][0]
    if relabel["targetLabel"] != "pool" or relabel["sourceLabels"] != ["__meta_kubernetes_pod_label_parallax_dev_pool"]:
        fail(f"the pool label comes from {relabel}")
    service = next(d for d in docs if d["kind"] == "Service")
    service_monitor = kinds.get("ServiceMonitor") or fail("no ServiceMonitor")
    ports = [p["name"] for p in service["spec"]["ports"]]
    if service_monitor["spec"]["endpoints"][0]["port"] not in ports:
        fail(f"the ServiceMonitor's port is not one of the operator Service's {ports}")
    if service_monitor["spec"]["selector"]["matchLabels"] != service["spec"]["selector"]:
        fail("the ServiceMonitor does not select the operator's Service")
    rule = kinds.get("PrometheusRule") or fail("no PrometheusRule")
    if rule["spec"] != rule_file:
        fail("the PrometheusRule's spec is not the committed rule file")
    Path(rules_out).write_text(yaml.safe_dump(rule["spec"]))
    dashboards(docs, with_crds)

    plain = objects(without)
    operator_kinds = {"PodMonitor", "ServiceMonitor", "PrometheusRule"} & {d["kind"] for d in plain}
    if operator_kinds:
        fail(f"rendered without the Prometheus Operator, yet holds {operator_kinds}")
    rule_maps = [d for d in plain if d["kind"] == "ConfigMap" and "parallax.rules.yaml" in d.get("data", {})]
    if len(rule_maps) != 1 or yaml.safe_load(rule_maps[0]["data"]["parallax.rules.yaml"]) != rule_file:
        fail("without the Prometheus Operator the rules are not one ConfigMap holding the rule file")
    dashboards(plain, without)
    print("monitoring objects, rules and dashboards render as committed")


if __name__ == "__main__":
    main()
