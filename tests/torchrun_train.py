"""`torchrun ... tests/torchrun_train.py RUNS.json`: train.main once per argument list of RUNS.json, in order,
in the processes torchrun starts, so that the multi-process tests (tests/test_distributed.py) start processes
and import torch once for all their runs."""

import json
import sys

import train

for argv in json.loads(open(sys.argv[1]).read()):
    train.main(argv)
