"""The images the chart and the operator name are the ones the Dockerfiles build and tag: the
operator at the chart's appVersion, the agent's CUDA build at "<appVersion>-cuda" (what pools
that pin no image run), and the workspace's version is the chart's appVersion.

Usage: check_images.py CHART_RENDER.yaml POOL_RENDER.yaml
"""
import re
import sys

import yaml


def main() -> int:
    chart_render, pool_render = sys.argv[1:3]
    app_version = yaml.safe_load(open("charts/parallax/Chart.yaml"))["appVersion"]
    cargo = open("Cargo.toml").read()
    workspace_version = re.search(r'^version = "([^"]+)"', cargo, re.M).group(1)
    problems = []
    if workspace_version != app_version:
        problems.append(f"Cargo.toml's version {workspace_version} is not the chart's appVersion {app_version}")
    docs = [d for d in yaml.safe_load_all(open(chart_render)) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    operator = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    expected = {
        "operator image": (operator["image"], f"ghcr.io/parallax-dev/parallax-operator:{app_version}"),
        "chart's agent image": (env.get("PARALLAX_AGENT_IMAGE"), f"ghcr.io/parallax-dev/parallax-agent:{app_version}-cuda"),
    }
    pods = [d for d in yaml.safe_load_all(open(pool_render)) if d and d["kind"] == "Pod"]
    expected["operator's default agent image"] = (
        pods[0]["spec"]["containers"][0]["image"],
        f"ghcr.io/parallax-dev/parallax-agent:{app_version}-cuda",
    )
    # Each Dockerfile says, in its build command, the tag it is pushed as.
    for dockerfile, image in [
        ("operator/Dockerfile", f"ghcr.io/parallax-dev/parallax-operator:{app_version}"),
        ("agent/Dockerfile", f"ghcr.io/parallax-dev/parallax-agent:{app_version}"),
        ("agent/Dockerfile.cuda", f"ghcr.io/parallax-dev/parallax-agent:{app_version}-cuda"),
    ]:
        tagged = re.search(r"docker build -f \S+ -t (\S+) \.", open(dockerfile).read())
        expected[dockerfile] = (tagged.group(1) if tagged else None, image)
    for what, (got, want) in expected.items():
        if got != want:
            problems.append(f"{what}: {got!r}, expected {want!r}")
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"images agree: operator and agent {app_version}, agent {app_version}-cuda in pools")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
