"""How long GPT.from_pretrained takes and how much memory it needs, for a GPT-2-124M-shaped model.

    python benchmarks/load_pretrained.py [--layout gpt2|llama] [--repeats 5] [--dir DIR]

Writes a Hugging Face folder with random weights (float32, GPT-2 124M's shape: V 50257, T 1024, 12 layers,
12 heads, C 768; or a Llama of the same width and depth), then in a fresh Python process for each load:
the peak resident memory added by the load (VmHWM after the load minus VmRSS before it, with the
high-water mark reset first where the kernel allows) as a multiple of the model's float32 size, and the
wall time of the load. As an anchor, the same process times safetensors.numpy.load_file of the same file
(it reads every tensor into memory, with no model built), when the safetensors package is installed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
import numpy as np
from tinygrad_llm.model import GPT

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
t0 = time.perf_counter()
model = GPT.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - t0
peak = status("VmHWM")
anchor = None
if sys.argv[3] == "anchor":
    try:
        from safetensors.numpy import load_file
        t0 = time.perf_counter()
        arrays = load_file(os.path.join(sys.argv[1], "model.safetensors"))
        anchor = time.perf_counter() - t0
        del arrays
    except ImportError:
        pass
print(json.dumps({"seconds": seconds, "added_peak_bytes": peak - before, "hwm_reset": reset,
                  "params": model.num_params(), "anchor_seconds": anchor}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layout", default="gpt2", choices=["gpt2", "llama"], help="which Hugging Face layout to load")
    parser.add_argument("--repeats", type=int, default=5, help="loads, each in a fresh process")
    parser.add_argument("--dir", default=None, help="where to write the model folder (default: a temporary folder)")
    args = parser.parse_args()
    from tinygrad_llm.model import GPT, GPTConfig

    kw = {} if args.layout == "gpt2" else dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
                                               tie_embeddings=False, mlp_hidden=2048)
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp) / f"{args.layout}-124m"
        if not (folder / "model.safetensors").is_file():
            t0 = time.perf_counter()
            GPT(config, rng=np.random.default_rng(0)).save_pretrained(folder)
            print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        runs = []
        for i in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(ROOT), "anchor" if i else "-"],
                                 check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        float32_bytes = runs[0]["params"] * 4
        ratios = [r["added_peak_bytes"] / float32_bytes for r in runs]
        seconds = [r["seconds"] for r in runs]
        anchors = [r["anchor_seconds"] for r in runs if r["anchor_seconds"] is not None]
        result = {"layout": args.layout, "params": runs[0]["params"], "file_bytes": (folder / "model.safetensors").stat().st_size,
                  "float32_bytes": float32_bytes, "hwm_reset": runs[0]["hwm_reset"],
                  "peak_ratio_max": round(max(ratios), 3), "peak_ratio_median": round(statistics.median(ratios), 3),
                  "load_s_first": round(seconds[0], 3), "load_s_median": round(statistics.median(seconds), 3),
                  "load_s_max": round(max(seconds), 3),
                  "anchor_load_file_s_median": round(statistics.median(anchors), 3) if anchors else None}
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
