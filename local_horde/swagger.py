"""GET /api/swagger.json: the server's published API description, in flask-restx's Swagger 2.0 shape.

The real server (flask-restx) serves its models under `definitions`; a worker reads the enums there to
learn which alchemy forms (`InterrogationPopInput.forms`) and post-processors
(`ModelPayloadStyleStable.post_processing`) the server accepts. This stand-in publishes the same
definitions from the schemas it validates with, so a name withdrawn here is both refused and unlisted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from local_horde.schema import (
    GENERATION_PARAMS,
    POST_PROCESSORS,
    SOURCE_PROCESSING,
    Schema,
    interrogate_async_schema,
    interrogate_pop_schema,
)

SWAGGER_PATH = "/api/swagger.json"
API_VERSION = "2.5"


def _definition(schema: Schema) -> dict[str, Any]:
    """A validation schema as flask-restx writes a model: no empty `required` list."""
    out = {k: v for k, v in schema.items() if not (k == "required" and not v)}
    return out


def _style_params(post_processors: Sequence[str]) -> Schema:
    props = dict(GENERATION_PARAMS["properties"])
    props["post_processing"] = {
        "type": "array",
        "items": {"type": "string", "enum": list(post_processors)},
        "uniqueItems": True,
    }
    return {"type": "object", "properties": props}


def _body(ref: str) -> list[dict[str, Any]]:
    return [{"name": "payload", "required": True, "in": "body", "schema": {"$ref": f"#/definitions/{ref}"}}]


def swagger_document(
    forms: Sequence[str], post_processors: Sequence[str] = POST_PROCESSORS
) -> dict[str, Any]:
    form_model = interrogate_async_schema(forms)["properties"]["forms"]["items"]
    return {
        "swagger": "2.0",
        "basePath": "/api",
        "info": {"title": "AI Horde", "version": API_VERSION, "description": "The API documentation"},
        "produces": ["application/json"],
        "consumes": ["application/json"],
        "paths": {
            "/v2/interrogate/pop": {
                "post": {"operationId": "post_interrogate_pop", "parameters": _body("InterrogationPopInput")}
            },
            "/v2/interrogate/async": {
                "post": {
                    "operationId": "post_interrogate_async",
                    "parameters": _body("ModelInterrogationInputStable"),
                }
            },
            "/v2/generate/async": {
                "post": {"operationId": "post_async_generate", "parameters": _body("GenerationInputStable")}
            },
        },  # fmt: skip
        "definitions": {
            "InterrogationPopInput": _definition(interrogate_pop_schema(forms)),
            "ModelInterrogationFormStable": _definition(form_model),
            "ModelInterrogationInputStable": {
                "type": "object",
                "properties": {
                    "forms": {
                        "type": "array",
                        "items": {"$ref": "#/definitions/ModelInterrogationFormStable"},
                    },
                    "source_image": {"type": "string"},
                },
            },
            "ModelPayloadStyleStable": _definition(_style_params(post_processors)),
            "ModelPayloadRootStable": {
                "allOf": [
                    {"$ref": "#/definitions/ModelPayloadStyleStable"},
                    {"type": "object", "properties": {"seed": {"type": "string"}}},
                ]
            },
            "GenerationInputStable": {
                "type": "object",
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string"},
                    "params": {"$ref": "#/definitions/ModelGenerationInputStable"},
                    "source_processing": {
                        "type": "string",
                        "default": "img2img",
                        "enum": list(SOURCE_PROCESSING),
                    },
                },
            },
            "ModelGenerationInputStable": {"allOf": [{"$ref": "#/definitions/ModelPayloadRootStable"}]},
        },
    }
