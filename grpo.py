"""GRPO as pure tensor math (RewardMap §4.1): group-relative advantages, the k3 KL estimator and
the clipped token-level policy loss. No model, no tokenizer, no transformers: torch only.

Used by train.py (`torchrun ... train.py --model tiny --data FILE.jsonl --out DIR`), which calls
group_advantages() on the rewards of each rank's groups and grpo_loss() on token log-probs;
tested by `python test_all.py grpo`.

The equations of §4.1, in the form DESIGN.md §4 fixes (centred advantage, token-mean). For a
question q, sample a group of G responses o_1..o_G from the old policy, score them with the
reward r_i (reward.py), then

    Â_i      = r_i − mean(r_1..r_G)                                  (group-relative advantage)
    ρ_i,t    = π_θ(o_i,t | q, o_i,<t) / π_θold(o_i,t | q, o_i,<t)     (token probability ratio)
    J(θ)     = E[ Σ_i Σ_t min(ρ_i,t Â_i, clip(ρ_i,t, 1−ε, 1+ε) Â_i) / Σ_i |o_i|
                  − β D_KL(π_θ ‖ π_ref) ]

with ε = 0.2, β = 1e-3, G = 8 (§5.1). Every token of o_i shares its response's advantage Â_i.
The loss minimised here is −J. Where the code goes beyond those equations:

"The release" below is fscdc/RewardMap as its README runs it, `bash scripts/reward_map.sh`: that
script overrides scripts/reward_map.yaml, and both configure its verl fork. It differs from the
paper (and from us) in ways beyond this file too: 4 samples per question (`worker.rollout.n=4`;
the yaml and the paper say 8) and an entropy bonus, loss −= 1e-3 · token-mean entropy
(verl/workers/actor/config.py `entropy_coeff = 1e-3`, set by neither file; applied in
verl/workers/actor/dp_actor.py). Neither the paper nor this file has an entropy term.

  1. Std scaling (`group_advantages(scale=True)`). The release (verl/trainer/core_algos.py,
     compute_grpo_outcome_advantage) uses Â_i = (r_i − mean) / (std + eps) with the unbiased
     std, as DeepSeekMath's GRPO does. Kept as an option, not the default: RewardMap's
     difficulty weight w (reward.py) multiplies every reward of a group by the same number,
     r_i = w·x_i, so mean and std both scale by w and the scaled advantage is
     (x_i − mean x)/(std x + eps/w): w cancels (up to eps). The difficulty-aware design only
     changes the update with the paper's centred form, where Â_i = w·(x_i − mean x). Tested in
     test_all.py (test_grpo_weight_cancels_...).
     Exactness: the group mean and std are taken in float64 from the rewards rounded to float32.
     A sum of K equal float32 values is exact in float64, so an all-equal group gets mean = its
     value, std = 0 and Â = 0 exactly, alone or in any batch. In float32 the mean of eight
     rewards of 19.2 is one rounding step off, the std is then ~2e-6, the order of eps, and each
     sample got +0.63 alone and +1.9 among 60 groups (the float32 reduction differs with the
     batch's shape). The release
     has the same flaw: it takes mean and std of a float32 tensor (rewards are float32,
     verl/workers/reward/custom.py), so with the yaml's 8 samples eight planning rewards of
     1.7·(10 + 0.5·2) = 18.7 get +0.63 each; with the launch script's 4 samples none of its
     reward values trips it on CPU (measured with torch 2.13, every W·(10·acc + 0.5·detail) for
     detail −100..10). No threshold on the std: a near-equal group's Â goes continuously to 0.
  2. KL estimator. D_KL is estimated per token with Schulman's k3,
     exp(ref − logp) − (ref − logp) − 1 (unbiased, always ≥ 0; verl/EasyR1 "low_var_kl"), in
     fp32 with the log-ratio clamped to ±20 so a token the reference finds impossible cannot
     overflow to inf. The release clamps the k3 value itself to ±10 instead; we clamp the
     log-ratio, which keeps the estimator exact in the range that matters. Coefficient: the
     paper says 1e-3 (our default); the release's launch script sets kl_loss_coef 1e-2
     (scripts/reward_map.sh, `worker.actor.kl_loss_coef=1.0e-2`), overriding the yaml's 5e-3.
  3. Aggregation. `aggregation="token"` (default) is the token-mean written above: every
     response token in the batch weighs the same (DAPO's token-level loss; what DESIGN.md §4
     fixes). `aggregation="sequence"` is the original GRPO (DeepSeekMath) form
     1/G Σ_i 1/|o_i| Σ_t, which gives a long response's tokens less weight each. It is what the
     release computes in effect: its launch script sets a micro-batch of one response
     (`micro_batch_size_per_device_for_update=1`), dp_actor.py takes the token-mean of each
     micro-batch (policy, KL and entropy terms alike) and divides by the number of micro-batches,
     and FSDP averages over GPUs: a mean of per-response means. Under DDP each
     rank computes its own mean and DDP averages the gradients; pass `num_tokens` (e.g. the
     all-reduced token count / world size, or the token count of all micro-batches when
     accumulating) to make the token-mean exact across ranks and micro-batches.
  4. Asymmetric clipping (`clip_eps_high`): clip(ρ, 1−ε, 1+ε_high), DAPO's "clip-higher". None =
     symmetric, the paper's setting.
  5. Numerical guards, not in any equation: inputs cast to fp32; masked positions of logp,
     old_logp and ref_logp are replaced by 0 before any exp, so padding (often −inf or garbage)
     gives neither NaN nor gradient; log(ρ) clamped to ±20; a batch with no response token
     returns 0·Σlogp so every rank still runs backward through the graph (DDP all-reduces every
     step and would hang on a rank that skipped it).

Note for readers of TRL issues ("the loss is 0 at the first step"): at the first update
θ = θ_old, so ρ = 1 and the surrogate equals −Σ Â_i|o_i| / Σ|o_i|, which is 0 whenever the
group's centred advantages meet equal lengths. The gradient is not 0: ∂loss/∂logp_i,t = −Â_i / N
for each of the N masked tokens (test_grpo_nonzero_gradient_at_ratio_one).
"""
import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 4.9e8: finite in fp32, far past any ratio PPO-clip lets through


def group_advantages(rewards, group_size, scale=False, eps=1e-6):
    """Â for rewards laid out group by group: [q0·o1 .. q0·oK, q1·o1 .. q1·oK, ...].

    rewards: a 1-D tensor or a list of numbers, length a multiple of group_size.
    Returns a float32 tensor of the same length. §4.1: Â_i = r_i − mean(group) (scale=False,
    the paper). scale=True divides by the group's unbiased std + eps (the release; see note 1
    in the module docstring: it cancels the difficulty weight). A group whose rewards are all
    equal gets exactly 0 either way: no learning signal (that share is train.py's zero_std_frac).
    A group of one has no spread; its std is taken as 0 (torch would give NaN).
    Statistics in float64 from the float32-rounded rewards, so "exactly" holds for every group
    size, order of summation and batch (note 1). No threshold on the std: as a group's spread s
    shrinks to 0, |Â| ≤ s / eps goes to 0 continuously.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    r = torch.as_tensor(rewards, dtype=torch.float32).detach()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (group by group), got shape {tuple(r.shape)}")
    if r.numel() % group_size != 0:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    g = r.double().view(-1, group_size)
    # sum / K, not torch's mean: a mean kernel may multiply by a rounded 1/K (CUDA does).
    adv = g - g.sum(dim=1, keepdim=True) / group_size
    if scale:
        var = adv.square().sum(dim=1, keepdim=True) / max(group_size - 1, 1)   # unbiased
        adv = adv / (var.sqrt() + eps)
    return adv.float().reshape(-1)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): exp(d) − d − 1 with d = ref_logp − logp.

    Unbiased for samples from π_θ and never negative (e^d ≥ 1 + d); 0 exactly where the two
    log-probs agree. Computed in fp32, d clamped to ±20 (note 2). Same shape as the inputs.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    d = (ref_logp.float() - logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=1e-3,
              clip_eps_high=None, aggregation="token", num_tokens=None):
    """The loss −J(θ) of §4.1 and a dict of statistics.

    logp      [B, T]  log π_θ of the sampled tokens (carries the gradient)
    old_logp  [B, T]  log π_θold of the same tokens (no gradient; detached here)
    ref_logp  [B, T]  log π_ref, or None to drop the KL term (kl_coef ignored)
    advantages [B]    one Â per response, broadcast over its tokens
    mask      [B, T]  1 for response tokens, 0 for prompt/padding (bool, int or float)
    clip_eps, clip_eps_high   ρ is clipped to [1 − clip_eps, 1 + (clip_eps_high or clip_eps)]
    aggregation  "token" (token-mean over the batch) | "sequence" (mean per response, then over
                 responses that have at least one token)          -- module notes 3 and 4
    num_tokens   token-mode denominator instead of mask.sum() (note 3); None = local count

    Returns (loss, stats). loss is a 0-dim fp32 tensor. stats holds Python floats over the masked
    tokens: pg_loss (token-mean of the surrogate part), kl (mean k3, 0.0 without ref_logp),
    clip_frac (share of tokens whose clipped term was taken, i.e. whose gradient was cut),
    ratio_mean, ratio_max, adv_abs_mean (mean |Â| over responses), tokens (mask sum).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    advantages = torch.as_tensor(advantages, dtype=torch.float32, device=logp.device)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    if clip_eps < 0 or (clip_eps_high is not None and clip_eps_high < 0):
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}, {clip_eps_high}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    m = mask.float() > 0  # bool [B, T]
    mf = m.float()
    n_tok = mf.sum()
    # Note 5: zero the masked positions before any exp so padding gives no NaN and no gradient.
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    lp = torch.where(m, logp.float(), zero)
    old = torch.where(m, old_logp.detach().float(), zero)
    adv = advantages.detach().float().unsqueeze(1)  # [B, 1]

    ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    pg = torch.maximum(pg1, pg2)  # −min(ρA, clip(ρ)A)
    per_tok = pg
    if ref_logp is not None:
        ref = torch.where(m, ref_logp.detach().float(), zero)
        kl = kl_k3(lp, ref)
        per_tok = pg + kl_coef * kl
    else:
        kl = torch.zeros_like(pg)
    per_tok = torch.where(m, per_tok, zero)

    if n_tok.item() == 0:
        loss = lp.sum() * 0.0  # keeps the graph: DDP needs every rank's backward
    elif aggregation == "token":
        if num_tokens is not None and not float(num_tokens) > 0:
            raise ValueError(f"num_tokens must be > 0, got {num_tokens!r}")
        loss = per_tok.sum() / (n_tok if num_tokens is None else float(num_tokens))
    else:
        seq_len = mf.sum(dim=1)
        has = seq_len > 0
        loss = (per_tok.sum(dim=1)[has] / seq_len[has]).mean()

    with torch.no_grad():
        n = max(n_tok.item(), 1.0)
        stats = {
            "pg_loss": (torch.where(m, pg, zero).sum() / n).item(),
            "kl": (torch.where(m, kl, zero).sum() / n).item(),
            "clip_frac": ((pg2 > pg1) & m).float().sum().item() / n,
            "ratio_mean": (torch.where(m, ratio, zero).sum() / n).item(),
            "ratio_max": ratio[m].max().item() if n_tok.item() > 0 else 1.0,
            "adv_abs_mean": adv.abs().mean().item() if adv.numel() else 0.0,
            "tokens": n_tok.item(),
        }
    return loss, stats
