#!/usr/bin/env python3
"""Prototype (research, not part of the tool): sequential, error-compensating calibration for the
activation-aware shared K/V fit on SmolLM2, against the one-shot fit with the same ranks.

    python scripts/act_sequential.py MODEL_DIR TEXT FRACTION CAL_TOKENS [--o-proj]   (interop venv)
    e.g. ... 0.25 8192

--o-proj adds o_proj compensation to the sequential pass: after layer l's K/V are replaced, its
o_proj is refitted by the same regularised least squares so the attention block's output on the
compressed stream matches the original stream's, O' = O + O (S_zo - S_zz)(S_zz + lam I)^-1 with z
the input of o_proj (S_zz of the compressed stream, S_zo its cross moment with the original's).

One-shot: per layer, the top eigenvectors of W C W^T (energy-balanced K/V, as `--act-weighting
energy`), C from the original model's activations; ranks by the global budget allocation.
Sequential: layer by layer, two hidden-state streams (original and compressed model); each layer's
stacked K/V weight is first re-fitted by least squares to map the compressed stream's inputs onto
the original outputs (W^ = W S_oc S_cc^-1), then reduced to the same rank under S_cc. Evaluation:
tokens 40000..44096 of TEXT, as docs/quality.md.
"""
import sys, math, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
M=sys.argv[1]; TEXT=open(sys.argv[2]).read(); FRAC=float(sys.argv[3]); NCAL=int(sys.argv[4])
OPROJ="--o-proj" in sys.argv[5:]
tok=AutoTokenizer.from_pretrained(M); ids=tok(TEXT,add_special_tokens=False)["input_ids"]
CAL=ids[0:NCAL]; EV=ids[40000:44096]
model=AutoModelForCausalLM.from_pretrained(M,dtype=torch.float32).eval()
cfg=model.config; L=cfg.num_hidden_layers; kvd=cfg.num_key_value_heads*(cfg.hidden_size//cfg.num_attention_heads)
layers=model.model.layers
orig={i:(layers[i].self_attn.k_proj.weight.detach().clone(),layers[i].self_attn.v_proj.weight.detach().clone()) for i in range(L)}
orig_o={i:layers[i].self_attn.o_proj.weight.detach().clone() for i in range(L)}
def setkv(i,k,v): layers[i].self_attn.k_proj.weight.data=k.float().contiguous(); layers[i].self_attn.v_proj.weight.data=v.float().contiguous()
def ppl():
    x=torch.tensor(EV).view(-1,512); nll=0;c=0
    with torch.inference_mode():
        for w in range(x.shape[0]):
            lg=model(input_ids=x[w:w+1],use_cache=False).logits[0,:-1]
            nll+=float(torch.nn.functional.cross_entropy(lg,x[w,1:],reduction='sum')); c+=511
    return math.exp(nll/c)
X=torch.tensor(CAL).view(-1,512); B=X.shape[0]
pos=torch.arange(512)[None]
mask=torch.full((512,512),float('-inf')).triu(1)[None,None]
def run_layer(i,H):
    with torch.inference_mode():
        pe=model.model.rotary_emb(H,pos)
        out=[]
        for b in range(B):
            o=layers[i](H[b:b+1],attention_mask=mask,position_ids=pos,position_embeddings=pe)
            out.append(o[0] if isinstance(o,tuple) else o)
        return torch.cat(out)
with torch.inference_mode(): H0=model.model.embed_tokens(X)
# sanity: manual layers reproduce the model's logits on window 0
def fit(W,S,r):  # energy-balanced weighted fit of stacked W [2kvd, h] under covariance S
    A,Bv=W[:kvd],W[kvd:]
    ek=torch.trace(A@S@A.T); ev=torch.trace(Bv@S@Bv.T)
    s=torch.cat([torch.full((kvd,),float(1/ek.sqrt())),torch.full((kvd,),float(1/ev.sqrt()))]).double()
    Ws=s[:,None]*W; Mx=Ws@S@Ws.T; e,U=torch.linalg.eigh(Mx); idx=e.argsort(descending=True); e=e[idx]; U=U[:,idx]
    return e/e.sum(), (U[:,:r]@(U[:,:r].T@Ws))/s[:,None]
# pass 1: original covariances -> ranks (global allocation), non-sequential result
Ho=H0.clone(); C=[]
for i in range(L):
    x=layers[i].input_layernorm(Ho).reshape(-1,cfg.hidden_size).double(); C.append(x.T@x/x.shape[0]); Ho=run_layer(i,Ho)
W={i:torch.cat([orig[i][0],orig[i][1]]).double() for i in range(L)}
spec=[fit(W[i],C[i],1)[0] for i in range(L)]
total=round(FRAC*L*2*kvd); ranks=[1]*L; kept=L
for v,i,k in sorted([(float(spec[i][k]),i,k) for i in range(L) for k in range(1,2*kvd)],key=lambda t:(-t[0],t[1],t[2])):
    if kept>=total: break
    if ranks[i]==k: ranks[i]+=1; kept+=1
print("ranks",ranks,flush=True)
for i in range(L):
    Wr=fit(W[i],C[i],ranks[i])[1]; setkv(i,Wr[:kvd],Wr[kvd:])
print("one-shot act(energy)",FRAC,round(ppl(),3),flush=True)
for i in range(L): setkv(i,*orig[i])
# pass 2: sequential with compensating target
Ho=H0.clone(); Hc=H0.clone()
for i in range(L):
    xo=layers[i].input_layernorm(Ho).reshape(-1,cfg.hidden_size).double()
    xc=layers[i].input_layernorm(Hc).reshape(-1,cfg.hidden_size).double()
    n=xo.shape[0]; Scc=xc.T@xc/n; Soc=xo.T@xc/n
    lam=1e-6*torch.trace(Scc)/Scc.shape[0]
    What=W[i]@Soc@torch.linalg.inv(Scc+lam*torch.eye(Scc.shape[0],dtype=torch.float64))
    Wr=fit(What,Scc,ranks[i])[1]
    if not OPROJ:
        Ho=run_layer(i,Ho)
        setkv(i,Wr[:kvd],Wr[kvd:]); Hc=run_layer(i,Hc)
        continue
    o=layers[i].self_attn.o_proj; seen=[]
    hook=o.register_forward_pre_hook(lambda m,a: seen.append(a[0].reshape(-1,a[0].shape[-1]).double()))
    Ho=run_layer(i,Ho); zo=torch.cat(seen); seen.clear()
    setkv(i,Wr[:kvd],Wr[kvd:]); run_layer(i,Hc); zc=torch.cat(seen); seen.clear(); hook.remove()
    Szz=zc.T@zc/n; Szo=zo.T@zc/n; lz=1e-4*torch.trace(Szz)/Szz.shape[0]
    O=orig_o[i].double()
    Op=O+O@(Szo-Szz)@torch.linalg.inv(Szz+lz*torch.eye(Szz.shape[0],dtype=torch.float64))
    o.weight.data=Op.float().contiguous(); Hc=run_layer(i,Hc)
print("sequential compensating"+(" + o_proj" if OPROJ else ""),FRAC,round(ppl(),3),flush=True)
