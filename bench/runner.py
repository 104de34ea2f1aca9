"""The block runner's targets, measured side by side in one run on the demo model.

    python bench/runner.py [--samples 64] [--seq-len 512] [--cases all]

Each case runs in its own process (its peak RSS is that process's ``ru_maxrss``):

- ``read_write``: read every weight of the model's safetensors and write them again (the floor
  of any quantization), against ``rtn``: the data-free ``w4a16-rtn`` streamed into a checkpoint
  (its MSE clip search is most of its time), and ``rtn_minmax``: the same with min-max ranges;
- ``forward``: one fp32 forward pass of the whole model over the calibration set, against
  ``gptq``: GPTQ W4 (groups of 64) streamed into a checkpoint, and ``gptq_in_memory``: the same
  with the model loaded whole and quantized in place (how lowbit ran before the block runner);
- ``workers``: GPTQ with ``--workers 2`` against one worker (on a quarter of the samples), and
  the largest difference of any tensor between the two checkpoints.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CASES = ("read_write", "rtn", "rtn_minmax", "forward", "gptq", "gptq_in_memory", "workers1", "workers2")


def _recipe(name: str) -> Any:
    from lowbit.presets import get_preset
    from lowbit.scheme import with_group_size

    return with_group_size(get_preset(name), 64)


def case(name: str, samples: int, seq_len: int, out: str) -> dict[str, Any]:
    from lowbit import api

    start = time.perf_counter()
    result: dict[str, Any] = {}
    if name == "read_write":
        from safetensors.torch import load_file, save_file

        from lowbit.models import converted_gguf, fetch_demo_model

        directory = converted_gguf(fetch_demo_model())
        for i, f in enumerate(sorted(directory.glob("*.safetensors"))):
            tensors = {k: v.float() for k, v in load_file(f).items()}
            save_file(tensors, f"{out}/copy-{i}.safetensors")
    elif name == "rtn":
        report = api.quantize_to("demo", _recipe("w4a16-rtn"), f"{out}/ckpt", progress=False)
        result["forward_passes"] = report.forward_passes
    elif name == "rtn_minmax":  # the same without the MSE clip search: what the runner itself costs
        import dataclasses

        recipe = _recipe("w4a16-rtn")
        weights = dataclasses.replace(recipe.scheme.weights, observer="minmax", observer_args={})
        recipe = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, weights=weights))
        report = api.quantize_to("demo", recipe, f"{out}/ckpt", progress=False)
        result["forward_passes"] = report.forward_passes
    elif name == "forward":
        model, tok = api.load_model("demo")
        calib = api.calibration_samples(tok, "demo", n_samples=samples, seq_len=seq_len)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in calib.split(4):
                model(input_ids=batch, use_cache=False)
    elif name == "gptq":
        report = api.quantize_to(
            "demo", _recipe("w4a16"), f"{out}/ckpt", samples=samples, seq_len=seq_len, progress=False
        )
        result["quantize_seconds"] = report.seconds
    elif name == "gptq_in_memory":
        model, tok = api.load_model("demo")
        calib = api.calibration_samples(tok, "demo", n_samples=samples, seq_len=seq_len)
        api.quantize(model, _recipe("w4a16"), calib, progress=False)
    elif name.startswith("workers"):
        n = int(name.removeprefix("workers"))
        api.quantize_to(
            "demo",
            _recipe("w4a16"),
            f"{out}/ckpt",
            samples=max(samples // 4, 2),
            seq_len=seq_len,
            progress=False,
            workers=n,
        )
    result["seconds"] = time.perf_counter() - start
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_mb"] = max(result["peak_mb"], children)
    return result


def _run(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        name,
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between the two checkpoints' dequantized weights."""
    from lowbit import api
    from lowbit.modules import QuantLinear

    ma, mb = api.load_quantized(a)[0], api.load_quantized(b)[0]
    worst = 0.0
    for x, y in zip(ma.modules(), mb.modules(), strict=True):
        if isinstance(x, QuantLinear) and isinstance(y, QuantLinear) and x.qweight and y.qweight:
            diff = (x.qweight.dequantize() - y.qweight.dequantize()).abs().max()
            worst = max(worst, float(diff))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--cases", default="all", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.samples, args.seq_len, args.out)))
        return
    wanted = CASES if args.cases == "all" else tuple(args.cases.split(","))
    r: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            out = Path(tmp) / name
            out.mkdir()
            r[name] = _run(name, args, out)
            print(
                f"{name:>15}: {r[name]['seconds']:8.1f} s   peak {r[name]['peak_mb']:7.0f} MB   {r[name]}", flush=True
            )
        if "workers1" in r and "workers2" in r:
            diff = _max_diff(Path(tmp) / "workers1" / "ckpt", Path(tmp) / "workers2" / "ckpt")
    print(f"\ndemo model, {args.samples} x {args.seq_len} calibration tokens, {torch.get_num_threads()} threads")
    if "rtn" in r and "read_write" in r:
        print(
            f"data-free w4a16-rtn: {r['rtn']['seconds'] / r['read_write']['seconds']:.2f}x the time of reading and "
            f"writing the weights ({r['rtn']['forward_passes']} forward passes)"
        )
    if "rtn_minmax" in r and "read_write" in r:
        ratio = r["rtn_minmax"]["seconds"] / r["read_write"]["seconds"]
        print(f"data-free w4a16-rtn with min-max ranges: {ratio:.2f}x the time of reading and writing the weights")
    if "gptq" in r and "forward" in r:
        q = r["gptq"]["quantize_seconds"]
        print(
            f"GPTQ W4 g64: {q / r['forward']['seconds']:.2f}x the time of one fp32 forward pass over the calibration "
            f"set ({q:.0f} s against {r['forward']['seconds']:.0f} s)"
        )
    if "gptq" in r and "gptq_in_memory" in r:
        print(
            f"GPTQ peak memory: {r['gptq']['peak_mb']:.0f} MB streamed, {r['gptq_in_memory']['peak_mb']:.0f} MB with "
            f"the model in memory ({r['gptq']['peak_mb'] / r['gptq_in_memory']['peak_mb']:.2f}x)"
        )
    if "workers1" in r and "workers2" in r:
        print(
            f"--workers 2: {r['workers1']['seconds'] / r['workers2']['seconds']:.2f}x the speed of one worker; "
            f"largest difference of any tensor {diff:.3g}"
        )


if __name__ == "__main__":
    main()
