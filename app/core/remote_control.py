"""Model control in a front-end process of MMSERVE_WORKERS > 1: `RemoteControl`, the `ModelControl` the
front-end's v2 repository routes and gRPC RPCs call, whose work the engine does.

The engine owns the models and their batchers, so its `ModelControl` alone loads, unloads, hot-reloads and
polls the repository; a front-end's index, load and unload go to it over the engine connection
(`EngineClient.control`), and a load or unload returns once every front-end has taken the engine's new state
(`app/core/engine.py`): whichever front-end a client asked, every front-end serves the outcome when the answer
arrives. The access rules (`check_allowed`: MODEL_CONTROL none, non-loopback bind or connection) are checked
here, where the request's connection is known, with the same settings as the engine's.
"""
from __future__ import annotations

from app.core.model_control import ModelControl
from app.core.remote import FrontRegistry


class RemoteControl(ModelControl):
    registry: FrontRegistry

    async def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return await self.registry.client.control("index", ready_only)

    async def load(self, name: str) -> None:
        self.check_allowed()
        await self.registry.client.control("load", name)

    async def unload(self, name: str) -> None:
        self.check_allowed()
        await self.registry.client.control("unload", name)

    def start(self) -> None:
        """Nothing to start: with MODEL_CONTROL=poll the engine polls, and front-ends follow its state."""


__all__ = ["RemoteControl"]
