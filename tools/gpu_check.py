"""The GPU check's steps (tools/gpu_check.sh is the entry point; docs/gpu.md says what to run and
where the numbers go). Each step is one of the project's own commands, run as a subprocess:

  1. python tools/qwen_folder.py --size 3b   a Qwen2.5-VL-3B-Instruct folder: real config, real
                                             tokenizer, random bf16 weights (no download)
  2. python data.py synth                    a small synthetic set (2 cities, one map each)
  3. python tools/memplan.py --gpus 1 ...    the plan's peak for the train.py flags of step 5
  4. python bench.py ... --max-new-tokens T  step breakdown and rollout tokens/s, T = 256 and 2,048
  5. python train.py ... --max-steps 2       2 GRPO steps; peak_cuda_gb (max_memory_allocated) vs 3

GPU_CHECK_CPU=1: the same steps on a CPU with the reduced folder (--size cpu), 4 new tokens, one
bench run.
Writes OUT/gpu_check.json (every number, device, versions, date), OUT/gpu_check.txt (a summary)
and OUT/gpu_check.log (every command and its output); the JSON is rewritten after each step, so
a run cut short still leaves what it measured.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.environ.get("GPU_CHECK_CPU") == "1"
# One question x K=8 at the default image budget, bf16, grad checkpointing, on one GPU. One
# process holds the whole fp32 model, its gradients and AdamW state: for the 3B that is 60 GB, and
# with the reference model and autocast's bf16 copies 75 GB, over an 80 GB card's budget
# (docs/memory.md). The language model alone is trained and the KL term is off, so the same step
# fits an H100 and an H200.
SHARED = ["--bf16", "--grad-checkpointing", "--batch-size", "1", "--group-size", "8",
          "--micro-batch", "4", "--kl", "0", "--freeze-vision"]
if CPU:   # the reduced folder, 2 samples, a 64-token map: seconds on a laptop
    SHARED = ["--grad-checkpointing", "--batch-size", "1", "--group-size", "2", "--micro-batch", "2",
              "--kl", "0", "--freeze-vision", "--max-pixels", str(64 * 28 * 28)]
SIZE = "cpu" if CPU else "3b"
BENCH_TOKENS = (4,) if CPU else (256, 2048)
BENCH_STEPS = {4: (0, 1), 256: (1, 2), 2048: (0, 1)}   # T: (warm-up, timed steps)
TRAIN_TOKENS = 4 if CPU else 256
TIMEOUT = {"folder": 240, "data": 60, "plan": 400, "bench": 240, "train": 240}


def run(name, argv, log, timeout, env=None, wait=True):
    """Run one command (logged); returns its CompletedProcess, or the Popen when wait=False. On
    the CPU one thread each: the reduced shapes gain nothing from more, and lose 3-10x on a
    loaded machine."""
    env = dict(env or os.environ, **({"OMP_NUM_THREADS": "1"} if CPU else {}))
    line = f"\n$ {' '.join(argv)}\n"
    if not wait:
        log.write(line)
        log.flush()
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=env)
    t = time.time()
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        log.write(f"{line}[{name}: timed out after {timeout} s]\n{e.stdout or ''}{e.stderr or ''}\n")
        raise RuntimeError(f"{name}: timed out after {timeout} s") from None
    log.write(line + p.stdout + p.stderr + f"[{name}: exit {p.returncode}, {time.time() - t:.1f} s]\n")
    log.flush()
    if p.returncode:
        raise RuntimeError(f"{name}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}")
    return p


def device_info():
    info = {"device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu_dry_run": CPU}
    if torch.cuda.is_available() and not CPU:
        # in a child process: a CUDA context here would sit on the GPU through every step
        q = subprocess.run([sys.executable, "-c", "import json, torch; p = torch.cuda."
                            "get_device_properties(0); print(json.dumps([p.name, p.total_memory]))"],
                           capture_output=True, text=True, timeout=120)
        name, total = json.loads(q.stdout) if q.returncode == 0 else ("cuda (unknown)", 80e9)
        info.update(device=name, gpu_mem_gb=round(total / 1e9, 1), cuda=torch.version.cuda)
    return info


def main():
    out = os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out")
    work = os.environ.get("GPU_CHECK_WORK") or os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    if not CPU and not torch.cuda.is_available():
        sys.exit("gpu_check: no GPU here (torch.cuda.is_available() is False); "
                 "GPU_CHECK_CPU=1 runs the CPU dry run")
    py = sys.executable
    # GPU_CHECK_FOLDER: a folder tools/qwen_folder.py already wrote at this size (the suite's)
    folder = os.environ.get("GPU_CHECK_FOLDER") or os.path.join(work, "Qwen2.5-VL-3B-Instruct")
    train_jsonl = os.path.join(work, "data", "train.jsonl")
    train_flags = SHARED + ["--max-new-tokens", str(TRAIN_TOKENS)]
    report = dict(device_info(), size=SIZE, errors=[], shared_flags=SHARED, steps_s={})
    report["train_flags"] = train_flags

    def save():
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")

    def step(name, fn):
        t = time.time()
        try:
            fn()
        except Exception as e:       # noqa: BLE001  record it, go on with the next step
            report["errors"].append(f"{name}: {e}")
        report["steps_s"][name] = round(time.time() - t, 1)
        save()

    with open(os.path.join(out, "gpu_check.log"), "w") as log:
        if not os.environ.get("GPU_CHECK_FOLDER"):
            step("folder", lambda: run("folder", [py, "tools/qwen_folder.py", "--out", folder,
                                                  "--size", SIZE], log, TIMEOUT["folder"]))
        step("data", lambda: run("data", [py, "data.py", "synth", "--out", os.path.join(work, "data"),
                                          "--cities", "2", "--seed", "0"], log, TIMEOUT["data"]))
        # the plan runs on the CPU beside the GPU steps, on half the cores
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
        plan_argv = [py, "tools/memplan.py", "--model", folder, "--gpus", "1", "--gpu-mem",
                     str(report.get("gpu_mem_gb", 80)), "--no-search", "--json", "--data",
                     train_jsonl] + train_flags
        plan_err = open(os.path.join(work, "plan.err"), "w+")
        plan = run("plan", plan_argv, plan_err, None, env=env, wait=False)
        report["plan_command"] = " ".join(plan_argv[1:])

        jobs = []
        for T in BENCH_TOKENS:
            def bench(T=T):
                warmup, steps = BENCH_STEPS[T]
                path = os.path.join(work, f"bench_{T}.json")
                run(f"bench {T}", [py, "bench.py", "--model", folder, "--max-new-tokens", str(T),
                                   "--warmup", str(warmup), "--steps", str(steps),
                                   "--reward-answers", "0", "--json-out", path] + SHARED,
                    log, TIMEOUT["bench"])
                with open(path) as f:
                    b = json.load(f)
                report.setdefault("bench", {})[str(T)] = {
                    "warmup": warmup, "steps": steps, "step_s": b["step_s"],
                    "phases_s": b["phases_s"], "rollout_tokens_per_s": b["sample_tokens_per_s"],
                    "train_tokens_per_s": b["train_tokens_per_s"],
                    "truncation_rate": b["truncation_rate"],
                    "peak_cuda_gb": b["peak_cuda_mb"] * 2 ** 20 / 1e9 if "peak_cuda_mb" in b else None,
                    "parameters": b["setup"]["parameters"]}
            jobs.append((f"bench {T}", bench))

        def train():
            run_dir = os.path.join(work, "train")
            run("train", [py, "train.py", "--model", folder, "--data", train_jsonl, "--out", run_dir,
                          "--max-steps", "2", "--no-final", "--log-samples", "0"] + train_flags,
                log, TIMEOUT["train"])
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                rows = [json.loads(x) for x in f]
            report["train"] = {"steps": [{k: r.get(k) for k in (
                "step", "stage", "loss", "reward", "kl", "grad_norm", "skipped", "tokens_per_s",
                "time/sample", "time/update", "time/step", "peak_cuda_gb")} for r in rows]}
            report["train"]["peak_cuda_gb"] = rows[-1].get("peak_cuda_gb") if rows else None
        jobs.append(("train", train))
        if CPU:   # one thread each, side by side; on a GPU one after the other (timings)
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(jobs)) as pool:
                list(pool.map(lambda job: step(*job), jobs))
        else:
            for job in jobs:
                step(*job)

        def wait_plan():
            stdout, _ = plan.communicate(timeout=TIMEOUT["plan"])
            if plan.returncode:
                raise RuntimeError(f"plan: exit {plan.returncode} (gpu_check.log)")
            p = json.loads(stdout.strip().splitlines()[-1])
            report["plan"] = {k: p[k] for k in ("peak_gb", "phases", "fits", "budget_gb", "mode",
                                                "prompt_tokens", "image_tokens", "parameters",
                                                "seconds")}
            log.write(stdout)
        step("plan", wait_plan)
        if plan.poll() is None:
            plan.kill()
        plan_err.seek(0)
        log.write(plan_err.read())

    measured, planned = report.get("train", {}).get("peak_cuda_gb"), report.get("plan", {}).get("peak_gb")
    report["peak_measured_over_plan"] = measured / planned if measured and planned else None
    save()
    with open(os.path.join(out, "gpu_check.txt"), "w") as f:
        f.write(summary(report))
    print(summary(report), end="")
    return 1 if report["errors"] else 0


def summary(r):
    """The few lines docs/gpu.md's table wants."""
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)
    lines = [f"GPU check ({'CPU dry run, ' if r['cpu_dry_run'] else ''}{r['size']} folder): "
             f"{r['device']}, torch {r['torch']}, transformers {r['transformers']}, {r['date']}"]
    t, p = r.get("train", {}), r.get("plan", {})
    lines.append(f"train.py {' '.join(r['train_flags'])}")
    lines.append(f"  peak memory: measured {fmt(t.get('peak_cuda_gb'))} GB (max_memory_allocated), "
                 f"plan {fmt(p.get('peak_gb'))} GB (tools/memplan.py --gpus 1), measured/plan "
                 f"{fmt(r.get('peak_measured_over_plan'), '.3f')}")
    for s in t.get("steps", []):
        lines.append(f"  step {s['step']}: {fmt(s['time/step'])} s (sample {fmt(s['time/sample'])}, "
                     f"update {fmt(s['time/update'])}), loss {fmt(s['loss'], '.4g')}")
    for T, b in r.get("bench", {}).items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in b["phases_s"].items() if v)
        lines.append(f"bench.py --max-new-tokens {T}: step {b['step_s']:.2f} s ({phases}); rollout "
                     f"{b['rollout_tokens_per_s']:.1f} tokens/s; peak {fmt(b['peak_cuda_gb'])} GB")
    lines.append(f"step seconds: {r['steps_s']}")
    lines += [f"ERROR {e}" for e in r["errors"]] or ["no errors"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
