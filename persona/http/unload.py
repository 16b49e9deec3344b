"""Forgetting deleted adapters on the upstreams: the gateway unloads the names it sent.

vLLM keeps every LoRA it resolved under the name a client sent (``OpenAIServingModels.lora_requests``)
until that name is unloaded, so after ``persona delete user:bob`` a replica that served
``user:bob@v1`` would still answer a client that calls it directly with that name. The gateway knows
which pinned names it sent to which upstream; :class:`SentNames` remembers them and, every
``interval_s``, asks the store whether each name's versions still exist. A name any of whose parts
is gone (its adapter deleted: version numbers are never reused, so a deleted version never comes
back) is unloaded with ``POST /v1/unload_lora_adapter`` on that upstream, with the gateway's key.

- 200: unloaded. 404: the upstream does not hold it (evicted, restarted, or not vLLM: persona's own
  server has no such route and checks the store on every request anyway). Either way it is dropped.
- Anything else (a connection error, a 5xx, the key refused): kept and tried again at the next sweep,
  and logged, so a replica that was down is cleaned when it is back.

What this cannot do: names sent by another gateway process, or by this one before a restart, are not
known here (docs/SCALING.md says how to unload them by hand); beyond ``max_names`` the oldest names
are no longer tracked (logged once). vLLM drops the name at once; the weights stay in its GPU LRU until
evicted, unreachable by any name.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import anyio
import httpx

from ..refs import StackPart

log = logging.getLogger("persona.http.app")

UNLOAD_PATH = "/v1/unload_lora_adapter"


@dataclass(frozen=True)
class Unloaded:
    """One unload attempt: the upstream, the name, and its outcome (``unloaded``, ``not_held``, ``failed``)."""

    upstream: str
    name: str
    outcome: str


class SentNames:
    """The pinned names this gateway sent to each upstream, and the sweep that unloads deleted ones.

    ``record`` is called from the request path (cheap, no I/O); ``sweep`` reads the store in a worker
    thread and sends the unloads; ``run`` sweeps every ``interval_s`` until cancelled.
    """

    def __init__(self, store, *, interval_s: float = 10.0, max_names: int = 100_000,
                 on_unload: Callable[[Unloaded], None] | None = None):
        self.store = store
        self.interval_s = interval_s
        self.max_names = max_names
        self._on_unload = on_unload or (lambda result: None)
        self._sent: OrderedDict[tuple[str, str], tuple[StackPart, ...]] = OrderedDict()
        self._truncated = False

    def __len__(self) -> int:
        return len(self._sent)

    def record(self, upstream: str, name: str, pinned: Sequence[StackPart]) -> None:
        """Remember that ``name`` (the pinned stack ``pinned``) went to ``upstream``; the base is never recorded."""
        if not pinned:
            return
        key = (upstream, name)
        self._sent[key] = tuple(pinned)
        self._sent.move_to_end(key)
        while len(self._sent) > self.max_names:
            self._sent.popitem(last=False)
            if not self._truncated:
                self._truncated = True
                log.warning("the gateway tracks at most %d sent adapter names for unloading; older ones are no "
                            "longer unloaded on delete (docs/SCALING.md: unload by hand)", self.max_names)

    def gone(self) -> list[tuple[str, str]]:
        """The (upstream, name) pairs sent whose versions no longer all exist in the store (reads the store)."""
        versions: dict[str, set[int]] = {}

        def exists(part: StackPart) -> bool:
            ref = part.ref
            if ref.id not in versions:
                versions[ref.id] = set(self.store.version_numbers(ref.id)) if self.store.exists(ref.id) else set()
            return ref.version in versions[ref.id]

        return [key for key, pinned in list(self._sent.items()) if not all(exists(p) for p in pinned)]

    async def sweep(self, client: httpx.AsyncClient, headers: dict[str, str]) -> list[Unloaded]:
        """Unload every sent name whose adapter version was deleted; returns what was tried."""
        if not self._sent:
            return []
        results = []
        for upstream, name in await anyio.to_thread.run_sync(self.gone):
            try:
                response = await client.post(upstream + UNLOAD_PATH, json={"lora_name": name}, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                status, detail = None, f"{type(exc).__name__}: {exc}"
            if status in (200, 404):
                self._sent.pop((upstream, name), None)
                outcome = "unloaded" if status == 200 else "not_held"
                log.info("upstream %s: %s deleted adapter name %s", upstream, outcome.replace("_", " "), name)
            else:
                outcome = "failed"
                detail = detail if status is None else f"HTTP {status}"
                log.warning("upstream %s did not unload the deleted adapter name %s (%s); trying again in %g s",
                            upstream, name, detail, self.interval_s)
            result = Unloaded(upstream, name, outcome)
            self._on_unload(result)
            results.append(result)
        return results

    async def run(self, client_for: Callable[[], httpx.AsyncClient], headers: dict[str, str]) -> None:
        """Sweep every ``interval_s`` until cancelled; a failed sweep is logged, never fatal."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep(client_for(), headers)
            except Exception as exc:  # noqa: BLE001 - e.g. the store unreadable for a moment: next sweep
                log.warning("unloading deleted adapters from the upstreams failed: %s: %s", type(exc).__name__, exc)


def unload_headers(api_key: str | None) -> dict[str, Any]:
    """The headers of an unload: the gateway's own key, never a client's token."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
