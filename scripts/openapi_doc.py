"""The public REST API as one OpenAPI (Swagger 2.0) document, generated from the protos.

Called by gen_protos.py, which writes the result to gen/bank.swagger.json (checked for freshness
like the rest of gen/); Envoy serves it at GET /openapi.json.

protoc-gen-openapiv2 (grpc-gateway, a Go plugin that devstack builds at a pinned version) turns
the google.api.http annotations of the public services into paths, with the options below so the
schemas match what Envoy's transcoder (envoy/envoy.yaml.tmpl) really accepts and returns: proto
field names (preserve_proto_field_names), enums as their names, int64 as JSON strings. This
module then adds what the plugin does not read: the request rules declared with buf.validate
(required, lengths, patterns, email) as JSON-schema keywords, and what no proto says: the error
statuses each operation can answer, all with a google.rpc.Status body, and the bearer-token
security scheme. Rules written in CEL are not translated: the services still enforce them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

PLUGIN_NAME = "protoc-gen-openapiv2"
DOC_NAME = "bank.swagger.json"
_MERGE_NAME = "bank"
# allow_merge: one document for every public service. json_names_for_fields=false: snake_case
# names, as Envoy prints and parses them. The plugin's default error response (kept on purpose)
# brings the google.rpc.Status definition, which finish() then uses for every listed status.
PLUGIN_OPTIONS = (
    "allow_merge=true",
    f"merge_file_name={_MERGE_NAME}",
    "json_names_for_fields=false",
    "openapi_naming_strategy=simple",
)
_STATUS_REF = "#/definitions/rpc.Status"
_SECURITY_SCHEME = "bearer"
# proto3 JSON writes int64 as a decimal string, and Envoy parses one from a string or a number.
_INT64_PATTERN = r"^-?[0-9]+$"

# What each status means here, after API.md's gRPC-to-HTTP mapping.
_STATUS_DESCRIPTIONS = {
    400: "INVALID_ARGUMENT or FAILED_PRECONDITION: the input is malformed, or the state of a resource "
         "does not allow the request. An ErrorInfo detail names the reason; invalid fields come as "
         "BadRequest field violations.",
    401: "UNAUTHENTICATED: no valid access token (or, for the RPCs without one, no valid proof token "
         "or credentials).",
    403: "PERMISSION_DENIED: the caller's role does not allow the request (teller only).",
    404: "NOT_FOUND: unknown, or not visible to the caller (another customer's object is never revealed).",
    409: "ALREADY_EXISTS or ABORTED: a conflict (a name already taken, an idempotency key reused with "
         "different parameters).",
    413: "INVALID_ARGUMENT BODY_TOO_LARGE: the request body is over the gateway's limit (64 KiB).",
    431: "INVALID_ARGUMENT HEADERS_TOO_LARGE: the request's headers (path and query included) are over the "
         "gateway's limit (16 KiB, 64 headers).",
    429: "RESOURCE_EXHAUSTED: too many requests or attempts; try again later.",
    503: "UNAVAILABLE: a dependency is briefly unavailable; safe to retry.",
}
# Every operation can answer these: bad input is rejected by Envoy or the service, rate limits
# and outages apply to all.
_COMMON_STATUSES = (400, 429, 431, 503)


@dataclass(frozen=True)
class Rpc:
    # Needs `Authorization: Bearer <access_token>`; such an RPC can answer 401.
    bearer: bool
    # Its own error statuses beyond _COMMON_STATUSES (and 401 for bearer RPCs), from its proto
    # comment and API.md.
    statuses: tuple[int, ...] = ()


# Every public RPC by the plugin's operation id. A public RPC missing here stops the generator:
# its statuses are a decision, not a default.
RPCS = {
    "CustomerService_RegisterCustomer": Rpc(bearer=False, statuses=(409,)),
    "CustomerService_VerifyEmail": Rpc(bearer=False, statuses=(404,)),
    "CustomerService_GetCustomer": Rpc(bearer=True, statuses=(404,)),
    "AuthService_CreateCredential": Rpc(bearer=False, statuses=(401, 409)),
    "AuthService_Login": Rpc(bearer=False, statuses=(401,)),
    "AuthService_RefreshSession": Rpc(bearer=False, statuses=(401,)),
    "AuthService_Logout": Rpc(bearer=True, statuses=(404,)),
    "AuthService_ListSessions": Rpc(bearer=True, statuses=(404,)),
    "CustomerService_ResendVerificationCode": Rpc(bearer=False),
    "CustomerService_UpdateCustomer": Rpc(bearer=True, statuses=(404,)),
    "CustomerService_ChangeEmail": Rpc(bearer=True, statuses=(404, 409)),
    "CustomerService_ConfirmEmailChange": Rpc(bearer=True, statuses=(404, 409)),
    "AuthService_RequestPasswordReset": Rpc(bearer=False),
    "AuthService_ResetPassword": Rpc(bearer=False),
    "AuthService_ChangePassword": Rpc(bearer=True, statuses=(403,)),
    "AccountService_CreateAccount": Rpc(bearer=True),
    "AccountService_GetAccount": Rpc(bearer=True, statuses=(404,)),
    "AccountService_ListAccounts": Rpc(bearer=True),
    "AccountService_CloseAccount": Rpc(bearer=True, statuses=(404,)),
    "AccountService_FreezeAccount": Rpc(bearer=True, statuses=(403, 404)),
    "AccountService_UnfreezeAccount": Rpc(bearer=True, statuses=(403, 404)),
    "AccountService_ListAccountActivity": Rpc(bearer=True, statuses=(404,)),
    "TransferService_CreateTransfer": Rpc(bearer=True, statuses=(404, 409)),
    "TransferService_GetTransfer": Rpc(bearer=True, statuses=(404,)),
    "TransferService_ListTransfers": Rpc(bearer=True, statuses=(404,)),
    "TransferService_CreateDeposit": Rpc(bearer=True, statuses=(403, 404, 409)),
    "TransferService_PostTransfer": Rpc(bearer=True, statuses=(404, 409)),
    "TransferService_VoidTransfer": Rpc(bearer=True, statuses=(404, 409)),
    "TransferService_CreateWithdrawal": Rpc(bearer=True, statuses=(403, 404, 409)),
    "NotificationService_ListNotifications": Rpc(bearer=True),
}

_INFO = {
    "title": "Simple Bank public API",
    "version": "v1",
    "description": (
        "REST/JSON through Envoy's gRPC-JSON transcoder; the same services answer native gRPC on the "
        "same port. Generated from the .proto files by scripts/gen_protos.py; the contract is API.md. "
        "JSON field names are snake_case; int64 values are strings on output and accept strings or "
        "numbers on input. Errors are google.rpc.Status with an ErrorInfo detail (domain "
        "\"simplebank\") whose reason is stable."
    ),
}


# Field name -> JSON-schema keywords, per operation id.
RequestRules = dict[str, dict[str, dict[str, Any]]]
_VALIDATE_EXTENSION = "buf.validate.field"


def request_rules(descriptor_set: descriptor_pb2.FileDescriptorSet) -> RequestRules:
    """The buf.validate rules of each RPC's request fields, as JSON-schema keywords.

    The rules are an extension of FieldOptions that the descriptor set carries as unknown bytes;
    a pool built from the set itself (it includes buf/validate/validate.proto) reads them, so
    this needs no generated module of validate.proto.
    """
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_set.file:  # --include_imports lists dependencies first
        pool.AddSerializedFile(file.SerializeToString())
    try:
        # Any: the stubs type extensions of generated modules only, not of a pool built at run time.
        extension: Any = pool.FindExtensionByName(_VALIDATE_EXTENSION)
    except KeyError:  # no proto declares rules
        return {}
    field_options = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.protobuf.FieldOptions"))
    rules: RequestRules = {}
    for file in descriptor_set.file:
        for service in file.service:
            for method in service.method:
                request = pool.FindMessageTypeByName(method.input_type.lstrip("."))
                fields = {}
                for field in request.fields:
                    options = field_options.FromString(field.GetOptions().SerializeToString())
                    if options.HasExtension(extension):
                        rule = json_format.MessageToDict(options.Extensions[extension])
                        keywords = _keywords(rule, is_string=field.type == field.TYPE_STRING)
                        if keywords:
                            fields[field.name] = keywords
                rules[f"{service.name}_{method.name}"] = fields
    return rules


def _keywords(rule: dict[str, Any], is_string: bool) -> dict[str, Any]:
    """JSON-schema keywords for one field's buf.validate rules (FieldRules as proto3 JSON)."""
    keywords: dict[str, Any] = {}
    string = rule.get("string", {})
    if "minLen" in string:
        keywords["minLength"] = int(string["minLen"])
    if "maxLen" in string:
        keywords["maxLength"] = int(string["maxLen"])
    if "pattern" in string:
        keywords["pattern"] = string["pattern"]
    if string.get("email"):
        keywords["format"] = "email"
    if rule.get("required"):
        # For a proto3 string, absent and empty are the same value: required means non-empty.
        keywords["required"] = True
        if is_string:
            keywords["minLength"] = max(1, keywords.get("minLength", 1))
    return keywords


def _apply_rules(doc: dict[str, Any], operation: dict[str, Any], fields: dict[str, dict[str, Any]]) -> None:
    """Put each request field's keywords on its path or query parameter, or its body property."""
    for parameter in operation.get("parameters", []):
        if parameter["in"] in ("path", "query") and parameter["name"] in fields:
            keywords = dict(fields[parameter["name"]])
            parameter["required"] = parameter.get("required", False) or keywords.pop("required", False)
            parameter.update(keywords)
        elif parameter["in"] == "body":
            reference = parameter["schema"]["$ref"]
            body = doc["definitions"][reference.removeprefix("#/definitions/")]
            required = []
            for name, property_schema in body.get("properties", {}).items():
                keywords = dict(fields.get(name, {}))
                if keywords.pop("required", False):
                    required.append(name)
                property_schema.update(keywords)
            if required:
                body["required"] = required


def plugin_output(out_dir: Path) -> Path:
    """Where the plugin writes the merged document inside its output directory."""
    return out_dir / f"{_MERGE_NAME}.swagger.json"


def finish(raw: dict[str, Any], rules: RequestRules) -> dict[str, Any]:
    """The plugin's document with info, security, request rules and each operation's error statuses."""
    doc = dict(raw)
    doc["info"] = _INFO
    doc["securityDefinitions"] = {
        _SECURITY_SCHEME: {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Bearer <access_token>`: the PASETO v4 access token from AuthService.Login.",
        }
    }
    doc["security"] = [{_SECURITY_SCHEME: []}]
    seen = set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            operation_id = operation["operationId"]
            rpc = RPCS.get(operation_id)
            if rpc is None:
                raise SystemExit(f"{method.upper()} {path} ({operation_id}) is public but has no entry in "
                                 f"{__name__}.RPCS: decide its error statuses there")
            seen.add(operation_id)
            responses = operation["responses"]
            default = responses.pop("default", None)
            # The plugin's default error response is how it names google.rpc.Status: if that ever
            # changes, the refs below would dangle.
            assert default is not None and default["schema"]["$ref"] == _STATUS_REF, (operation_id, default)
            statuses = set(_COMMON_STATUSES) | set(rpc.statuses) | ({401} if rpc.bearer else set())
            if any(parameter["in"] == "body" for parameter in operation.get("parameters", [])):
                statuses.add(413)
            for status in sorted(statuses):
                responses[str(status)] = {"description": _STATUS_DESCRIPTIONS[status], "schema": {"$ref": _STATUS_REF}}
            if not rpc.bearer:
                operation["security"] = []
            _apply_rules(doc, operation, rules.get(operation_id, {}))
    missing = sorted(set(RPCS) - seen)
    if missing:
        raise SystemExit(f"{__name__}.RPCS names operations the protos do not have: {', '.join(missing)}")
    _pattern_int64(doc)
    return doc


def _pattern_int64(node: Any) -> None:
    """Give every int64 string schema its digits-only pattern, so clients and fuzzers know the form."""
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("format") == "int64":
            node["pattern"] = _INT64_PATTERN
        for value in node.values():
            _pattern_int64(value)
    elif isinstance(node, list):
        for value in node:
            _pattern_int64(value)


def write(raw_path: Path, doc_path: Path, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    """Read the plugin's output at raw_path and write the finished document to doc_path."""
    doc = finish(json.loads(raw_path.read_text()), request_rules(descriptor_set))
    doc_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
