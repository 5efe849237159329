#!/usr/bin/env python3
"""Refreshes the CustomResourceDefinitions the mesh ships and validates against, from
pinned upstream releases (change the versions below, run, review the diff, run the
tests: `cargo test -p mesh-common --features control --test schemas` says which new
fields need modelling or an "accepted, not enforced" entry).

- deploy/crds/: Istio's generated CRDs (manifests/charts/base/files/crd-all.gen.yaml of
  the Istio release) of the kinds the mesh serves, one file per CRD, byte for byte as
  upstream writes them. `meshctl manifest generate` embeds and installs these.
- deploy/gateway-api/: Gateway API's standard-channel CRDs of the kinds the mesh
  models, as released. Not installed by the mesh (install Gateway API from upstream);
  kept as the schema reference of the tests.

Standard library only. Offline: ISTIO_CRDS=path/to/crd-all.gen.yaml and
GATEWAY_API_DIR=path/to/config/crd/standard read local copies instead.
"""
import os
import pathlib
import urllib.request

ISTIO_VERSION = "1.30.3"
GATEWAY_API_VERSION = "v1.6.1"

# <plural>.<group> of the Istio kinds the mesh serves.
ISTIO_CRDS = [
    "authorizationpolicies.security.istio.io",
    "peerauthentications.security.istio.io",
    "requestauthentications.security.istio.io",
    "virtualservices.networking.istio.io",
    "destinationrules.networking.istio.io",
    "serviceentries.networking.istio.io",
    "workloadentries.networking.istio.io",
    "telemetries.telemetry.istio.io",
]
GATEWAY_API_CRDS = ["gateways", "gatewayclasses", "httproutes", "grpcroutes", "referencegrants", "tcproutes", "tlsroutes"]

DEPLOY = pathlib.Path(__file__).resolve().parent


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


def istio_documents() -> str:
    local = os.environ.get("ISTIO_CRDS")
    if local:
        return pathlib.Path(local).read_text()
    return fetch(
        f"https://raw.githubusercontent.com/istio/istio/{ISTIO_VERSION}/manifests/charts/base/files/crd-all.gen.yaml"
    )


def crd_name(document: str) -> str:
    # The first `name:` under the top-level `metadata:` is the CRD's name.
    in_metadata = False
    for line in document.splitlines():
        if line.startswith("metadata:"):
            in_metadata = True
        elif in_metadata and line.startswith("  name: "):
            return line.split(":", 1)[1].strip()
        elif in_metadata and line and not line.startswith(" "):
            in_metadata = False
    return ""


def main() -> None:
    header = f"# Istio {ISTIO_VERSION}: manifests/charts/base/files/crd-all.gen.yaml, refreshed by deploy/refresh-crds.py; do not edit.\n"
    documents = {}
    for document in istio_documents().split("\n---\n"):
        name = crd_name(document)
        if name:
            documents[name] = document.strip("-\n") + "\n"
    for name in ISTIO_CRDS:
        (DEPLOY / "crds" / f"{name}.yaml").write_text(header + documents[name])
    local = os.environ.get("GATEWAY_API_DIR")
    for plural in GATEWAY_API_CRDS:
        file = f"gateway.networking.k8s.io_{plural}.yaml"
        if local:
            text = (pathlib.Path(local) / file).read_text()
        else:
            text = fetch(
                f"https://raw.githubusercontent.com/kubernetes-sigs/gateway-api/{GATEWAY_API_VERSION}/config/crd/standard/{file}"
            )
        (DEPLOY / "gateway-api" / file).write_text(text)


if __name__ == "__main__":
    main()
