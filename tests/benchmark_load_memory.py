"""Peak memory of loading the official-size CLIP ViT-L/14 text encoder from safetensors.

Not a test (timings and memory depend on the machine): run `python tests/benchmark_load_memory.py`.
It writes a random-weights ViT-L/14 folder, then in a fresh process measures the growth of peak
resident memory (VmHWM) over the process's size after imports, through `load_component` and
one forward pass plus a read of every weight. Memory-mapped weights count once, as file pages;
a loader that copied them (or built the module on the CPU before loading) would show ~2x.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT = 1.3  # peak growth / weight bytes


def peak_rss_bytes() -> int:
    # VmHWM, the peak resident set of this process image (Linux). Not ru_maxrss: that survives
    # exec, so it would report the parent's peak from writing the weights.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB


def measure(folder: Path):
    import torch

    import minildm

    baseline = peak_rss_bytes()
    start = time.perf_counter()
    model = minildm.load_component(folder)
    loaded, load_seconds = peak_rss_bytes(), time.perf_counter() - start
    with torch.no_grad():
        model(minildm.CLIPTokenizer()(["a photograph of an astronaut riding a horse"]))
        sum(
            p.sum() for p in model.parameters()
        )  # the embedding lookup reads few rows: touch them all
    weight_bytes = (folder / "model.safetensors").stat().st_size
    growth = peak_rss_bytes() - baseline
    print(
        json.dumps(
            {
                "weights_MB": weight_bytes / 1e6,
                "load_seconds": round(load_seconds, 3),
                "peak_growth_after_load_MB": (loaded - baseline) / 1e6,
                "peak_growth_after_forward_MB": growth / 1e6,
                "ratio": round(growth / weight_bytes, 3),
            }
        )
    )
    return growth / weight_bytes


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        ratio = measure(Path(sys.argv[2]))
        sys.exit(0 if ratio <= LIMIT else 1)
    from conftest import clip_hub_layout
    from safetensors.torch import save_file

    from minildm.clip import CLIP_VIT_L_14, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "text_encoder"
        folder.mkdir()
        model = CLIPTextModel(CLIP_VIT_L_14)  # random init; the file layout is what matters here
        state = clip_hub_layout(model.state_dict())
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "architectures": ["CLIPTextModel"],
                    "hidden_size": 768,
                    "intermediate_size": 3072,
                    "num_hidden_layers": 12,
                    "num_attention_heads": 12,
                    "hidden_act": "quick_gelu",
                }
            )
        )
        del model, state
        result = subprocess.run([sys.executable, __file__, "--measure", str(folder)])
        verdict = "within" if result.returncode == 0 else "ABOVE"
        print(f"peak memory growth {verdict} {LIMIT}x the weights' bytes")
        sys.exit(result.returncode)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
