"""Rewrites rendered manifests for schema validation: each LeaderWorkerSet (a CRD the
Kubernetes schemas do not know) becomes the v1 PodTemplates of its leader and workers, which
they do. The LeaderWorkerSet's own fields are checked by the operator's tests.

Usage: lws_as_pod_templates.py RENDERED.yaml...  (files are rewritten in place)
"""
import sys

import yaml


def main() -> int:
    for path in sys.argv[1:]:
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        out = []
        for doc in docs:
            if doc["kind"] != "LeaderWorkerSet":
                out.append(doc)
                continue
            group = doc["spec"]["leaderWorkerTemplate"]
            roles = [("worker", group["workerTemplate"])]
            if "leaderTemplate" in group:
                roles.insert(0, ("leader", group["leaderTemplate"]))
            for role, template in roles:
                out.append({
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {
                        "name": f"{doc['metadata']['name']}-{role}",
                        "namespace": doc["metadata"]["namespace"],
                    },
                    "template": template,
                })
        with open(path, "w") as file:
            yaml.safe_dump_all(out, file, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
