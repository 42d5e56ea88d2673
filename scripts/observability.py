#!/usr/bin/env python3
"""Parallax's Grafana dashboards and Prometheus rules, generated from one table of queries.

  scripts/observability.py            write charts/parallax/dashboards/*.json and
                                      charts/parallax/rules/parallax.rules.yaml
  scripts/observability.py --check    fail if the committed files differ from what this writes
  scripts/observability.py --queries NAMESPACE POOL
                                      print every panel query and recording rule, variables
                                      substituted, one JSON object per line: {"dashboard",
                                      "panel", "expr", "source"} — "source" says what must be
                                      scraped for it to have data: "agent", "gpu" (an agent
                                      that watches GPUs), "router" or "operator"

Every series a panel reads carries the labels the pool's PodMonitor gives an agent's and a
router's series — `namespace`, `pool` (from the pod label `app.kubernetes.io/instance`), `pod` —
or, for the operator's
series, the `namespace` and `pool` labels it writes itself. Standard library only.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "charts/parallax/dashboards"
RULES = ROOT / "charts/parallax/rules/parallax.rules.yaml"

# Agent series of the selected pool, and the operator's.
S = 'namespace="$namespace", pool="$pool"'
RATE = "$__rate_interval"


def quantile(q, histogram, by=""):
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{{{S}}}[{RATE}])))"


def panel(title, exprs, unit="short", source="agent", kind="timeseries", legend=None):
    """A panel of one or more (expr, legend) queries."""
    if isinstance(exprs, str):
        exprs = [(exprs, legend or "")]
    return {"title": title, "exprs": exprs, "unit": unit, "source": source, "kind": kind}


DASHBOARD_SPECS = [
    {
        "uid": "parallax-pool-overview",
        "file": "overview",
        "title": "Parallax / Pool overview",
        "panels": [
            panel("Requests/s by outcome", [(f"sum by (finished_reason) (rate(vllm:request_success_total{{{S}}}[{RATE}]))", "{{finished_reason}}")], "reqps"),
            panel("Errors/s by code", [(f"sum by (code) (rate(parallax_request_errors_total{{{S}}}[{RATE}]))", "{{code}}")], "reqps"),
            panel("Groups", [
                ('max by (state) (parallax_operator_pool_groups{namespace="$namespace", pool="$pool"})', "{{state}}"),
                ('max(parallax_operator_autoscaling_desired_replicas{namespace="$namespace", pool="$pool"})', "wanted by the autoscaler"),
            ], source="operator"),
            panel("Agents serving", f"sum(parallax_model_loaded{{{S}}})", kind="stat"),
            panel("Tensor-parallel size", f"max(parallax_tensor_parallel_size{{{S}}})", kind="stat"),
            panel("Queue", [
                (f"sum(vllm:num_requests_waiting{{{S}}})", "waiting"),
                (f"sum(vllm:num_requests_running{{{S}}})", "running"),
            ]),
            panel("End-to-end latency p95", quantile(0.95, "vllm:e2e_request_latency_seconds"), "s", legend="p95"),
            panel("Router: requests sent to groups, by answer", [(f"sum by (outcome) (rate(parallax_router_attempts_total{{{S}}}[{RATE}]))", "{{outcome}}")], "reqps", source="router"),
            panel("Router: groups picked, by why", [(f"sum by (reason) (rate(parallax_router_picks_total{{{S}}}[{RATE}]))", "{{reason}}")], "reqps", source="router"),
            panel("Router: held, and its own answers", [
                (f"sum(parallax_router_held_requests{{{S}}})", "held for a group now"),
                (f"sum by (reason) (rate(parallax_router_rejections_total{{{S}}}[{RATE}]))", "answered per second: {{reason}}"),
            ], source="router"),
            panel("Router: groups ready", f"sum(parallax_router_group_ready{{{S}}})", kind="stat", source="router"),
        ],
    },
    {
        "uid": "parallax-latency",
        "file": "latency",
        "title": "Parallax / Latency",
        "panels": [
            panel("Time to first token", [(quantile(q, "vllm:time_to_first_token_seconds"), f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "s"),
            panel("Inter-token latency", [(quantile(q, "vllm:inter_token_latency_seconds"), f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "s"),
            panel("End-to-end latency", [(quantile(q, "vllm:e2e_request_latency_seconds"), f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "s"),
            panel("Queue time", [(quantile(q, "vllm:request_queue_time_seconds"), f"p{int(q * 100)}") for q in (0.5, 0.95)], "s"),
            panel("Engine step time p95", quantile(0.95, "parallax_step_duration_seconds"), "s", legend="p95"),
            panel("Time to first token p95 by bin", [(quantile(0.95, "parallax_time_to_first_token_seconds", "bin"), "{{bin}}")], "s"),
            panel("Time to first token p95 by priority", [(quantile(0.95, "parallax_time_to_first_token_seconds", "priority"), "{{priority}}")], "s"),
            panel("End-to-end latency p95 by bin and priority", [(quantile(0.95, "parallax_e2e_request_latency_seconds", "bin, priority"), "{{bin}} {{priority}}")], "s"),
            panel("Inter-token latency p95 by bin", [(quantile(0.95, "parallax_inter_token_latency_seconds", "bin"), "{{bin}}")], "s"),
            panel("Queue time p95 by bin and priority", [(quantile(0.95, "parallax_request_queue_time_seconds", "bin, priority"), "{{bin}} {{priority}}")], "s"),
            panel("Waiting by bin and priority", [(f"sum by (bin, priority) (parallax_queue_depth{{{S}}})", "{{bin}} {{priority}}")]),
            panel("Time prediction error p95", quantile(0.95, "parallax_prediction_relative_error"), "percentunit", legend="p95"),
        ],
    },
    {
        "uid": "parallax-throughput",
        "file": "throughput",
        "title": "Parallax / Throughput and batching",
        "panels": [
            panel("Tokens/s", [
                (f"sum(rate(vllm:generation_tokens_total{{{S}}}[{RATE}]))", "output"),
                (f"sum(rate(vllm:prompt_tokens_total{{{S}}}[{RATE}]))", "prompt"),
            ]),
            panel("Sequences per step", [
                (f"sum(rate(parallax_batch_size_sum{{{S}}}[{RATE}])) / sum(rate(parallax_batch_size_count{{{S}}}[{RATE}]))", "mean"),
                (quantile(0.95, "parallax_batch_size"), "p95"),
            ]),
            panel("Batch utilization", [(f"avg(parallax_batch_utilization{{{S}}})", "mean of agents")], "percentunit"),
            panel("Preemptions/s by reason", [(f"sum by (reason) (rate(parallax_preemptions_total{{{S}}}[{RATE}]))", "{{reason}}")]),
            panel("Admissions/s by bin and priority", [(f"sum by (bin, priority) (rate(parallax_admissions_total{{{S}}}[{RATE}]))", "{{bin}} {{priority}}")], "reqps"),
            panel("Refused (429)/s by reason", [(f"sum by (reason) (rate(parallax_rejections_total{{{S}}}[{RATE}]))", "{{reason}}")], "reqps"),
        ],
    },
    {
        "uid": "parallax-kv-cache",
        "file": "kv-cache",
        "title": "Parallax / KV cache",
        "panels": [
            panel("KV cache usage", [(f"max by (pod) (vllm:kv_cache_usage_perc{{{S}}})", "{{pod}}")], "percentunit"),
            panel("Admissions paused by KV pressure", [(f"max by (pod) (parallax_kv_pressure{{{S}}})", "{{pod}}")]),
            panel("Prefix cache hit rate", [(f"sum(rate(vllm:prefix_cache_hits_total{{{S}}}[{RATE}])) / sum(rate(vllm:prefix_cache_queries_total{{{S}}}[{RATE}]))", "hit rate")], "percentunit"),
            panel("Prefix cache blocks", [(f"sum by (state) (parallax_prefix_cache_blocks{{{S}}})", "{{state}}")]),
        ],
    },
    {
        "uid": "parallax-gpus",
        "file": "gpus",
        "title": "Parallax / GPUs",
        "panels": [
            panel("GPU utilization", [(f"max by (pod, gpu) (parallax_gpu_utilization_ratio{{{S}}})", "{{pod}} GPU {{gpu}}")], "percentunit", source="gpu"),
            panel("GPU memory used", [(f"max by (pod, gpu) (parallax_gpu_memory_used_bytes{{{S}}})", "{{pod}} GPU {{gpu}}")], "bytes", source="gpu"),
            panel("GPU temperature", [(f"max by (pod, gpu) (parallax_gpu_temperature_celsius{{{S}}})", "{{pod}} GPU {{gpu}}")], "celsius", source="gpu"),
            panel("GPU power", [(f"max by (pod, gpu) (parallax_gpu_power_watts{{{S}}})", "{{pod}} GPU {{gpu}}")], "watt", source="gpu"),
            panel("Throttled", [(f"max by (pod, gpu, reason) (parallax_gpu_throttled{{{S}}})", "{{pod}} GPU {{gpu}} {{reason}}")], source="gpu"),
            panel("XID errors/s", [(f"sum by (pod, gpu, xid) (rate(parallax_gpu_xid_errors_total{{{S}}}[{RATE}]))", "{{pod}} GPU {{gpu}} XID {{xid}}")], source="gpu"),
            panel("GPU health", [(f"max by (pod, gpu, state) (parallax_gpu_health{{{S}}}) == 1", "{{pod}} GPU {{gpu}} {{state}}")], source="gpu"),
        ],
    },
    {
        "uid": "parallax-scaling",
        "file": "scaling",
        "title": "Parallax / Scaling",
        "panels": [
            panel("Request rate and its forecast", [
                ('max(parallax_operator_autoscaling_signal{namespace="$namespace", pool="$pool", signal="request_rate"})', "seen"),
                ('max(parallax_operator_autoscaling_signal{namespace="$namespace", pool="$pool", signal="forecast"})', "provisioned for (forecast with margin)"),
            ], "reqps", source="operator"),
            panel("Groups wanted and ready", [
                ('max(parallax_operator_autoscaling_desired_replicas{namespace="$namespace", pool="$pool"})', "wanted"),
                ('max(parallax_operator_pool_groups{namespace="$namespace", pool="$pool", state="ready"})', "ready"),
            ], source="operator"),
            panel("Scale decisions by rule", [('sum by (rule) (increase(parallax_operator_autoscaling_decisions_total{namespace="$namespace", pool="$pool"}[1h]))', "{{rule}}")], source="operator"),
            panel("GPU-hours by capacity type", [('sum by (capacity_type) (parallax_operator_gpu_hours_total{namespace="$namespace", pool="$pool"})', "{{capacity_type}}")], source="operator"),
            panel("Forecast error (MAPE) against naive", [
                ('max(parallax_operator_autoscaling_signal{namespace="$namespace", pool="$pool", signal="forecast_mape"})', "forecast"),
                ('max(parallax_operator_autoscaling_signal{namespace="$namespace", pool="$pool", signal="naive_mape"})', "naive"),
            ], "percentunit", source="operator"),
            panel("Rollbacks by signal", [('sum by (signal) (increase(parallax_operator_rollbacks_total{namespace="$namespace", pool="$pool"}[1d]))', "{{signal}}")], source="operator"),
        ],
    },
]

# Recording rules: the heavy queries, per pool.
POOL = "namespace, pool"
RECORDING = [
    ("parallax:request_rate:rate1m", f"sum by ({POOL}) (rate(vllm:request_success_total[1m]))"),
    ("parallax:error_ratio:rate1m", f"sum by ({POOL}) (rate(parallax_request_errors_total[1m])) / (sum by ({POOL}) (rate(vllm:request_success_total[1m])) + sum by ({POOL}) (rate(parallax_request_errors_total[1m])))"),
    ("parallax:ttft_seconds:p95_rate1m", f"histogram_quantile(0.95, sum by ({POOL}, le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))"),
    ("parallax:e2e_seconds:p95_rate1m", f"histogram_quantile(0.95, sum by ({POOL}, le) (rate(vllm:e2e_request_latency_seconds_bucket[1m])))"),
    ("parallax:generation_tokens:rate1m", f"sum by ({POOL}) (rate(vllm:generation_tokens_total[1m]))"),
    ("parallax:requests_waiting:sum", f"sum by ({POOL}) (vllm:num_requests_waiting)"),
    ("parallax:agents_serving:sum", f"sum by ({POOL}) (parallax_model_loaded)"),
]

ALERTS = [
    {
        "alert": "ParallaxPoolNotServing",
        "expr": "parallax:agents_serving:sum == 0",
        "for": "10m",
        "severity": "critical",
        "summary": "Pool {{ $labels.namespace }}/{{ $labels.pool }} has no agent serving",
        "runbook": "No agent of the pool has its model loaded. `kubectl describe ipool -n NAMESPACE POOL`: Ready, Progressing and Degraded say why (a download under way, pods that cannot be scheduled, image pulls, crash loops, an unhealthy GPU); the events name each decision.",
    },
    {
        "alert": "ParallaxAgentDown",
        "expr": 'up{pool!=""} == 0',
        "for": "5m",
        "severity": "warning",
        "summary": "Agent {{ $labels.pod }} of pool {{ $labels.namespace }}/{{ $labels.pool }} does not answer scrapes",
        "runbook": "The agent's /metrics has not answered for 5 minutes: the pod is gone, restarting or its process hangs. `kubectl logs` the pod; `kubectl describe pod` for restarts and OOM kills. A group whose member fails is recreated by the operator (GroupRecreated events).",
    },
    {
        "alert": "ParallaxTimeToFirstTokenHigh",
        "expr": "parallax:ttft_seconds:p95_rate1m > 2",
        "for": "10m",
        "severity": "warning",
        "summary": "p95 time to first token of {{ $labels.namespace }}/{{ $labels.pool }} is over 2 s",
        "runbook": "Requests wait to start. Look at the Latency dashboard's queue time and the Throughput dashboard's 429s: more groups (spec.replicas, or the autoscaler's bounds), or a lower max batch size if steps are long. A rollout in progress also queues requests on fewer groups.",
    },
    {
        "alert": "ParallaxErrorRateHigh",
        "expr": "parallax:error_ratio:rate1m > 0.05",
        "for": "5m",
        "severity": "critical",
        "summary": "More than 5 % of requests to {{ $labels.namespace }}/{{ $labels.pool }} fail",
        "runbook": "parallax_request_errors_total{code} says which error: engine_failure (a request the model fails on, isolated from its batch), gpu_unhealthy (see GPU health), queue_full (saturated), engine_stopped (a device or rank failed: the pod restarts). Agent logs name each failure.",
    },
    {
        "alert": "ParallaxQueueSaturated",
        "expr": "parallax:requests_waiting:sum > 100 or sum by (namespace, pool) (rate(parallax_rejections_total[5m])) > 0",
        "for": "5m",
        "severity": "warning",
        "summary": "Pool {{ $labels.namespace }}/{{ $labels.pool }} queues or refuses requests",
        "runbook": "More than 100 requests wait, or requests are refused with 429 (queue_full, queue_tokens). Add groups (raise maxReplicas if the autoscaler is limited: ScalingLimited), or raise --max-queue-requests if clients can wait.",
    },
    {
        "alert": "ParallaxRequestsFindNoGroup",
        "expr": 'sum by (namespace, pool) (rate(parallax_router_rejections_total{reason="no_group"}[5m])) > 0',
        "for": "5m",
        "severity": "critical",
        "summary": "Requests to {{ $labels.namespace }}/{{ $labels.pool }} find no ready group",
        "runbook": "The pool's router held requests for its hold time and no group became ready: they were answered 503. `kubectl describe ipool -n NAMESPACE POOL`: a pool that scales to zero should have woken (a ScaledUp event, rule wake) — look at its groups' pods (scheduling, image pulls, model download); a running pool has lost every group (GroupRecreated events, unhealthy GPUs). The router's /ready lists each group as it sees it.",
    },
    {
        "alert": "ParallaxKVCachePressure",
        "expr": "max by (namespace, pool, pod) (parallax_kv_pressure) == 1",
        "for": "5m",
        "severity": "warning",
        "summary": "Agent {{ $labels.pod }} pauses admissions: its KV cache is full",
        "runbook": "Admissions pause above 95 % KV cache usage and resume below 85 %. Long prompts or outputs fill it: more groups, a larger tensor-parallel size (more GPU memory per copy), or kvCache.gpuMemoryFraction if the GPU has room.",
    },
    {
        "alert": "ParallaxGpuUnhealthy",
        "expr": 'max by (namespace, pool, pod, gpu, uuid) (parallax_gpu_health{state="unhealthy"}) == 1',
        "for": "1m",
        "severity": "critical",
        "summary": "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) of {{ $labels.pod }} is unhealthy",
        "runbook": "The agent stopped taking requests on this GPU (an XID, ECC errors, or the GPU fell off the bus; its /ready says which). After spec.gpuHealth.unhealthyGraceSeconds the operator recreates the group on another node (GroupRescheduled) and keeps new pods off this one. Drain the node and have the GPU checked.",
    },
]


# promtool unit tests: for each alert, series that make it fire (pool "bad") beside series that
# must not (pool "good"), the time to look, and the labels the alert carries.
def histogram(name, pool, slow_per_min):
    """Series of a latency histogram growing by 10 requests a minute, `slow_per_min` of them
    above 1 s (between 1 and 5 s)."""
    fast = 10 - slow_per_min
    return [
        agent(f"{name}_bucket", pool, f"0+{fast / 2:g}x120", le="1"),
        agent(f"{name}_bucket", pool, "0+5x120", le="5"),
        agent(f"{name}_bucket", pool, "0+5x120", le="+Inf"),
    ]


def agent(name, pool, values, **labels):
    """One agent series of the pool (the labels the chart's PodMonitor gives) and its values."""
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return (f'{name}{{namespace="ml", pool="{pool}", pod="{pool}-0-0"{extra}}}', values)


ALERT_TESTS = {
    "ParallaxPoolNotServing": {
        "series": [agent("parallax_model_loaded", "bad", "0x120"), agent("parallax_model_loaded", "good", "1x120")],
        "eval": "15m",
        "labels": {"namespace": "ml", "pool": "bad"},
    },
    "ParallaxAgentDown": {
        "series": [agent("up", "bad", "0x120"), agent("up", "good", "1x120")],
        "eval": "10m",
        "labels": {"namespace": "ml", "pool": "bad", "pod": "bad-0-0"},
    },
    "ParallaxTimeToFirstTokenHigh": {
        "series": histogram("vllm:time_to_first_token_seconds", "bad", 10)
        + histogram("vllm:time_to_first_token_seconds", "good", 0),
        "eval": "20m",
        "labels": {"namespace": "ml", "pool": "bad"},
    },
    "ParallaxErrorRateHigh": {
        "series": [
            agent("vllm:request_success_total", "bad", "0+5x120"),
            agent("parallax_request_errors_total", "bad", "0+5x120", code="engine_failure"),
            agent("vllm:request_success_total", "good", "0+5x120"),
            agent("parallax_request_errors_total", "good", "0x120", code="engine_failure"),
        ],
        "eval": "15m",
        "labels": {"namespace": "ml", "pool": "bad"},
    },
    "ParallaxQueueSaturated": {
        "series": [
            agent("vllm:num_requests_waiting", "bad", "150x120"),
            agent("vllm:num_requests_waiting", "good", "5x120"),
            agent("parallax_rejections_total", "good", "0x120", reason="queue_full"),
        ],
        "eval": "15m",
        "labels": {"namespace": "ml", "pool": "bad"},
    },
    "ParallaxRequestsFindNoGroup": {
        "series": [
            agent("parallax_router_rejections_total", "bad", "0+3x120", reason="no_group"),
            agent("parallax_router_rejections_total", "good", "0x120", reason="no_group"),
            agent("parallax_router_rejections_total", "good", "0+3x120", reason="saturated"),
        ],
        "eval": "15m",
        "labels": {"namespace": "ml", "pool": "bad"},
    },
    "ParallaxKVCachePressure": {
        "series": [agent("parallax_kv_pressure", "bad", "1x120"), agent("parallax_kv_pressure", "good", "0x120")],
        "eval": "10m",
        "labels": {"namespace": "ml", "pool": "bad", "pod": "bad-0-0"},
    },
    "ParallaxGpuUnhealthy": {
        "series": [
            agent("parallax_gpu_health", "bad", "1x120", gpu="0", uuid="GPU-1", state="unhealthy"),
            agent("parallax_gpu_health", "good", "1x120", gpu="0", uuid="GPU-2", state="healthy"),
            agent("parallax_gpu_health", "good", "0x120", gpu="0", uuid="GPU-2", state="unhealthy"),
        ],
        "eval": "5m",
        "labels": {"namespace": "ml", "pool": "bad", "pod": "bad-0-0", "gpu": "0", "uuid": "GPU-1"},
    },
}
RULE_TESTS = ROOT / "tests/rules/parallax.rules.test.yaml"


def render(template, labels):
    out = template
    for key, value in labels.items():
        out = out.replace("{{ $labels.%s }}" % key, value)
    return out


def rule_tests_yaml():
    lines = [
        "# Generated by scripts/observability.py; do not edit. `promtool test rules` runs it: each",
        "# alert fires for the series of pool \"bad\" and stays quiet for pool \"good\".",
        "rule_files:",
        "  - ../../charts/parallax/rules/parallax.rules.yaml",
        "evaluation_interval: 30s",
        "tests:",
    ]
    for a in ALERTS:
        t = ALERT_TESTS[a["alert"]]
        lines += ["  - interval: 15s", "    input_series:"]
        for series, values in t["series"]:
            lines += [f"      - series: {quote(series)}", f"        values: {quote(values)}"]
        labels = dict(t["labels"], severity=a["severity"])
        lines += [
            "    alert_rule_test:",
            "      - eval_time: 30s",
            f"        alertname: {a['alert']}",
            "        exp_alerts: []",
            f"      - eval_time: {t['eval']}",
            f"        alertname: {a['alert']}",
            "        exp_alerts:",
            "          - exp_labels:",
        ]
        lines += [f"              {k}: {quote(v)}" for k, v in sorted(labels.items())]
        lines += [
            "            exp_annotations:",
            f"              summary: {quote(render(a['summary'], labels))}",
            f"              runbook: {quote(a['runbook'])}",
        ]
    return "\n".join(lines) + "\n"


def grafana_panel(spec, pid, x, y):
    targets = [
        {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
        for i, (expr, legend) in enumerate(spec["exprs"])
    ]
    width = 6 if spec["kind"] == "stat" else 12
    return {
        "id": pid,
        "type": spec["kind"],
        "title": spec["title"],
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
        "options": {},
        "targets": targets,
    }


def dashboard(spec):
    panels, x, y = [], 0, 0
    for pid, p in enumerate(spec["panels"], start=1):
        width = 6 if p["kind"] == "stat" else 12
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(grafana_panel(p, pid, x, y))
        x += width
    variable_query = lambda label, match: {
        "type": "query",
        "name": label,
        "label": label,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": f"label_values({match}, {label})", "refId": f"{label}-values"},
        "definition": f"label_values({match}, {label})",
        "refresh": 2,
        "includeAll": False,
        "multi": False,
        "sort": 1,
    }
    return {
        "uid": spec["uid"],
        "title": spec["title"],
        "tags": ["parallax"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus", "current": {}, "hide": 0},
                variable_query("namespace", "parallax_model_loaded"),
                variable_query("pool", 'parallax_model_loaded{namespace="$namespace"}'),
            ]
        },
        "panels": panels,
        "links": [{"type": "dashboards", "tags": ["parallax"], "asDropdown": True, "title": "Parallax"}],
        "annotations": {"list": []},
    }


def lint(board):
    """What Grafana needs of a dashboard, and what these promise: a schema version, unique panel
    ids, the datasource variable on every panel and query, every query selecting the pool."""
    problems = []
    name = board.get("uid", "?")
    if not isinstance(board.get("schemaVersion"), int) or board["schemaVersion"] < 36:
        problems.append(f"{name}: schemaVersion missing or older than 36")
    variables = [v["name"] for v in board["templating"]["list"]]
    if variables[:3] != ["datasource", "namespace", "pool"]:
        problems.append(f"{name}: variables {variables}, not datasource, namespace, pool first")
    ids = [p["id"] for p in board["panels"]]
    if len(ids) != len(set(ids)):
        problems.append(f"{name}: panel ids repeat: {ids}")
    for p in board["panels"]:
        where = f"{name} / {p['title']}"
        if p["datasource"].get("uid") != "${datasource}":
            problems.append(f"{where}: panel datasource is not the variable")
        if not p["targets"]:
            problems.append(f"{where}: no query")
        ref_ids = [t["refId"] for t in p["targets"]]
        if len(ref_ids) != len(set(ref_ids)):
            problems.append(f"{where}: refIds repeat")
        for t in p["targets"]:
            if t["datasource"].get("uid") != "${datasource}":
                problems.append(f"{where}: a query's datasource is not the variable")
            if 'namespace="$namespace"' not in t["expr"] or 'pool="$pool"' not in t["expr"]:
                problems.append(f"{where}: {t['expr']} does not select the pool")
            if t["expr"].count("(") != t["expr"].count(")"):
                problems.append(f"{where}: unbalanced parentheses in {t['expr']}")
        grid = p["gridPos"]
        if grid["x"] + grid["w"] > 24:
            problems.append(f"{where}: wider than the dashboard")
    return problems


def quote(text):
    return json.dumps(text, ensure_ascii=False)


def rules_yaml():
    lines = [
        "# Generated by scripts/observability.py; do not edit.",
        "groups:",
        "  - name: parallax.recording",
        "    interval: 30s",
        "    rules:",
    ]
    for record, expr in RECORDING:
        lines += [f"      - record: {record}", f"        expr: {quote(expr)}"]
    lines += ["  - name: parallax.alerts", "    rules:"]
    for a in ALERTS:
        lines += [
            f"      - alert: {a['alert']}",
            f"        expr: {quote(a['expr'])}",
            f"        for: {a['for']}",
            "        labels:",
            f"          severity: {a['severity']}",
            "        annotations:",
            f"          summary: {quote(a['summary'])}",
            f"          runbook: {quote(a['runbook'])}",
        ]
    return "\n".join(lines) + "\n"


def files():
    out = {DASHBOARDS / f"{d['file']}.json": json.dumps(dashboard(d), indent=2, ensure_ascii=False) + "\n" for d in DASHBOARD_SPECS}
    out[RULES] = rules_yaml()
    out[RULE_TESTS] = rule_tests_yaml()
    return out


def main():
    args = sys.argv[1:]
    if args[:1] == ["--queries"]:
        namespace, pool = args[1], args[2]
        sub = lambda e: e.replace("$namespace", namespace).replace("$pool", pool).replace("$__rate_interval", "1m")
        for d in DASHBOARD_SPECS:
            for p in d["panels"]:
                for expr, _ in p["exprs"]:
                    print(json.dumps({"dashboard": d["title"], "panel": p["title"], "expr": sub(expr), "source": p["source"]}))
        for record, expr in RECORDING:
            print(json.dumps({"dashboard": "recording rules", "panel": record, "expr": record, "source": "agent"}))
        return
    wanted = files()
    if args[:1] == ["--check"]:
        problems = [problem for d in DASHBOARD_SPECS for problem in lint(dashboard(d))]
        if problems:
            sys.exit("\n".join(problems))
        stale = [str(p.relative_to(ROOT)) for p, text in wanted.items() if not p.exists() or p.read_text() != text]
        committed = {p for p in DASHBOARDS.glob("*.json")}
        extra = [str(p.relative_to(ROOT)) for p in committed - set(wanted)]
        if stale or extra:
            sys.exit(f"regenerate with scripts/observability.py: {stale + extra}")
        print(f"{len(wanted)} dashboards and rule files are current")
        return
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(wanted)} files")


if __name__ == "__main__":
    main()
