"""llm-compressor's GPTQ on a model folder, for ``bench_calibrate`` (run in its own process, with
llm-compressor's packages first on PYTHONPATH; imports no dtypelab).

    python -m benchmarks.llmc_gptq FOLDER IDS.safetensors OUT GROUP THREADS [BITS]   # prints one JSON line
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader


def main(folder: str, ids_file: str, out: str, group: str, threads: str, bits: str = "4") -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(threads))
    ids = load_file(ids_file)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    scheme = {"weights": {"num_bits": int(bits), "type": "int", "symmetric": True, "strategy": "group",
                          "group_size": int(group)}, "targets": ["Linear"]}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                          dampening_frac=0.01)
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    dataset = DataLoader(rows, batch_size=1,
                         collate_fn=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - start
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1), "folder": out}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
