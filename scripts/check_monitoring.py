#!/usr/bin/env python3
"""Checks the chart's observability objects as Helm renders them.

Usage: check_monitoring.py WITH_OPERATOR_CRDS.yaml WITHOUT.yaml RULES_OUT.yaml

WITH_OPERATOR_CRDS.yaml is the chart rendered with the monitoring.coreos.com/v1 kinds available:
it must hold a ServiceMonitor on the operator's metrics port and a PrometheusRule whose spec is
the committed rule file (written to RULES_OUT.yaml for promtool). The agents' PodMonitors are the
operator's (one per pool): the chart renders none, and gives the operator the settings for them
and the right to write them.
WITHOUT.yaml, rendered without them, must hold none of those kinds and the rules as a ConfigMap.
Both must carry every dashboard of charts/parallax/dashboards as a ConfigMap the Grafana sidecar
loads, its JSON as committed.
"""

import json
import re
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


def operator(docs):
    """The operator is told to make the pools' PodMonitors, how, and may write them."""
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    if env.get("PARALLAX_POD_MONITORS") != "auto":
        fail(f"PARALLAX_POD_MONITORS is {env.get('PARALLAX_POD_MONITORS')!r}, not auto")
    if not re.fullmatch(r"(\d+(y|w|d|h|m|s|ms))+", env.get("PARALLAX_POD_MONITOR_INTERVAL") or ""):
        fail(f"PARALLAX_POD_MONITOR_INTERVAL is {env.get('PARALLAX_POD_MONITOR_INTERVAL')!r}")
    labels = json.loads(env.get("PARALLAX_POD_MONITOR_LABELS") or "null")
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        fail(f"PARALLAX_POD_MONITOR_LABELS is {labels!r}, not an object of strings")
    service_monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    if not labels.items() <= service_monitor["metadata"]["labels"].items():
        fail(f"the pools' PodMonitors would be labelled {labels}, unlike the operator's ServiceMonitor")
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    if not any("monitoring.coreos.com" in r.get("apiGroups", []) and "podmonitors" in r.get("resources", [])
               and {"get", "create", "patch", "delete"} <= set(r["verbs"]) for r in role["rules"]):
        fail("the operator's ClusterRole does not let it write PodMonitors")


def main():
    with_crds, without, rules_out = sys.argv[1:4]
    rule_file = yaml.safe_load((ROOT / "charts/parallax/rules/parallax.rules.yaml").read_text())
    docs = objects(with_crds)
    kinds = {d["kind"]: d for d in docs}
    if "PodMonitor" in kinds:
        fail("the chart renders a PodMonitor: the agents' are the operator's, one per pool")
    operator(docs)
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
