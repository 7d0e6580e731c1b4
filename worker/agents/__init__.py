"""Agents: what a worker runs for a prompt. Each yields :class:`~shared.protocol.Thought` s."""

from __future__ import annotations

from thoughtwire.shared.settings import Settings
from thoughtwire.worker.agents.base import Agent, AgentError, Turn
from thoughtwire.worker.agents.echo import EchoAgent
from thoughtwire.worker.agents.simulated import SimulatedAgent

__all__ = ["Agent", "AgentError", "Turn", "build_agents"]


def build_agents(settings: Settings) -> dict[str, Agent]:
    """Every agent this worker can run, by name; ``settings.agent`` is the default."""
    agents: dict[str, Agent] = {
        "simulated": SimulatedAgent.from_settings(settings),
        "echo": EchoAgent(),
    }
    if settings.openai_api_key:
        # Imported only when configured: the openai package costs a worker about a
        # second to start and some 40 MB.
        from thoughtwire.worker.agents.openai_chat import OpenAIAgent

        agents["openai"] = OpenAIAgent.from_settings(settings)
    return agents
