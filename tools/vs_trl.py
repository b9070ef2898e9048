"""Our GRPO step against TRL's GRPOTrainer on the tiny model, alternated step by step in one
process so both see the same machine load. Numbers and what they mean: docs/bench.md.

TRL is a benchmark-only install, never a requirement of this repo:
    python3 -m venv --system-site-packages /tmp/trlenv
    /tmp/trlenv/bin/pip install trl -c <(printf 'torch==2.13.0\\ntransformers==5.24.0\\n')
    /tmp/trlenv/bin/python tools/vs_trl.py [--steps 8 --warmup 1] [train.py flags]

One process builds the tiny model twice from the same seed and runs a TRL step and ours in turn
(ours inside TRL's on_step_end callback, outside TRL's clock). Matched: model and initial weights,
processor and chat template (prompt tokens checked identical), the same B questions and maps every
step (bench.bench_prompts), K, B*K completions and one optimizer step per step, max new tokens,
sampling (temperature 1, top-k 0, top-p 1, vision tokens suppressed), reward.compute_reward,
centred advantages (scale_rewards="none"), beta 0, num_iterations 1 (no old-logp forward), clip
0.2, token-mean loss (loss_type "dapo" on one process), AdamW lr / weight decay / betas, constant
LR, grad-norm clip 1.0, fp32, torch threads. Not matched, by design of each side: TRL repeats each
prompt K times before the processor (each map preprocessed and through the vision tower K times,
in generation and in the training forward; ours once) and computes token entropies and logging
metrics inside its step. TRL's clock runs from on_step_begin to on_step_end; its dataloader fetch
and logging fall outside (trl.between_steps_s). Flags: bench.py's timing ones (--steps, --warmup,
--types, --threads, --json-out) and train.py's.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import bench
import model as model_mod
import reward
from bench import bench_prompts, grpo_step, summarize


def vs_trl(args):
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(
            f"tools/vs_trl.py needs TRL ({e}). It is a benchmark-only install, kept out of this repo's "
            "requirements; put it in a separate venv that sees the system torch/transformers:\n"
            "  python3 -m venv --system-site-packages /tmp/trlenv\n"
            "  /tmp/trlenv/bin/pip install trl -c <(printf 'torch==2.13.0\\ntransformers==5.24.0\\n')\n"
            "  /tmp/trlenv/bin/python tools/vs_trl.py") from None
    import trl
    targs = argparse.Namespace(**vars(args.train))
    if targs.kl > 0:
        raise SystemExit("vs_trl compares with beta = 0 (no reference model): drop --kl")
    _, world, device = model_mod.init_distributed(args.threads)
    if world > 1:
        raise SystemExit("vs_trl runs in one process (no torchrun)")
    k, n_q, T = targs.group_size, targs.batch_size, targs.max_new_tokens
    max_pixels = targs.max_pixels
    ours, processor = model_mod.load("tiny", max_pixels=max_pixels)
    theirs, trl_processor = model_mod.load("tiny", max_pixels=max_pixels)   # same seed, same weights
    records, images = bench_prompts(n_q, max_pixels, targs.seed, args.types)
    suppress = model_mod._special_ids(processor, model_mod.VISION_TOKENS)
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=targs.lr, weight_decay=targs.weight_decay,
                            betas=(0.9, 0.999))

    rows = [{"prompt": [{"role": "user", "content": r["question"]}], "image": im, "rid": i}
            for i, (r, im) in enumerate(zip(records, images))]

    def trl_reward(prompts, completions, rid, **_):
        out = []
        for c, i in zip(completions, rid):
            text = c[-1]["content"] if isinstance(c, list) else c
            if isinstance(text, list):   # content blocks
                text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
            out.append(reward.compute_reward(text, records[i])["total"])
        return out

    total_steps = args.warmup + args.steps
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=n_q * k,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=k,
        max_completion_length=T, temperature=1.0, top_k=0, top_p=1.0,
        generation_kwargs={"suppress_tokens": suppress}, beta=0.0, num_iterations=1, epsilon=0.2,
        scale_rewards="none", loss_type="dapo", learning_rate=targs.lr,
        weight_decay=targs.weight_decay, adam_beta1=0.9, adam_beta2=0.999, optim="adamw_torch",
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, max_steps=total_steps,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=device == "cpu", bf16=False,
        dataloader_num_workers=0, seed=targs.seed, disable_tqdm=True, remove_unused_columns=False)

    ours_t, ours_c, trl_t, trl_between = [], [], [], []
    trl_phase = {"generate": [], "reward": [], "forward": []}
    state = {"begin": None, "end": None, "phase": {}}
    targs.micro_batch = n_q * k   # one forward/backward over the whole batch, as TRL's step

    class Alternate(TrainerCallback):
        """TRL's clock from on_step_begin to on_step_end; our step runs in on_step_end, off it."""

        def on_step_begin(self, a, s, control, **kw):
            now = time.perf_counter()
            if state["end"] is not None:
                trl_between.append(now - state["end"])
            state["phase"] = {key: 0.0 for key in trl_phase}
            state["begin"] = now

        def on_step_end(self, a, s, control, **kw):
            trl_s = time.perf_counter() - state["begin"]
            t, c = grpo_step(ours, ours, None, opt, processor, records, images, targs, device, 1)
            if s.global_step > args.warmup:
                trl_t.append(trl_s)
                for key in trl_phase:
                    trl_phase[key].append(state["phase"][key])
                ours_t.append(t)
                ours_c.append(c)
            state["end"] = time.perf_counter()

    trainer = GRPOTrainer(model=theirs, reward_funcs=[trl_reward], args=cfg,
                          train_dataset=Dataset.from_list(rows), processing_class=trl_processor,
                          callbacks=[Alternate()])

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                state["phase"][name] = state["phase"].get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    # Instrumentation only (a clock around TRL's own methods; nothing in them changes).
    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer.compute_loss = timed("forward", trainer.compute_loss)
    # Same prompt tokens on both sides: TRL's own tokenisation of row 0 against ours.
    prompt_ids, _, _ = trainer._tokenize_prompts([
        [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                      {"type": "text", "text": records[0]["question"]}]}]])
    enc, _ = model_mod.encode(processor, [records[0]["question"]], [images[0]])
    same_prompt = list(prompt_ids[0]) == enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    trainer.train()

    med = statistics.median
    ours_sum = summarize(ours_t, ours_c)
    paired = [sum(o.values()) / t for o, t in zip(ours_t, trl_t)]
    return {
        "ratio_ours_over_trl": ours_sum["step_s"] / med(trl_t),
        "ratio_paired_median": med(paired),
        "ours": ours_sum,
        "trl": {"step_s": med(trl_t), "step_s_all": [round(x, 4) for x in trl_t],
                "phases_s": {key: round(med(v), 4) for key, v in trl_phase.items()},
                "backward_optimizer_other_s": round(med(
                    [t - sum(trl_phase[key][i] for key in trl_phase) for i, t in enumerate(trl_t)]), 4),
                "between_steps_s": round(med(trl_between), 4) if trl_between else None},
        "matched": {"same_prompt_tokens": same_prompt, "group_size": k, "questions": n_q,
                    "max_new_tokens": T, "beta": 0.0, "num_iterations": 1, "lr": targs.lr,
                    "weight_decay": targs.weight_decay, "grad_clip": 1.0, "advantages": "centred",
                    "loss": "token-mean", "torch_threads": torch.get_num_threads()},
        "versions": {"trl": trl.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "steps": args.steps, "warmup": args.warmup,
    }


def main(argv=None):
    args = bench.parse_args(argv)
    if not args.tiny:
        raise SystemExit("tools/vs_trl.py compares on the tiny model only (no --model, no --config)")
    bench.print_json(vs_trl(args), args.json_out)


if __name__ == "__main__":
    main(sys.argv[1:])
