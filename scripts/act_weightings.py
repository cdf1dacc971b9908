#!/usr/bin/env python3
"""The weighting study behind `--fit act` (docs/quality.md): activation-aware shared K/V fits of
SmolLM2 under different output-error weightings, K/V balances and rank allocations, each evaluated
by perplexity in transformers. A research script, independent of the Rust code (numpy/torch only);
the chosen weighting is what `surgery-convert --fit act` implements.

    scripts/act_weightings.py MODEL_DIR TEXT   (run with the interop venv's python)

Calibration: tokens 0..16384 of TEXT; evaluation: tokens 40000..44096 (4096 tokens, 512-token
windows, no BOS, every position scored, as `surgery-convert eval --offset 40000`).
Modes: act = output energy only; q = key errors weighted by the query covariance of the heads that
read them; o = value errors weighted through o_proj; qo = both; rope-* = query weighting averaged
over RoPE rotations. beta scales V against K after balancing; alloc = global (budget:F) or
uniform (the same rank in every layer).
"""
import sys, math, torch, json, numpy as np
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
M = sys.argv[1]; TEXT = open(sys.argv[2]).read()
tok = AutoTokenizer.from_pretrained(M)
ids = tok(TEXT, add_special_tokens=False)["input_ids"]
CAL = ids[0:16384]; EV = ids[40000:40000+4096]
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32).eval()
cfg = model.config; L = cfg.num_hidden_layers; hd = cfg.hidden_size // cfg.num_attention_heads
nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads; grp = nh // nkv; kvd = nkv*hd
orig = {i: (model.model.layers[i].self_attn.k_proj.weight.detach().double().clone(), model.model.layers[i].self_attn.v_proj.weight.detach().double().clone()) for i in range(L)}
# covariances of attention input
C = [torch.zeros(cfg.hidden_size, cfg.hidden_size, dtype=torch.float64) for _ in range(L)]
hooks = []
for i in range(L):
    def hook(mod, inp, out, i=i):
        x = out[0].double(); C[i] += x.T @ x
    hooks.append(model.model.layers[i].input_layernorm.register_forward_hook(hook))
x = torch.tensor(CAL).view(-1, 512)
with torch.inference_mode():
    for w in range(x.shape[0]): model(input_ids=x[w:w+1], use_cache=False)
for h in hooks: h.remove()
C = [c / len(CAL) for c in C]

def ppl():
    x = torch.tensor(EV).view(-1, 512); nll = 0; c = 0
    with torch.inference_mode():
        for w in range(x.shape[0]):
            lg = model(input_ids=x[w:w+1], use_cache=False).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(lg, x[w, 1:], reduction='sum')); c += 511
    return math.exp(nll / c)

def sqrtm(G):
    e, U = torch.linalg.eigh(G); e = e.clamp(min=e.max()*1e-10)
    return U @ torch.diag(e.sqrt()) @ U.T, U @ torch.diag(1/e.sqrt()) @ U.T

def rope_avg(G, ctx=512):
    # average R_d^T G R_d over relative distances d in [0, ctx), rotate_half convention, per head block
    inv = 1.0 / ((cfg.rope_parameters['rope_theta'] if getattr(cfg,'rope_parameters',None) else cfg.rope_theta) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    out = torch.zeros_like(G)
    for d in range(0, ctx, 4):
        ang = d * inv; c = torch.cat([ang.cos(), ang.cos()]); s = torch.cat([ang.sin(), ang.sin()])
        R = torch.diag(c); half = hd // 2
        R[:half, half:] = torch.diag(-s[:half]); R[half:, :half] = torch.diag(s[half:])
        out += R.T @ G @ R
    return out / len(range(0, ctx, 4))

def left_weights(i, mode):
    at = model.model.layers[i].self_attn
    Wk, Wv = orig[i]; Cx = C[i]
    blocks_k = []; blocks_v = []
    Wq = at.q_proj.weight.detach().double(); Wo = at.o_proj.weight.detach().double()
    for j in range(nkv):
        Gk = torch.zeros(hd, hd, dtype=torch.float64); Gv = torch.zeros(hd, hd, dtype=torch.float64)
        for h in range(j*grp, (j+1)*grp):
            Wqh = Wq[h*hd:(h+1)*hd]; Gk += Wqh @ Cx @ Wqh.T
            Woh = Wo[:, h*hd:(h+1)*hd]; Gv += Woh.T @ Woh
        if 'rope' in mode: Gk = rope_avg(Gk)
        blocks_k.append(Gk); blocks_v.append(Gv)
    Gk = torch.block_diag(*blocks_k); Gv = torch.block_diag(*blocks_v)
    I = torch.eye(kvd, dtype=torch.float64)
    Lk = sqrtm(Gk)[0] if 'q' in mode else I
    Lv = sqrtm(Gv)[0] if 'o' in mode else I
    return Lk, Lv

def fit_layer(i, r, mode, beta=1.0):
    Wk, Wv = orig[i]; Cx = C[i]
    Lk, Lv = left_weights(i, mode)
    A = Lk @ Wk; B = Lv @ Wv
    ek = torch.trace(A @ Cx @ A.T); ev = torch.trace(B @ Cx @ B.T)
    A = A / ek.sqrt(); B = B / ev.sqrt() * beta
    W = torch.cat([A, B]); Mx = W @ Cx @ W.T
    e, U = torch.linalg.eigh(Mx); U = U[:, e.argsort(descending=True)]; e = e.sort(descending=True).values
    return e / e.sum(), U, (Lk, Lv, ek, ev, beta)

def apply(i, U, r, extra):
    Lk, Lv, ek, ev, beta = extra
    Wk, Wv = orig[i]
    Ur = U[:, :r]; W = torch.cat([Lk @ Wk / ek.sqrt(), Lv @ Wv / ev.sqrt() * beta])
    Wr = Ur @ (Ur.T @ W)
    k = torch.linalg.solve(Lk, Wr[:kvd]) * ek.sqrt(); v = torch.linalg.solve(Lv, Wr[kvd:]) / beta * ev.sqrt()
    at = model.model.layers[i].self_attn
    at.k_proj.weight.data = k.float(); at.v_proj.weight.data = v.float()

def run(mode, frac, beta=1.0, alloc='global'):
    fits = [fit_layer(i, None, mode, beta) for i in range(L)]
    total = round(frac * L * 2 * kvd)
    # global allocation on normalized spectra
    ranks = [1]*L
    cand = sorted([(float(f[0][k]), i, k) for i, f in enumerate(fits) for k in range(1, 2*kvd)], key=lambda t: (-t[0], t[1], t[2]))
    kept = L
    if alloc == 'uniform':
        ranks = [total // L] * L; cand = []
    for v, i, k in cand:
        if kept >= total: break
        if ranks[i] == k: ranks[i] += 1; kept += 1
    for i in range(L): apply(i, fits[i][1], ranks[i], fits[i][2])
    p = ppl()
    for i in range(L):
        at = model.model.layers[i].self_attn; at.k_proj.weight.data = orig[i][0].float(); at.v_proj.weight.data = orig[i][1].float()
    return p, ranks

print("base", round(ppl(), 3), flush=True)
GRID = [
    ("act", 1.0, 0.5, "global"), ("act", 1.0, 0.25, "global"),
    ("q", 1.0, 0.5, "global"), ("q", 1.0, 0.25, "global"),
    ("o", 1.0, 0.5, "global"), ("o", 1.0, 0.25, "global"),
    ("qo", 1.0, 0.5, "global"), ("qo", 1.0, 0.25, "global"),
    ("rope-qo", 1.0, 0.5, "global"), ("rope-qo", 1.0, 0.25, "global"),
    ("qo", 0.5, 0.5, "global"), ("qo", 0.5, 0.25, "global"), ("qo", 0.25, 0.25, "global"),
    ("qo", 2.0, 0.25, "global"), ("act", 0.5, 0.25, "global"),
    ("act", 1.0, 0.25, "uniform"), ("qo", 0.5, 0.25, "uniform"), ("o", 1.0, 0.25, "uniform"),
]
for mode, beta, frac, al in GRID:
    if True:
        p, ranks = run(mode, frac, beta, al)
        print(mode, beta, frac, al, round(p, 3), "ranks", ranks[:6], flush=True)
