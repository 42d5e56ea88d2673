"""Runs `parallax-agent check-config` on every pod of rendered pool manifests, as the pod would
resolve its configuration: the ConfigMap's agent.json, with the pod's own environment
(rank, group size, leader, model cache).

Usage: check_rendered_configs.py AGENT_BINARY RENDERED.yaml...
"""
import os
import subprocess
import sys
import tempfile

import yaml


def main() -> int:
    agent, files = sys.argv[1], sys.argv[2:]
    checked = 0
    for path in files:
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        configs = {
            d["metadata"]["name"]: d["data"]["agent.json"] for d in docs if d["kind"] == "ConfigMap"
        }
        for pod in (d for d in docs if d["kind"] == "Pod"):
            spec = pod["spec"]
            container = spec["containers"][0]
            volume = next(v for v in spec["volumes"] if v["name"] == "config")
            config = configs[volume["configMap"]["name"]]
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
                file.write(config)
                file.flush()
                result = subprocess.run(
                    [agent, "check-config", file.name],
                    env={**os.environ, **env, "RUST_BACKTRACE": "0"},
                    capture_output=True,
                    text=True,
                )
            name = f"{path}: pod {pod['metadata']['name']}"
            if result.returncode != 0:
                print(f"{name}: check-config failed:\n{result.stderr}", file=sys.stderr)
                return 1
            print(f"{name}: {result.stdout.strip()}")
            checked += 1
    if checked == 0:
        print("no pods in the rendered manifests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
