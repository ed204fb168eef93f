"""GPU bench in one call: plain TRL SFT vs lora_ns defaults, and QLoRA 7B, on random-init real shapes.

    bash bench/gpu.sh                       # on the GPU machine (installs the carried wheels first)
    bash bench/gpu.sh --device cpu --tiny   # the same code path on CPU with tiny shapes (~2-3 min)
    python bench/gpu.py --prepare-wheels .whl   # slim the downloaded wheels to fit the 64 MiB carry

Weights cannot travel to the GPU machine, configs can: each section builds a random-init model from a
real architecture config (Qwen2.5-0.5B / 1.5B / 7B shapes) on the device, saves it to local disk with
the project's builtin BPE tokenizer, and runs bench/throughput.py's variants on it (fresh subprocess
each, TRL's own non-pad token counter). Reported per run: tokens/s, MFU = 6 N tokens/s / peak (N = all
base parameters, 989 TFLOPS for H100/H200 dense bf16), torch.cuda.max_memory_allocated, and
lora_ns.memory's estimate beside it. Results go to OUT/gpu_results.json after every section, so a
section cut by the time budget never loses the earlier ones.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
import throughput as tp  # noqa: E402  (bench/throughput.py: data, recipe, probe driver, figures)

QWEN = {"vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6,
        "max_position_embeddings": 32768, "hidden_act": "silu", "rms_norm_eps": 1e-6}
SHAPES = {
    "qwen2.5-0.5b": {**QWEN, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864},
    "qwen2.5-1.5b": {**QWEN, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960},
    "qwen2.5-7b": {**QWEN, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
TINY = {"vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128}
# (name, shape, variants, steps, batch, max_length, quantized, seconds needed to start it)
SECTIONS = [("0.5b-lora", "qwen2.5-0.5b", ["trl", "lora_ns"], 30, 8, 1024, False, 60),
            ("1.5b-lora", "qwen2.5-1.5b", ["trl", "lora_ns"], 25, 8, 1024, False, 90),
            ("7b-qlora", "qwen2.5-7b", ["lora_ns"], 20, 1, 1024, True, 200)]


def build_model(shape: dict[str, Any], folder: Path, device: str, tiny: bool) -> dict[str, Any]:
    """Random-init weights made on the device itself, saved (bf16 on GPU) with the builtin tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from lora_ns.builtin_models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-qwen2"))
    cfg = {**shape, **(TINY if tiny else {})}
    config = Qwen2Config(**cfg, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, max_shard_size="20GB")
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return cfg


def run(name: str, work: Path, index: int, cfg: dict[str, Any], recipe: Path, device: str,
        overrides: list[str], timeout: float, torch_profile: Path | None = None) -> dict[str, Any]:
    """throughput.run_variant with a timeout and free-form recipe overrides; `torch_profile`: write
    torch.profiler's tables of steps 3-4 there."""
    run_dir = work / f"run{index:02d}-{name}"
    run_dir.mkdir()
    env = {**os.environ, "BENCH_RESULT": str(run_dir / "result.json"), "BENCH_SCRIPT": tp.__file__,
           "HF_DATASETS_CACHE": str(run_dir / "hf_datasets"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if torch_profile:
        env["BENCH_TORCH_PROFILE"] = str(torch_profile)
    if (variant := name.split("-", 2)[-1]) in tp.TRL_VARIANTS:  # "1.5b-lora-trl-gc" -> "trl-gc"
        kind, payload = variant, json.dumps({**cfg, "output_dir": str(run_dir / "out"),
                                            "trl_args": tp.TRL_VARIANTS[variant]})
    else:
        kind = "lora_ns"
        payload = json.dumps([str(recipe), f"training.output_dir={run_dir / 'out'}", *overrides])
    started = time.time()
    try:
        with open(run_dir / "log.txt", "w") as log:
            proc = subprocess.run([sys.executable, "-c", tp._DRIVER, kind, payload], cwd=run_dir, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout, 1))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    result = run_dir / "result.json"
    if code or not result.is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-4:]
        return {"error": f"exit {code}: " + " | ".join(tail)}
    return {**json.loads(result.read_text()), "started": started, "wall_s": time.time() - started}


def estimate(name: str, recipe: Path, overrides: list[str], config, cfg: dict[str, Any]):
    """lora_ns.memory for this run: from the recipe for lora_ns, from the config for the plain script."""
    from lora_ns.config import load_recipe
    from lora_ns.memory import estimate, estimate_for_recipe, shape_from_config

    if name in tp.TRL_VARIANTS:  # TRL defaults (trl-gc: checkpointing off); LoRA dropout 0.05
        return estimate(shape=shape_from_config(config), batch=cfg["batch"], seq=cfg["max_length"],
                        weights_dtype="bf16" if cfg["device"] == "cuda" else "fp32", lora_r=16,
                        checkpointing=name == "trl")
    return estimate_for_recipe(load_recipe(recipe, overrides))


def section(spec, work: Path, args, deadline: float) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    label, shape_name, variants, steps, batch, max_length, quantized, _ = spec
    if args.tiny:
        steps, batch, max_length = 4, 2, 128
    folder = work / shape_name
    t0 = time.time()
    build_model(SHAPES[shape_name], folder, args.device, args.tiny)
    built_s = time.time() - t0
    from transformers import AutoTokenizer

    rows = max(64, 2 * steps * batch)
    data = work / f"{label}.jsonl"
    lengths = tp.write_data(data, AutoTokenizer.from_pretrained(folder), rows, 16, max_length)
    ns = argparse.Namespace(device=args.device, steps=steps, batch_size=batch, grad_accum=1,
                            max_length=max_length)
    recipe = work / f"{label}.yaml"
    tp.write_recipe(recipe, str(folder), work / f"{label}.jsonl", ns)
    base = ["quantization.load_in_4bit=true"] if quantized else []
    if args.variants:  # the plain TRL script has no 4-bit path: QLoRA sections run lora_ns variants only
        variants = [v for v in args.variants.split(",") if not (quantized and v in tp.TRL_VARIANTS)] or variants
    runs = [(v, [*base, *tp.variant_overrides(v)]) for v in variants]
    if args.device == "cuda" and importlib.util.find_spec("flash_attn") and not quantized:
        runs.append(("lora_ns", [*base, "model.attn_implementation=flash_attention_2"]))  # packs by default
    cfg = {"model_path": str(folder), "data": str(data), "device": args.device, "steps": steps,
           "batch": batch, "grad_accum": 1, "max_length": max_length}
    config = AutoConfig.from_pretrained(folder)
    from lora_ns.memory import shape_from_config

    shape = shape_from_config(config)
    n_params = shape.quantizable + shape.other  # every base parameter (4-bit ones too) for 6N
    peak = args.peak_tflops or tp.auto_peak_tflops(args.device)
    out = {"shape": shape_name, "config": {k: getattr(config, k, None) for k in SHAPES[shape_name]},
           "params": n_params, "build_s": round(built_s, 1), "steps": steps, "batch": batch,
           "max_length": max_length,
           "rows_tokens": [min(lengths), max(lengths)], "quantized": quantized, "runs": {}}
    for index, (name, overrides) in enumerate(runs):
        key = name + ("+fa2" if any("flash" in o for o in overrides) else "")
        profile = Path(args.out) / f"torch_profile-{label}-{key}.txt" if args.torch_profile else None
        remaining = deadline - time.time()
        if remaining < 30:
            out["runs"][key] = {"error": "skipped: time budget"}
            continue
        record = run(f"{label}-{name}", work, index, cfg, recipe, args.device, overrides, remaining - 5, profile)
        if "error" not in record:
            record = tp.figures(record, peak)
            tps = record.get("tokens_per_s")
            record["mfu"] = 6 * n_params * tps / (peak * 1e12) if peak and tps else None
            try:
                est = estimate(name, recipe, overrides, config, cfg)
                record["estimate_bytes"], record["estimate_lines"] = est.total, est.lines()
            except Exception as err:  # the bench reports, never dies on the estimate
                record["estimate_error"] = repr(err)
        out["runs"][key] = record
        print(f"  {label} {key}: " + (record["error"] if "error" in record else
              f"{record.get('tokens_per_s') or 0:.0f} tok/s"), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def print_table(results: dict[str, Any]) -> None:
    cols = ["section", "variant", "tok/s", "x trl", "MFU", "max alloc GiB", "estimate GiB", "est/meas",
            "grad ckpt", "packing", "startup s"]
    print(" | ".join(f"{c:>13}" for c in cols))
    for label, sec in results["sections"].items():
        trl = (sec.get("runs", {}).get("trl") or {}).get("tokens_per_s")
        for key, r in sec.get("runs", {}).items():
            if "error" in r:
                print(f"{label:>13} | {key:>13} | {r['error'][:200]}")
                continue
            meas = (r.get("cuda_max_allocated_mb") or 0) / 1024
            est = (r.get("estimate_bytes") or 0) / 2**30
            tps, args = r.get("tokens_per_s") or 0, r.get("args") or {}
            cells = [label, key, f"{tps:.0f}", f"{tps / trl:.2f}" if trl else "-",
                     f"{r['mfu']:.1%}" if r.get("mfu") else "-", f"{meas:.2f}" if meas else "-",
                     f"{est:.2f}" if est else "-", f"{est / meas:.2f}" if meas and est else "-",
                     str(args.get("gradient_checkpointing")), str(args.get("packing")),
                     f"{r.get('startup_s', 0):.1f}"]
            print(" | ".join(f"{c:>13}" for c in cells))


def device_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}
    for pkg in ("trl", "peft", "accelerate", "bitsandbytes", "datasets", "flash_attn"):
        try:
            found = importlib.util.find_spec(pkg)
            info[pkg] = getattr(__import__(pkg), "__version__", "?") if found else None
        except Exception as err:  # a broken optional package fails its own runs, not the bench
            info[pkg] = f"import failed: {err!r}"[:200]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def bench(args) -> int:
    start = time.time()
    deadline = start + args.budget_s
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(args.out or os.environ.get("OUT") or ".")
    args.out = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"bench": "gpu", "date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device,
                               "tiny": args.tiny, "budget_s": args.budget_s, "info": device_info(args.device),
                               "sections": {}}
    print(json.dumps(results["info"]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="lora_ns_gpu_", dir=args.work))
    wanted = [s for s in SECTIONS if not args.sections or s[0] in args.sections.split(",")]
    for spec in wanted:
        label, need = spec[0], spec[-1]
        if not args.tiny and deadline - time.time() < need:
            results["sections"][label] = {"skipped": f"time budget: {deadline - time.time():.0f} s left"}
            print(f"{label}: skipped (time budget)", flush=True)
            continue
        t0 = time.time()
        try:
            results["sections"][label] = section(spec, work, args, deadline)
        except Exception as err:  # keep the other sections' figures
            results["sections"][label] = {"error": repr(err)[:500]}
        results["sections"][label]["section_s"] = round(time.time() - t0, 1)
        (out_dir / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    results["total_s"] = round(time.time() - start, 1)
    (out_dir / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(results)
    print(f"total {results['total_s']} s; JSON in {out_dir / 'gpu_results.json'}")
    ok = all("error" not in r for s in results["sections"].values() for r in s.get("runs", {}).values())
    return 0 if ok and all("error" not in s for s in results["sections"].values()) else 1


# --- wheels for a machine without network ---------------------------------------------------------------

# Members left out of the carried wheels (64 MiB per call): bitsandbytes' libraries for CUDA < 13 and
# ROCm/XPU (torch there is CUDA 13), pyarrow's Flight/S3 (optional imports) and test suites, headers.
SLIM = {"bitsandbytes": ("libbitsandbytes_cuda1", "libbitsandbytes_rocm", "libbitsandbytes_xpu"),
        "pyarrow": ("libarrow_flight", "libarrow_python_flight", "_flight.", "libarrow_s3", "_s3fs.",
                    "/tests/", "/include/", "_pyarrow_cpp_tests"),
        "pandas": ("/tests/",)}
KEEP = ("libbitsandbytes_cuda130", "libbitsandbytes_cuda132")


def slim_wheel(path: Path) -> None:
    """Rewrite a wheel without the SLIM members, with a RECORD that lists what is left (and its hashes)."""
    drop = SLIM.get(path.name.split("-")[0], ())
    if not drop:
        return
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name, lines = None, []
        for item in src.infolist():
            name = item.filename
            if name.endswith(".dist-info/RECORD"):
                record_name = name
                continue
            if any(d in name for d in drop) and not any(k in name for k in KEEP):
                continue
            data = src.read(item)
            dst.writestr(item, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    tmp.replace(path)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 4 steps: a dry run")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting sections/runs after this")
    parser.add_argument("--sections", help=f"comma list of: {', '.join(s[0] for s in SECTIONS)}")
    parser.add_argument("--variants", help="comma list, as bench/throughput.py's (trl, trl-gc, lora_ns, lora_ns+gc, "
                        "lora_ns+pack, ...; QLoRA sections leave out the plain script); default: trl,lora_ns / lora_ns")
    parser.add_argument("--torch-profile", action="store_true",
                        help="torch.profiler tables of steps 3-4 of every run, to OUT/torch_profile-*.txt")
    parser.add_argument("--peak-tflops", type=float, help="default: by GPU name (H100/H200: 989)")
    parser.add_argument("--out", help="folder for gpu_results.json (default: $OUT, else .)")
    parser.add_argument("--work", help="scratch folder for the random models (default: the system temp)")
    parser.add_argument("--prepare-wheels", metavar="DIR", help="slim the wheels in DIR in place, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.prepare_wheels:
        for wheel in sorted(Path(args.prepare_wheels).glob("*.whl")):
            slim_wheel(wheel)
            print(f"{wheel.stat().st_size / 1e6:7.2f} MB  {wheel.name}")
        return 0
    return bench(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
