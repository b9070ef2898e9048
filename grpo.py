"""GRPO as pure tensor math (RewardMap §4.1): group-relative advantages, the k3 KL estimator and
the clipped token-level policy loss. No model, no tokenizer: torch only.

For a question q, sample a group of G responses o_1..o_G from π_θold, score them (reward.py), then

    Â_i      = r_i − mean(r_1..r_G)                                  (group-relative advantage)
    ρ_i,t    = π_θ(o_i,t | q, o_i,<t) / π_θold(o_i,t | q, o_i,<t)     (token probability ratio)
    J(θ)     = E[ Σ_i Σ_t min(ρ_i,t Â_i, clip(ρ_i,t, 1−ε, 1+ε) Â_i) / Σ_i |o_i|
                  − β D_KL(π_θ ‖ π_ref) ]

with ε = 0.2, β = 1e-3, G = 8 (§5.1). Every token of o_i shares its response's Â_i; the loss
minimised here is −J. D_KL is estimated per token with k3 = exp(d) − d − 1, d = log π_ref − log π_θ.
Options beyond the equations, each a deviation or a release setting (docs/deviations.md, "GRPO"):
std-scaled advantages (`scale=True`, the release's; it cancels the difficulty weight of §4.2),
per-response aggregation (`aggregation="sequence"`, what the release computes in effect),
clip-higher (`clip_eps_high`, DAPO), an exact cross-rank token-mean (`num_tokens`).

At the first update θ = θ_old, so ρ = 1 and the loss is −Σ Â_i|o_i| / Σ|o_i|, often 0; its
gradient is not: ∂loss/∂logp_i,t = −Â_i / N (test_grpo_nonzero_gradient_at_ratio_one).

Used by train.py (`python train.py`, `torchrun ... train.py --model PATH ...`), which calls
group_advantages() on each rank's rewards and grpo_loss() on token log-probs; tested by
`python test_all.py grpo`.
"""
import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 4.9e8: finite in fp32, far past any ratio PPO-clip lets through


def group_advantages(rewards, group_size, scale=False, eps=1e-6):
    """Â for rewards laid out group by group: [q0·o1 .. q0·oK, q1·o1 .. q1·oK, ...].

    rewards: a 1-D tensor or a list of numbers, length a multiple of group_size.
    Returns a float32 tensor of the same length. §4.1: Â_i = r_i − mean(group) (scale=False,
    the paper). scale=True divides by the group's unbiased std + eps (the release's; it cancels
    the difficulty weight: docs/deviations.md). A group whose rewards are all
    equal gets exactly 0 either way: no learning signal (that share is train.py's zero_std_frac).
    A group of one has no spread; its std is taken as 0 (torch would give NaN).
    Statistics in float64 from the float32-rounded rewards, so "exactly" holds for every group
    size, order of summation and batch (deviation: float64, not the release's float32;
    docs/deviations.md). No threshold on the std: as a group's spread s
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
    log-probs agree. Computed in fp32, d clamped to ±20 (deviation: the release clamps k3 to ±10; docs/deviations.md). Same shape as the inputs.
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
                 responses that have at least one token; the release's effective form)
    num_tokens   token-mode denominator instead of mask.sum(): pass the all-reduced token count /
                 world size (or all micro-batches' count) for an exact global token-mean

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
    # Zero the masked positions before any exp: padding (often −inf) gives no NaN and no gradient.
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
