"""The serving benchmark of the issue, in one command: the engine part, then the HTTP server part.

    python benchmarks/serve.py          # ~10 min on 2 CPU cores

Runs benchmarks/serve_engine.py (cold load vs PEFT, mixed-batch throughput vs the base, PEFT and
one-at-a-time, memory) and benchmarks/serve_http.py (16 concurrent clients vs one at a time),
each in its own process so neither's memory or threads affect the other.
"""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
for script in ("serve_engine.py", "serve_http.py"):
    code = subprocess.call([sys.executable, str(here / script)])
    if code:
        sys.exit(code)
    print()
