"""A Secret Manager stand-in for tests: AccessSecretVersion over gRPC, on the types the real client ships."""

from __future__ import annotations

from typing import Any

import grpc
from google.cloud.secretmanager_v1 import types

from tests.sinks.pubsub_server import unary

AccessSecretVersionRequest = types.AccessSecretVersionRequest.pb()
AccessSecretVersionResponse = types.AccessSecretVersionResponse.pb()
SecretPayload = types.SecretPayload.pb()


class SecretManagerServer:
    def __init__(self, secrets: dict[str, bytes]) -> None:
        """secrets: full version names (projects/p/secrets/s/versions/latest) → payload."""
        from concurrent import futures

        self.secrets = secrets
        self.accessed: list[str] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "google.cloud.secretmanager.v1.SecretManagerService",
                    {"AccessSecretVersion": unary(self.access, AccessSecretVersionRequest)},
                ),
            )
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.host = f"127.0.0.1:{port}"

    def access(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.accessed.append(request.name)
        if request.name not in self.secrets:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Secret [{request.name}] not found or has no versions.")
        return AccessSecretVersionResponse(name=request.name, payload=SecretPayload(data=self.secrets[request.name]))

    def start(self) -> SecretManagerServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
