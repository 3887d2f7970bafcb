"""``python -m densecap_core.evaluation [--pairs N]``: measure METEOR start-up and pairs/s through one JVM."""

import argparse
import json

from densecap_core.evaluation.meteor import benchmark

parser = argparse.ArgumentParser(prog="python -m densecap_core.evaluation",
                                 description="Measure METEOR start-up and pairs/s through one JVM.")
parser.add_argument("--pairs", type=int, default=5000, help="pairs to score after warm-up (default 5000)")
parser.add_argument("--references", type=int, default=3, help="references per pair (default 3)")
parser.add_argument("--chunk", type=int, default=None, help="pairs per SCORE/EVAL chunk (default: the scorer's)")
args = parser.parse_args()
print(json.dumps(benchmark(args.pairs, args.references, chunk_pairs=args.chunk)))
