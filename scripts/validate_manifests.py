"""Validate Kubernetes manifests offline: built-in kinds with kubernetes-validate (--strict: unknown fields are
errors) for each Kubernetes version asked, custom resources against the JSON schemas in a CRD folder laid out
as `{group}/{kind}_{version}.json` (../shared/schemas/crds), strict as kubeconform's -strict (an object that
lists `properties` takes no others). Runs in the deployment tools' venv (scripts/check_deploy.sh install).

    python scripts/validate_manifests.py --crds ../shared/schemas/crds -k 1.30.0 -k 1.37.0 FILE.yaml...
    python scripts/validate_manifests.py --crds DIR -k 1.30.0 --json < DOCS.json   ([{"source", "text"}])

Prints one line per document and version (or, with --json, a list of {"source", "kind", "name", "version",
"error"}); exits 1 when any document fails or has no schema.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever an object lists properties and says nothing about others."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_validator(crds: str, group: str, kind: str, version: str) -> jsonschema.Draft7Validator | None:
    path = Path(crds) / group / f"{kind.lower()}_{version}.json"
    if not path.is_file():
        return None
    schema = _strict(json.loads(path.read_text()))
    # metadata is the API server's ObjectMeta (the CRD schemas leave it open); apiVersion/kind are checked here.
    schema = copy.deepcopy(schema)
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any], versions: list[str], crds: str | None) -> list[tuple[str, str | None]]:
    """[(version or 'crd', error or None)] for one document."""
    api = doc.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    if group and "." in group and not group.endswith(".k8s.io"):  # a custom resource
        if not crds:
            return [("crd", f"no CRD folder given for {api} {doc.get('kind')}")]
        validator = crd_validator(crds, group, doc.get("kind", ""), version)
        if validator is None:
            return [("crd", f"no schema for {api} {doc.get('kind')} in {crds}")]
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [("crd", "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors) or None)]
    results = []
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
            results.append((v, None))
        except kubernetes_validate.ValidationError as exc:
            results.append((v, f"{'/'.join(map(str, exc.path))}: {exc.message}"))
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            results.append((v, f"no schema: {exc}"))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*")
    p.add_argument("-k", "--kubernetes-version", action="append", dest="versions", default=[])
    p.add_argument("--crds", help="folder of CRD JSON schemas ({group}/{kind}_{version}.json)")
    p.add_argument("--json", action="store_true", help="read [{source, text}] from stdin, write JSON")
    a = p.parse_args(argv)
    versions = a.versions or [kubernetes_validate.latest_version()]
    sources = json.load(sys.stdin) if a.json else [{"source": f, "text": Path(f).read_text()} for f in a.files]
    rows = []
    for src in sources:
        for doc in yaml.safe_load_all(src["text"]):
            if not doc:
                continue
            for version, error in validate(doc, versions, a.crds):
                rows.append({"source": src["source"], "kind": doc.get("kind"),
                             "name": (doc.get("metadata") or {}).get("name"), "version": version, "error": error})
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{'FAIL' if r['error'] else 'ok  '} {r['source']} {r['kind']}/{r['name']} [{r['version']}]"
                  + (f": {r['error']}" if r["error"] else ""))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
