"""The openai agent: Chat Completions with ``stream=True`` against any compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai

from shared.protocol import Thought
from shared.settings import Settings
from worker.agents.base import AgentError


@dataclass
class OpenAIAgent:
    client: openai.AsyncOpenAI
    model: str

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIAgent:
        client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            timeout=settings.openai_timeout,
            max_retries=2,
        )
        return cls(client=client, model=settings.openai_model)

    async def run(self, prompt: str) -> AsyncIterator[Thought]:
        try:
            stream = await self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield Thought("answer", chunk.choices[0].delta.content)
        except openai.AuthenticationError:
            raise AgentError("the model provider rejected the API key") from None
        except openai.RateLimitError:
            raise AgentError("the model provider is rate limiting; try again later") from None
        except openai.APIError:
            raise AgentError("the model provider failed") from None
