"""The serving benchmark of the issue, in one command: the engine part, then the HTTP server part.

    python benchmarks/serve.py          # ~10 min on 2 CPU cores
    python benchmarks/serve.py --device cuda --random-base arch     # on a GPU (benchmarks/gpu.sh runs this)

Runs benchmarks/serve_engine.py (cold load vs PEFT, mixed-batch throughput vs the base, PEFT and
one-at-a-time, memory) and benchmarks/serve_http.py (16 concurrent clients vs one at a time),
each in its own process so neither's memory or threads affect the other. ``--device``/``--dtype``
(as ``persona serve`` takes them), ``--random-base`` and ``--threads`` go to both; any other
argument goes to serve_engine.py alone (``--adapters 8,32 --parts dacb``).
"""

import argparse
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Any other argument goes to serve_engine.py alone (see its --help).")
parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda where torch sees a GPU)")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the base (auto: bfloat16 on a GPU that has it, else float32)")
parser.add_argument("--random-base", metavar="ARCH", help="random weights of ARCH's architecture (see serve_engine.py)")
parser.add_argument("--threads", type=int, default=2)
args, engine_only = parser.parse_known_args()
shared = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
shared += ["--random-base", args.random_base] if args.random_base else []
for script, extra in (("serve_engine.py", engine_only), ("serve_http.py", [])):
    code = subprocess.call([sys.executable, str(here / script), *shared, *extra])
    if code:
        sys.exit(code)
    print()
