"""HTTP: the OpenAI-compatible server over the engine and the store (docs/SERVING.md).

- ``app``: assembles the FastAPI app (state, error handlers, middleware, routers, shutdown); ``make_server``, ``serve``.
- ``state``: ``ServerConfig`` and the typed ``ServerState`` the routes share (``app.state.persona``).
- ``auth``: the one bearer-token dependency, run once per request, yielding the caller's scope.
- ``body``: the body read after authentication: size cap (413), JSON, schema (400).
- ``schemas``: the request bodies as pydantic models; ``openai_schema``: the table of every OpenAI field.
- ``generation``: from a body to engine rows: refusals, model check against the scope, admission, submission.
- ``streaming``: waiting on the engine: whole answers and server-sent events, cancelled when the client goes.
- ``errors``: every error as OpenAI's JSON, library errors through the table in ``persona.errors``.
- ``metrics``: Prometheus counters labelled by route template; ``admission``: the in-flight limits.
- ``routes/``: one ``APIRouter`` each for completions, models and admin (health, metrics, schema), and
  ``forward`` (the gateway's completions).
- ``gateway``: ``persona serve --upstream``: the front door over upstream servers; ``upstream``: choosing
  one (rendezvous hashing) and failing over; ``relay``: SSE passed through event by event.
"""
