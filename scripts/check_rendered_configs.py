"""Runs `parallax-agent check-config` on every pod of rendered pool manifests, as the pod would
resolve its configuration: the ConfigMap's agent.json, with the pod's own environment
(rank, group size, leader, model cache); and `parallax-agent route --check` with each router's
arguments. A LeaderWorkerSet's leader and worker of its first
group are checked with the labels and variables LWS gives them.

Usage: check_rendered_configs.py AGENT_BINARY RENDERED.yaml...
"""
import os
import re
import subprocess
import sys
import tempfile

import yaml


def lws_pods(lws):
    """The pods LWS makes of its first group: labels, and the variables it puts first."""
    name, namespace = lws["metadata"]["name"], lws["metadata"]["namespace"]
    group = lws["spec"]["leaderWorkerTemplate"]
    size = group["size"]
    for worker in range(min(size, 2)):
        template = group.get("leaderTemplate") if worker == 0 else None
        template = template or group["workerTemplate"]
        labels = {
            **template["metadata"]["labels"],
            "leaderworkerset.sigs.k8s.io/name": name,
            "leaderworkerset.sigs.k8s.io/group-index": "0",
            "leaderworkerset.sigs.k8s.io/worker-index": str(worker),
        }
        injected = {
            "LWS_LEADER_ADDRESS": f"{name}-0.{name}.{namespace}",
            "LWS_GROUP_SIZE": str(size),
            "LWS_WORKER_INDEX": str(worker),
        }
        pod_name = f"{name}-0" if worker == 0 else f"{name}-0-{worker}"
        yield {"metadata": {"name": pod_name, "labels": labels}, "spec": template["spec"]}, injected


def environment(pod, container, injected):
    """The container's variables as the kubelet resolves them (values, label fields, $(VAR))."""
    env = dict(injected)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
            continue
        path = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if label:
            env[var["name"]] = pod["metadata"]["labels"][label[1]]
    return env


def passes(name, command, env):
    """Runs the agent's `command` with `env` added; says how it went. Whether it passed."""
    result = subprocess.run(
        command, env={**os.environ, **env, "RUST_BACKTRACE": "0"}, capture_output=True, text=True
    )
    if result.returncode != 0:
        print(f"{name}: {' '.join(command[1:3])} failed:\n{result.stderr}", file=sys.stderr)
        return False
    print(f"{name}: {result.stdout.strip()}")
    return True


def main() -> int:
    agent, files = sys.argv[1], sys.argv[2:]
    checked = routers = 0
    for path in files:
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        configs = {
            d["metadata"]["name"]: d["data"]["agent.json"] for d in docs if d["kind"] == "ConfigMap"
        }
        pods = [(d, {}) for d in docs if d["kind"] == "Pod"]
        for lws in (d for d in docs if d["kind"] == "LeaderWorkerSet"):
            pods.extend(lws_pods(lws))
        for pod, injected in pods:
            spec = pod["spec"]
            container = spec["containers"][0]
            volume = next(v for v in spec["volumes"] if v["name"] == "config")
            config = configs[volume["configMap"]["name"]]
            env = environment(pod, container, injected)
            with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
                file.write(config)
                file.flush()
                name = f"{path}: pod {pod['metadata']['name']}"
                if not passes(name, [agent, "check-config", file.name], env):
                    return 1
            checked += 1
        # The router's arguments (the operator's and the pool's extraArgs) as `route` takes them.
        for router in (d for d in docs if d["kind"] == "Deployment"):
            container = router["spec"]["template"]["spec"]["containers"][0]
            name = f"{path}: router {router['metadata']['name']}"
            if not passes(name, [agent, *container["args"], "--check"], {}):
                return 1
            routers += 1
    if checked == 0 or routers == 0:
        print("no pods or no router in the rendered manifests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
