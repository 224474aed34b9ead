"""Loading a checkpoint straight into fp16 against the usual route, float32 first and then ``.half()``.

``dtypelab.load(spec, dtype="fp16")`` passes the dtype to ``from_pretrained``, which converts tensor by
tensor while reading the memory-mapped safetensors file; ``AutoModel.from_pretrained(path).half()`` builds
the float32 model first (timed with ``AutoTokenizer.from_pretrained``, since ``load`` reads the tokenizer
too). Each route runs in a fresh process (VmHWM starts at zero there) on ``minilm`` (all-MiniLM-L6-v2,
90.9 MB in float32); figures are the peak RSS the load adds, as a multiple of the fp16 model's footprint,
and the load's wall time, each the median of 3 processes.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from dtypelab.report import Table

from .harness import print_table

_SCRIPT = """
import os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers
from transformers.utils import logging
logging.disable_progress_bar()
import dtypelab
from dtypelab.models import minilm_path

def peak_bytes():  # VmHWM resets at exec; ru_maxrss would inherit the parent's high-water mark
    return 1024 * next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

path = minilm_path()
transformers.AutoConfig.from_pretrained(path)  # imports done before the measurement
transformers.BertModel
before, start = peak_bytes(), time.perf_counter()
if sys.argv[1] == "dtypelab":
    model = dtypelab.load("minilm", "fp16").model
elif sys.argv[1] == "fp32-then-half":  # with the tokenizer, as dtypelab.load reads it too
    model = transformers.AutoModel.from_pretrained(path).half()
    transformers.AutoTokenizer.from_pretrained(path)
else:
    model = dtypelab.load("minilm", "fp32").model
seconds = time.perf_counter() - start
print(peak_bytes() - before, seconds, dtypelab.inspect_model(model).footprint_bytes)
"""

ROUTES = {"dtypelab": "dtypelab.load(minilm, dtype=fp16)",
          "fp32-then-half": "AutoModel.from_pretrained(path).half() + AutoTokenizer",
          "fp32": "dtypelab.load(minilm, dtype=fp32) (for scale)"}


def _measure(route: str) -> tuple[int, float, int]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, route], capture_output=True, text=True, check=True)
    peak, seconds, footprint = done.stdout.split()
    return int(peak), float(seconds), int(footprint)


def run(repeat: int = 3) -> Table:
    medians = {}  # route -> (peak bytes, seconds, model footprint bytes)
    for route in ROUTES:
        runs = [_measure(route) for _ in range(repeat)]
        medians[route] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
    fp16_bytes = medians["dtypelab"][2]  # the fp16 model's footprint, the unit of the ratio column
    rows = [[label, round(medians[route][0] / 1e6, 1), round(medians[route][0] / fp16_bytes, 2),
             round(medians[route][1], 3)] for route, label in ROUTES.items()]
    return Table(f"Loading minilm in fp16 (fp16 footprint {fp16_bytes / 1e6:.1f} MB; median of {repeat} "
                 "fresh processes)", ["route", "extra peak RSS MB", "x fp16 footprint", "load s"], rows)


if __name__ == "__main__":
    print_table(run())
