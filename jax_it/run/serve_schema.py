"""The requests `run.py serve` takes: OpenAI's fields, validated by pydantic (a bad one is a 400
naming it). Fields with no counterpart here are accepted only while they ask for nothing, so a
client never gets less than it asked for without being told; unknown fields are ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RequestBody(BaseModel):
  model_config = ConfigDict(extra="ignore")
  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0, le=2)
  top_p: float | None = Field(None, gt=0, le=1)
  top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM and llama.cpp take it too
  seed: int | None = Field(None, ge=0, lt=2**32)
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: dict | None = None
  # fields with no counterpart here: refused unless they ask for nothing
  n: int | None = None
  logprobs: bool | int | None = None
  top_logprobs: int | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict | None = None
  tools: list | None = None
  functions: list | None = None
  response_format: dict | None = None
  best_of: int | None = None
  echo: bool | None = None
  suffix: str | None = None

  def unsupported(self) -> str | None:
    asked = {"n": self.n not in (None, 1), "logprobs": bool(self.logprobs),
             "top_logprobs": bool(self.top_logprobs), "presence_penalty": bool(
                 self.presence_penalty), "frequency_penalty": bool(self.frequency_penalty),
             "logit_bias": bool(self.logit_bias), "tools": bool(self.tools),
             "functions": bool(self.functions), "best_of": self.best_of not in (None, 1),
             "echo": bool(self.echo), "suffix": bool(self.suffix),
             "response_format": (self.response_format or {}).get("type", "text") != "text"}
    return next((k for k, v in asked.items() if v), None)


class Part(BaseModel):
  type: Literal["text"]
  text: str


class Message(BaseModel):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[Part] | None = None


class ChatBody(RequestBody):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(RequestBody):
  prompt: str | list[str] = Field(min_length=1)
