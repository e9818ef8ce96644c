"""The gRPC front: Open Inference Protocol + standard health service (+ optional reflection), grpc.aio.

BentoML 1.4 serves gRPC only for its legacy API, so the front service starts this server in its
startup hook and stops it (gracefully) in its shutdown hook. With several front workers each binds the
same port (gRPC sets SO_REUSEPORT), and the kernel spreads connections across them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.auth import BearerAuthInterceptor
from service.config import Settings
from service.oip import grpc_predict_v2_pb2 as pb
from service.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from service.oip.grpc_servicer import InferenceServicer
from service.oip.models import OipModels

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
GRACE_S = 5.0
BYTES_PER_FP32 = 4


class GrpcFront:
    """Owns the grpc.aio server and keeps the health status in step with the model's readiness."""

    def __init__(self, models: OipModels, settings: Settings) -> None:
        self.models = models
        self.settings = settings
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and start; returns the bound port. Raises when the port cannot be bound (never silent)."""
        limit = self.settings.max_upload_bytes + 1024 * 1024  # two files + protocol overhead
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
        interceptors = [BearerAuthInterceptor(self.settings.api_token)] if self.settings.api_token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.models, max_elements=self.settings.max_upload_bytes // BYTES_PER_FP32),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.settings.grpc_reflection:
            from grpc_reflection.v1alpha import reflection

            names = (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server, pool=pb.POOL)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        port = server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"gRPC server could not bind {address}")
        await server.start()
        self.server, self.port = server, port
        await self._set_serving(False)
        self._watch = asyncio.create_task(self._follow_readiness())
        log.info("gRPC Open Inference Protocol server listening on %s:%d", self.settings.grpc_host, port)
        return port

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(GRACE_S)
            log.info("gRPC server stopped")
            self.server = None

    async def _set_serving(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _follow_readiness(self) -> None:
        """Poll readiness until the model answers (then SERVING), so health checks never lie at start-up."""
        while True:
            ready = await self.models.server_ready()
            await self._set_serving(ready)
            if ready:
                return
            await asyncio.sleep(1.0)
