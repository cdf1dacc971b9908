"""The Python way, as the original experiment does it: load the whole model with transformers,
fit scikit-learn PCA per matrix, write the reconstruction in place, save_pretrained.

    python scripts/bench_python.py IN_DIR OUT_DIR --shared-kv 0.3 --q 0.9

Per layer: q_proj gets its own PCA; k_proj and v_proj are stacked (np.vstack) and fitted with ONE
PCA, each reconstructed with the shared components (ALGORITHM.md section 2, the method as
described). PCA(n_components=T, svd_solver="full") keeps the smallest rank whose cumulative
explained variance reaches T; inverse_transform(transform(W)) adds the mean back, the same
reconstruction as surgery-convert's default fit `pca`. Threads follow OMP_NUM_THREADS (OpenBLAS in
scipy, torch's intra-op pool). Used by scripts/bench for timing only.
"""

import argparse
import os
import sys

import numpy as np
import torch
from sklearn.decomposition import PCA
from transformers import AutoModelForCausalLM


def fit(w: np.ndarray, threshold: float) -> np.ndarray:
    pca = PCA(n_components=threshold, svd_solver="full")
    return pca.inverse_transform(pca.fit_transform(w))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--shared-kv", type=float, required=True)
    ap.add_argument("--q", type=float, required=True)
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(args.inp, dtype="auto")
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            dtype = attn.q_proj.weight.dtype
            q = attn.q_proj.weight.float().numpy()
            attn.q_proj.weight.copy_(torch.from_numpy(fit(q, args.q)).to(dtype))
            k = attn.k_proj.weight.float().numpy()
            v = attn.v_proj.weight.float().numpy()
            kv = fit(np.vstack([k, v]), args.shared_kv)
            attn.k_proj.weight.copy_(torch.from_numpy(kv[: k.shape[0]]).to(dtype))
            attn.v_proj.weight.copy_(torch.from_numpy(kv[k.shape[0] :]).to(dtype))
    model.save_pretrained(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
