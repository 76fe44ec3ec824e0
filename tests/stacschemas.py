"""Offline validation of STAC objects against the schemas bundled in tests/stac_schemas."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource

SCHEMAS = Path(__file__).parent / "stac_schemas"
CORE = "https://schemas.stacspec.org/v1.1.0"


def _refuse(uri: str) -> Resource[Any]:
    # Offline: a schema that is not bundled is an error, never a download.
    raise NoSuchResource(ref=uri)


@lru_cache(maxsize=1)
def registry() -> Registry[Any]:
    resources = []
    for f in SCHEMAS.rglob("*.json"):
        contents = json.loads(f.read_text())
        resource = Resource.from_contents(contents)
        resources.append((contents["$id"].rstrip("#"), resource))
        if f.name == "common.json":
            resources.append((f"{CORE}/item-spec/json-schema/common.json", resource))
    return Registry(retrieve=_refuse).with_resources(resources)  # type: ignore[call-arg]


def _schema(uri: str) -> Any:
    return registry().contents(uri.rstrip("#"))


def validate(obj: dict[str, Any]) -> list[str]:
    """Validate a STAC Item or Collection against the core schema and each of its extensions.

    Returns the schema URIs it was validated against; raises jsonschema.ValidationError (or
    referencing's errors for a schema that is not bundled).
    """
    core = {"Feature": f"{CORE}/item-spec/json-schema/item.json",
            "Collection": f"{CORE}/collection-spec/json-schema/collection.json"}[obj["type"]]
    uris = [core, *obj.get("stac_extensions", [])]
    for uri in uris:
        Draft7Validator(_schema(uri), registry=registry()).validate(obj)
    return uris
