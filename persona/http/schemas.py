"""The request bodies of ``POST /v1/chat/completions`` and ``POST /v1/completions`` as pydantic models.

Fields a model does not declare are kept (``extra="allow"``) and judged against
:data:`persona.http.openai_schema.REQUEST_FIELDS`, the one table of every OpenAI request field:
refused with a 400 naming them, or ignored by design; never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from ..interactions import ROLES, SYSTEM_ALIAS

MAX_N = 16  # choices per request: n rows of the batch


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal[(*ROLES, SYSTEM_ALIAS)]
    content: str | list[dict[str, Any]]
    name: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        if isinstance(v, str):
            return v
        texts = []
        for j, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f"content part {j} is {part.get('type')!r}: only text parts "
                                 "({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins them

    def for_engine(self) -> dict[str, str]:
        message = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        return message


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # ignored: no padding is added to chunks


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # output always follows the schema, strict or not


class ResponseFormatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class CompletionCommon(BaseModel):
    """The fields both completion routes share."""

    # Fields outside the declared ones are checked against persona.openai_schema.REQUEST_FIELDS:
    # refused with a 400 naming them, or ignored by design; never silently dropped.
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=1024)
    # strict=True on every number: a JSON true is not 1 (strict still takes an integer for a float)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, strict=True)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, strict=True)
    n: int = Field(default=1, ge=1, le=MAX_N, strict=True)
    logit_bias: dict[str, Annotated[float, Strict()]] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class ChatRequest(CompletionCommon):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    # persona's extension (docs/MEMORY.md): the user adapter's memories in a system message; null: the server's default
    memory: bool | None = Field(default=None, strict=True)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    response_format: ResponseFormatBody | None = None


class CompletionRequest(CompletionCommon):
    """``POST /v1/completions``."""

    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)
