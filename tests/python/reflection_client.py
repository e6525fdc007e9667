"""A gRPC client that, like grpcurl, knows no generated types.

Everything it sends and reads is built from the descriptors the gateway's reflection
service hands out: it proves that a client with nothing but the gateway's address can
discover the API and use it. Run by `tests/it/reflection_client.rs` against a live
gateway; prints one `<step>: ok` line per step and exits non-zero on the first failure.

Environment:
  STEP3GW_GRPC_TARGET   host:port of the gateway's gRPC door (plaintext HTTP/2)
  STEP3GW_ADMIN_TOKEN   the admin token
  STEP3GW_MODEL         the model to ask (default stepfun-ai/Step3-VL-10B)
"""

import os
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

CHAT = "step3.gateway.v1.Chat"
ADMIN = "step3.gateway.v1.Admin"
HEALTH = "grpc.health.v1.Health"
TIMEOUT_SECS = 30


class Failure(Exception):
    """A check that did not hold."""


def check(condition, what, *details):
    if not condition:
        raise Failure(" ".join([what, *(repr(d) for d in details)]))


class GenericClient:
    """Calls any method by name; requests and answers are proto3-JSON dicts."""

    def __init__(self, channel):
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self):
        return set(self.database.get_services())

    def _method(self, service, method):
        descriptor = self.pool.FindServiceByName(service).FindMethodByName(method)
        check(descriptor is not None, "no such method", f"{service}/{method}")
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        return descriptor, request_class, response_class

    @staticmethod
    def _metadata(token):
        return (("authorization", f"Bearer {token}"),) if token else ()

    def unary(self, service, method, request, token=None):
        descriptor, request_class, response_class = self._method(service, method)
        check(not descriptor.server_streaming, "not a unary method", method)
        call = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        message = json_format.ParseDict(request, request_class())
        answer = call(message, metadata=self._metadata(token), timeout=TIMEOUT_SECS)
        return json_format.MessageToDict(answer, preserving_proto_field_name=True)

    def server_stream(self, service, method, request, token=None):
        descriptor, request_class, response_class = self._method(service, method)
        check(descriptor.server_streaming, "not a streaming method", method)
        call = self.channel.unary_stream(
            f"/{service}/{method}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        message = json_format.ParseDict(request, request_class())
        answers = call(message, metadata=self._metadata(token), timeout=TIMEOUT_SECS)
        return [
            json_format.MessageToDict(a, preserving_proto_field_name=True)
            for a in answers
        ]


def main():
    target = os.environ["STEP3GW_GRPC_TARGET"]
    admin_token = os.environ["STEP3GW_ADMIN_TOKEN"]
    model = os.environ.get("STEP3GW_MODEL", "stepfun-ai/Step3-VL-10B")
    # A loopback gateway: never through an HTTP proxy from the environment.
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    client = GenericClient(channel)

    services = client.services()
    for service in (CHAT, ADMIN, HEALTH):
        check(service in services, "reflection does not list", service, sorted(services))
    print("reflection: ok", flush=True)

    health = client.unary(HEALTH, "Check", {"service": CHAT})
    check(health.get("status") == "SERVING", "Chat is not serving", health)
    print("health: ok", flush=True)

    user = client.unary(
        ADMIN, "CreateUser", {"name": "reflection", "email": "r@example.com"}, admin_token
    )
    check(user.get("id", "").startswith("usr_"), "CreateUser gave no user id", user)
    check(user.get("active") is True, "a new user is not active", user)
    created = client.unary(
        ADMIN,
        "CreateKey",
        {"user_id": user["id"], "name": "reflection", "request_quota": "10"},
        admin_token,
    )
    key, secret = created.get("key", {}), created.get("secret", "")
    check(key.get("user_id") == user["id"], "CreateKey: wrong user", created)
    check(secret.startswith("sk-"), "CreateKey gave no secret", created)
    check(key.get("request_quota") == "10", "CreateKey: quota not kept", created)
    print("admin: ok", flush=True)

    request = {
        "model": model,
        "messages": [
            {"role": "system", "text": "Be brief."},
            {"role": "user", "parts": [{"text": "What does a bee do all day?"}]},
        ],
        "max_tokens": 12,
        # A google.protobuf.Struct built from the reflected descriptors, too.
        "extra": {"top_k": 20},
    }
    answer = client.unary(CHAT, "Complete", request, secret)
    choices = answer.get("choices", [])
    check(len(choices) == 1, "Complete: expected one choice", answer)
    content = choices[0].get("message", {}).get("content", "")
    check(content.strip() != "", "Complete: empty content", answer)
    check(choices[0].get("finish_reason"), "Complete: no finish_reason", answer)
    usage = answer.get("usage", {})
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    check(prompt > 0 and completion > 0, "Complete: no usage", answer)
    check(int(usage.get("total_tokens", 0)) == prompt + completion, "Complete: bad total", usage)
    print("complete: ok", flush=True)

    chunks = client.server_stream(CHAT, "StreamComplete", request, secret)
    check(len(chunks) >= 3, "StreamComplete: too few messages", chunks)
    text = "".join(c.get("content", "") for chunk in chunks for c in chunk.get("choices", []))
    check(text.strip() != "", "StreamComplete: no text", chunks)
    last = chunks[-1]
    check(
        any(c.get("finish_reason") for c in last.get("choices", [])),
        "StreamComplete: the last message has no finish_reason",
        last,
    )
    check(int(last.get("usage", {}).get("completion_tokens", 0)) > 0, "StreamComplete: no usage", last)
    check(
        all("usage" not in chunk for chunk in chunks[:-1]),
        "StreamComplete: usage before the last message",
        chunks,
    )
    print("stream: ok", flush=True)

    mine = client.unary(CHAT, "GetUsage", {}, secret)
    check(mine.get("key_id") == key["id"], "GetUsage: another key", mine)
    check(mine.get("requests_used") == "2", "GetUsage: expected 2 requests", mine)
    check(mine.get("requests_remaining") == "8", "GetUsage: expected 8 remaining", mine)
    print("usage: ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (Failure, grpc.RpcError, KeyError) as e:
        if isinstance(e, grpc.RpcError):
            e = f"{e.code().name}: {e.details()}"
        print(f"reflection_client: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
