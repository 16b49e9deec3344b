"""CLI commands that generate text with adapters in this process: ``generate`` and ``chat``."""

from __future__ import annotations

import click

from ..refs import MAX_STACK
from ..serving.memory import MemoryConfig
from ..serving.sampling import SamplingParams
from ._common import (emit, field_values, json_option, open_engine, options_from, placement_options, route_top_k_option,
                      store_option)


# The sampling options generate and chat share, generated from SamplingParams' fields.
sampling_options = options_from(SamplingParams, {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
                                                 "top_p": "--top-p", "seed": "--seed", "stop": "--stop"})


def memory_options(f):
    """``--memory`` and its settings (generate, chat, serve): the user adapter's memories in the prompt."""
    f = options_from(MemoryConfig, {"k": "--memory-k", "max_tokens": "--memory-tokens",
                                     "retrieval": "--memory-retrieval"})(f)
    return click.option("--memory", "use_memory", is_flag=True,
                        help="Put the best entries of the user adapter's memory (every interaction logged for it) "
                             "in a system message; see docs/MEMORY.md.")(f)


def memory_setting(use_memory: bool, k: int, max_tokens: int, retrieval: str = "fused") -> MemoryConfig:
    """The engine's ``memory`` from the options: on by default with ``--memory``; without it, a request
    (an HTTP body's ``"memory": true``) opts in, with the same k and budget."""
    return MemoryConfig(default=use_memory, k=k, max_tokens=max_tokens, retrieval=retrieval)


@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="Send PROMPT as plain text instead of a chat message through the chat template.")
@route_top_k_option
@memory_options
@sampling_options
@placement_options
@store_option
@json_option
def generate(model, prompt, raw, route_top_k, use_memory, k, max_tokens, retrieval, device, dtype, store_root, as_json,
             **sampling) -> None:
    """Answer PROMPT with MODEL: an adapter (user:alice), a stack (user:alice+domain:finance) or the base's name.

    \b
    A part of a stack may carry a weight that scales its LoRA delta, in (0, 10]:
    'user:alice+domain:finance*0.5' (quote it: * is a shell wildcard). domain:auto
    lets the router pick domains for PROMPT (--route-top-k of them); --json shows
    the stack that ran ("resolved").

    \b
    Examples:
      persona generate user:alice "What's my dog's name?"
      persona generate 'user:alice+domain:finance*0.5' "Should I buy bonds?"
      persona generate user:alice+domain:auto --route-top-k 2 "Should I buy bonds?"
      persona generate smollm2-135m-instruct "What's my dog's name?"     (the base alone)
      persona generate user:alice "Hi" --device cuda --dtype bfloat16
      persona generate user:alice "What's my cat called?" --memory --json   (memory ids in "memories")
    """
    from ..serving.requests import GenerationRequest

    if use_memory and raw:
        raise click.UsageError("--memory goes into a system message: it needs a chat prompt, not --raw")
    engine = open_engine(store_root, max_resident=MAX_STACK, max_batch=1, route_top_k=route_top_k, device=device,
                         dtype=dtype, memory=memory_setting(use_memory, k, max_tokens, retrieval))
    try:
        request = GenerationRequest(
            model=model, prompt=prompt if raw else None,
            messages=None if raw else ({"role": "user", "content": prompt},),
            params=SamplingParams(**field_values(SamplingParams, sampling)),
        )
        if as_json:
            result = engine.generate([request])[0]
            emit(True, {"model": model, "resolved": list(result.resolved), "memories": list(result.memories),
                        "text": result.text,
                        "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens})
            return
        for delta in engine.stream(request):
            click.echo(delta, nl=False)
        click.echo()
    finally:
        engine.close()


@click.command()
@click.argument("model")
@click.option("--system", default=None, help="A system message for the conversation.")
@route_top_k_option
@memory_options
@sampling_options
@placement_options
@store_option
def chat(model, system, route_top_k, use_memory, k, max_tokens, retrieval, device, dtype, store_root, **sampling) -> None:
    """Chat with MODEL interactively (empty line or Ctrl-D to quit).

    \b
    MODEL is what `persona generate` takes, weighted stacks included. With domain:auto the
    router picks again at every turn, from the conversation's user turns so far.

    \b
    Examples:
      persona chat user:alice
      persona chat user:alice+domain:auto --system "Answer briefly."
      persona chat user:alice --memory          (memories found for each turn are retrieved again)
    """
    from ..serving.requests import GenerationRequest

    engine = open_engine(store_root, max_resident=MAX_STACK, max_batch=1, route_top_k=route_top_k, device=device,
                         dtype=dtype, memory=memory_setting(use_memory, k, max_tokens, retrieval))
    engine.check(model)  # fail before the first prompt
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    click.echo(f"chatting with {model} (empty line to quit)", err=True)
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            request = GenerationRequest(model=model, messages=tuple(messages),
                                        params=SamplingParams(**field_values(SamplingParams, sampling)))
            pieces = []
            for delta in engine.stream(request):
                pieces.append(delta)
                click.echo(delta, nl=False)
            click.echo()
            messages.append({"role": "assistant", "content": "".join(pieces)})
    finally:
        engine.close()


COMMANDS = [generate, chat]
