"""How fast `minildm explore` answers, and whether the command line's thread choice pays.

Not a test: `python tests/benchmark_explore.py [--repeats 5]`. It starts the explorer's server in
a fresh process (one torch thread, as `minildm explore` runs), sends 25-step tiny-SD requests and
prints the seconds to the first streamed step and to the final image (after one warm-up request,
which loads the model); then times `minildm sd "a red circle on a blue background"` as a user runs
it (torch's default threads, which the command lowers to one for the embedded models) against
OMP_NUM_THREADS=1, each in fresh processes, so both include start-up.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

SERVER = """
import sys, torch
from minildm.tools.explore import make_server
torch.set_num_threads(1)
server = make_server("127.0.0.1", 0, {})
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def time_requests(port: int, repeats: int):
    body = json.dumps({"system": "sd", "prompt": "a red triangle on a white background"}).encode()
    rows = []
    for i in range(repeats + 1):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body)
        started = time.perf_counter()
        first = None
        with urllib.request.urlopen(request) as response:
            for _line in response:
                first = first or time.perf_counter() - started
        rows.append((first, time.perf_counter() - started))
        label = "warm-up (loads the model)" if i == 0 else f"request {i}"
        print(f"{label}: first step after {rows[-1][0]:.2f} s, image after {rows[-1][1]:.2f} s")
    finals = sorted(total for _, total in rows[1:])
    print(f"median time to the final image of 25 steps: {finals[len(finals) // 2]:.2f} s")


def time_command(environment: dict, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "minildm",
                "sd",
                "a red circle on a blue background",
                "--out",
                "/tmp/minildm-benchmark",
                "--overwrite",
            ],
            env=environment,
            check=True,
            capture_output=True,
        )
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[len(seconds) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        time_requests(port, args.repeats)
    finally:
        server.terminate()
    default = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    as_run = time_command(default, 3)
    one = time_command({**default, "OMP_NUM_THREADS": "1"}, 3)
    print(
        f"minildm sd (tiny), median of 3 fresh processes: {as_run:.2f} s as run, "
        f"{one:.2f} s with OMP_NUM_THREADS=1 (ratio {as_run / one:.2f})"
    )


if __name__ == "__main__":
    main()
