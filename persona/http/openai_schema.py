"""What persona does with every OpenAI request field, and the OpenAI shapes of logprobs.

``REQUEST_FIELDS`` is the one table of every field of ``POST /v1/chat/completions`` and
``POST /v1/completions`` (as of the ``openai`` Python client 2.x/3.x): each is ``supported``,
``refused`` (a 400 whose ``param`` names the field, unless the value asks for nothing, such as
``tools: []`` or ``echo: false``), or ``ignored`` by design (with the reason). A field not in the
table is refused too: a client never believes it got something persona silently dropped.
``docs/SERVING.md`` prints the same table and the tests walk it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from ..serving.sampling import TokenLogprob

Endpoint = Literal["chat", "completions"]
Status = Literal["supported", "refused", "ignored"]
BOTH: tuple[Endpoint, ...] = ("chat", "completions")
CHAT: tuple[Endpoint, ...] = ("chat",)
COMPLETIONS: tuple[Endpoint, ...] = ("completions",)


@dataclass(frozen=True)
class RequestField:
    """One OpenAI request field: where it exists, what persona does with it, and why.

    ``neutral`` lists the values of a refused field that ask for nothing (besides null), so they are
    accepted; ``example`` is a value a client could send (refused fields: one that is refused), which
    the tests send.
    """

    name: str
    endpoints: tuple[Endpoint, ...]
    status: Status
    note: str
    example: Any = None
    neutral: tuple[Any, ...] = ()


REQUEST_FIELDS: tuple[RequestField, ...] = (
    # --- supported
    RequestField("model", BOTH, "supported", "an adapter, stack or the base's name", "user:alice"),
    RequestField("messages", CHAT, "supported", "roles system, developer (as system), user, assistant; content a "
                 "string or a list of text parts (joined with newlines); `name` accepted (the chat template decides "
                 "whether to render it)", [{"role": "user", "content": "Hi"}]),
    RequestField("prompt", COMPLETIONS, "supported", "a string (a list of prompts or token ids is a 400)", "Hi"),
    RequestField("max_tokens", BOTH, "supported", "up to the server's limit (4096 by default); default 256", 4),
    RequestField("max_completion_tokens", CHAT, "supported", "as max_tokens (wins when both are set)", 4),
    RequestField("temperature", BOTH, "supported", "0 is greedy", 0.5),
    RequestField("top_p", BOTH, "supported", "nucleus sampling", 0.9),
    RequestField("stop", BOTH, "supported", "up to 4 strings; the text before the stop is returned", ["\n\n"]),
    RequestField("stream", BOTH, "supported", "server-sent events", True),
    RequestField("stream_options", BOTH, "supported", "`include_usage` adds a final chunk with the usage and no "
                 "choices; `include_obfuscation` is ignored (no padding is added)", {"include_usage": True}),
    RequestField("seed", BOTH, "supported", "per-row random stream; with n > 1, choice i > 0 uses a seed derived "
                 "from (seed, i)", 7),
    RequestField("n", BOTH, "supported", "1 to 16 choices, each its own row of the batch", 2),
    RequestField("logprobs", CHAT, "supported", "true/false: each token's log-probability (log-softmax of the "
                 "model's raw logits, before temperature, bias or grammar)", True),
    RequestField("logprobs", COMPLETIONS, "supported", "0 to 5 alternatives per token, plus the chosen one (raw "
                 "log-softmax, as for chat)", 2),
    RequestField("top_logprobs", CHAT, "supported", "0 to 20 alternatives per token (needs logprobs: true)", 2),
    RequestField("response_format", CHAT, "supported", "text, json_object, json_schema: constrained decoding "
                 "(llguidance); `strict` is accepted, output always follows the schema", {"type": "json_object"}),
    RequestField("logit_bias", BOTH, "supported", "token id -> bias in [-100, 100], added to the logits before "
                 "choosing (up to 300 tokens)", {"0": -100}),
    RequestField("memory", CHAT, "supported", "persona's extension, not OpenAI's: true puts the best entries of "
                 "the user adapter's memory in a system message, false keeps them out, absent follows `serve "
                 "--memory`; the answer's `resolved.memories` names them (docs/MEMORY.md)", True),
    # --- ignored by design
    RequestField("user", BOTH, "ignored", "an end-user id for OpenAI's abuse monitoring; persona knows the caller "
                 "from its token", "end-user-1"),
    RequestField("safety_identifier", CHAT, "ignored", "the same, under its newer name", "end-user-1"),
    RequestField("metadata", CHAT, "ignored", "tags for OpenAI's stored completions; persona stores none (its "
                 "interaction log is `--log-interactions`)", {"team": "a"}),
    RequestField("service_tier", CHAT, "ignored", "one tier: every request is scheduled the same", "auto"),
    RequestField("parallel_tool_calls", CHAT, "ignored", "only shapes tool calls, and tools are refused", False),
    RequestField("prompt_cache_key", CHAT, "ignored", "a routing hint for OpenAI's prompt cache; it cannot change "
                 "the output", "k1"),
    RequestField("prompt_cache_retention", CHAT, "ignored", "the same cache's lifetime", "in_memory"),
    RequestField("prompt_cache_options", CHAT, "ignored", "the same cache's options", {"mode": "implicit"}),
    # --- refused with 400 (param = the field) unless the value asks for nothing
    RequestField("tools", CHAT, "refused", "no tool calling", [{"type": "function", "function": {"name": "f"}}],
                 neutral=([],)),
    RequestField("tool_choice", CHAT, "refused", "no tool calling (\"none\" is accepted)", "auto", neutral=("none",)),
    RequestField("functions", CHAT, "refused", "deprecated tool calling", [{"name": "f"}], neutral=([],)),
    RequestField("function_call", CHAT, "refused", "deprecated tool calling (\"none\" is accepted)", "auto",
                 neutral=("none",)),
    RequestField("audio", CHAT, "refused", "text only", {"voice": "alloy", "format": "wav"}),
    RequestField("modalities", CHAT, "refused", "text only ([\"text\"] is accepted)", ["text", "audio"],
                 neutral=(["text"],)),
    RequestField("frequency_penalty", BOTH, "refused", "not implemented (0 is accepted)", 0.5, neutral=(0, 0.0)),
    RequestField("presence_penalty", BOTH, "refused", "not implemented (0 is accepted)", 0.5, neutral=(0, 0.0)),
    RequestField("prediction", CHAT, "refused", "no predicted outputs", {"type": "content", "content": "x"}),
    RequestField("reasoning_effort", CHAT, "refused", "no reasoning controls", "low"),
    RequestField("verbosity", CHAT, "refused", "no verbosity control", "low"),
    RequestField("web_search_options", CHAT, "refused", "no web search", {}),
    RequestField("moderation", CHAT, "refused", "no moderation", {"model": "omni-moderation-latest"}),
    RequestField("store", CHAT, "refused", "nothing is stored for retrieval (false is accepted)", True,
                 neutral=(False,)),
    RequestField("echo", COMPLETIONS, "refused", "the prompt is not echoed (false is accepted)", True,
                 neutral=(False,)),
    RequestField("suffix", COMPLETIONS, "refused", "no fill-in-the-middle (\"\" is accepted)", "end", neutral=("",)),
    RequestField("best_of", COMPLETIONS, "refused", "no server-side best-of (1 is accepted)", 3, neutral=(1,)),
)


def request_field(endpoint: Endpoint, name: str) -> RequestField | None:
    for spec in REQUEST_FIELDS:
        if spec.name == name and endpoint in spec.endpoints:
            return spec
    return None


def refusal(endpoint: Endpoint, name: str, value: Any) -> str | None:
    """Why the field ``name`` with ``value`` is refused on ``endpoint`` (None when it is accepted)."""
    spec = request_field(endpoint, name)
    if spec is None:
        return f"unknown parameter {name!r}: persona does not implement it (see docs/SERVING.md for every field)"
    if spec.status != "refused" or value is None or any(_same(value, v) for v in spec.neutral):
        return None
    return f"{name} is not supported by persona: {spec.note}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # False is not 0 here
        return type(a) is type(b) and a == b
    return a == b


# ---------------------------------------------------------------------------------------- logprobs
def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one stream chunk)."""
    return {
        "content": [
            {
                "token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a legacy completion: ``text_offset`` counts characters of the
    completion text from ``offset`` (0 for the first token; a stream carries it across chunks);
    ``top_logprobs[i]`` holds the requested alternatives and always the chosen token."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{**{t.token: t.logprob for t in e.top}, e.token: e.logprob} for e in entries],
        "text_offset": offsets,
    }
