#!/usr/bin/env python3
"""Packs the checkpoints of fixtures/bad/ (and its intact _base/) into seed inputs for the
`checkpoint` fuzz target: sections config.json, index (empty if none), shards, joined by the
separator of src/fuzzing.rs. Deterministic; writes fuzz/seeds/checkpoint/<case>.

    python3 fuzz/seeds.py [--bin target/release/surgery-convert]

`--target shapes` writes only fuzz/seeds/factored_config/ and fuzz/seeds/fused_split/ (see
shape_seeds). `--target hub` writes only fuzz/seeds/hub/<case>: answers of a Hugging Face hub for the `hub` target
(sections: revision listing, ETag, Content-Range, Location), valid and hostile.

With --bin, the base checkpoint is also converted to the factored form (shared K/V and q; separate
K and V) and those outputs become seeds, so the fuzzer starts from valid `latent_attention` configs.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

SEPARATOR = b"\n--8<--\n"
ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "fixtures" / "bad"
OUT = ROOT / "fuzz" / "seeds" / "checkpoint"


def pack(d: Path) -> bytes | None:
    if any(p.is_symlink() for p in d.iterdir()):
        return None  # symlinks cannot be expressed in a fuzz input
    config = (d / "config.json").read_bytes() if (d / "config.json").is_file() else b""
    index_path = d / "model.safetensors.index.json"
    index = index_path.read_bytes() if index_path.is_file() else b""
    shards = sorted(p for p in d.iterdir() if p.name.endswith(".safetensors"))
    return SEPARATOR.join([config, index] + [p.read_bytes() for p in shards])


FACTORED = {
    "base-factored-shared-kv": ["--shared-kv", "0.3", "--q", "0.9"],
    "base-factored-separate": ["--k", "0.5", "--v", "0.5"],
}


COMMIT = "c0ffee0123456789abcdef0123456789abcdef01"
LFS = "9c7186f628b36c46cebb3133b1f07d03aadbd83f16918ba190a3aedb1d4c1b87"


def listing(names: list[str], sha: str = COMMIT) -> bytes:
    return json.dumps({"sha": sha, "siblings": [{"rfilename": n} for n in names]}).encode()


HUB = {
    "valid": [listing(["config.json", "model.safetensors", "tokenizer.json"]), f'"{LFS}"',
              "bytes 0-0/429408", "https://cdn-lfs.hf.co/repos/ab/cd/x?Expires=1"],
    "sharded-git-etag": [listing(["config.json", "model.safetensors.index.json", "a/b/c.txt"]),
                         'W/"' + "a1" * 20 + '"', "bytes 100-199/200", "/api/resolve-cache/x"],
    "traversal": [listing(["x/../../../../../../escaped.txt"]), '"../../x"', "bytes 0-0/*", "//evil/x"],
    "absolute": [listing(["/SOME/ABSOLUTE/dir/f.json"]), '""', "items 0-0/5", "file:///etc/passwd"],
    "bad-commit": [listing(["config.json"], sha="../../../../tmp/x"), "", "bytes 0-0/2147483648",
                   "relative.json"],
    "control": [listing(["a\u0001b.json", "a//b", "a/./b", "c\\d"]), '"' + "G" * 40 + '"',
                "bytes -1-0/5", "/a\r\nX: y"],
}


def hub_seeds() -> None:
    out = ROOT / "fuzz" / "seeds" / "hub"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    for name, parts in HUB.items():
        data = [p if isinstance(p, bytes) else p.encode() for p in parts]
        (out / name).write_bytes(SEPARATOR.join(data))


def safetensors(tensors: dict[str, list[int]]) -> bytes:
    """A safetensors file of F32 zeros with these shapes (in this order)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + bytes(offset)


# Small, so that the fuzzer mutates headers rather than zeros: hidden 16, 4 heads of 4, 2 KV heads.
PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 8,
        "num_hidden_layers": 1, "vocab_size": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}


def phi3(qkv_rows: int = 32, gate_up_rows: int = 16, kv_heads: int = 2) -> bytes:
    config = dict(PHI3, num_key_value_heads=kv_heads)
    layer = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": [8, 16],
        layer + "input_layernorm.weight": [16],
        layer + "self_attn.qkv_proj.weight": [qkv_rows, 16],
        layer + "self_attn.o_proj.weight": [16, 16],
        layer + "post_attention_layernorm.weight": [16],
        layer + "mlp.gate_up_proj.weight": [gate_up_rows, 16],
        layer + "mlp.down_proj.weight": [16, 8],
        "model.norm.weight": [16],
        "lm_head.weight": [8, 16],
    }
    return SEPARATOR.join([json.dumps(config).encode(), safetensors(tensors)])


def shape_seeds() -> None:
    """Seeds of the `factored_config` target (the configs of the checkpoint seeds, the factored
    ones included) and of the `fused_split` target (a Phi-3 checkpoint, whole and split wrong)."""
    configs = ROOT / "fuzz" / "seeds" / "factored_config"
    fused = ROOT / "fuzz" / "seeds" / "fused_split"
    for out in (configs, fused):
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            old.unlink()
    for seed in sorted(OUT.iterdir()):
        if seed.name.startswith(("base", "config-")):
            (configs / seed.name).write_bytes(seed.read_bytes().split(SEPARATOR)[0])
    for name, data in {
        "phi3": phi3(),
        "phi3-qkv-rows-wrong": phi3(qkv_rows=31),
        "phi3-heads-split-wrong": phi3(qkv_rows=32, kv_heads=1),
        "phi3-gate-up-odd": phi3(gate_up_rows=15),
    }.items():
        (fused / name).write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", help="surgery-convert binary, to add factored seeds")
    ap.add_argument("--target", choices=["checkpoint", "hub", "shapes"], default="checkpoint")
    args = ap.parse_args()
    if args.target == "hub":
        hub_seeds()
        return
    if args.target == "shapes":
        shape_seeds()
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    dirs = [(BAD / "_base" / "input", "base"), (BAD / "_base" / "sharded", "base-sharded")]
    dirs += [(c / "input", c.name) for c in sorted(BAD.iterdir())
             if (c / "input").is_dir() and not c.name.startswith("_")]
    for d, name in dirs:
        data = pack(d)
        if data is not None:
            (OUT / name).write_bytes(data)
    if args.bin:
        for name, options in FACTORED.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                subprocess.run([args.bin, "--in", str(BAD / "_base" / "input"), "--out", str(out),
                                "--emit", "factored", "--quiet"] + options, check=True)
                (out / "surgery.json").unlink()
                (out / "SHA256SUMS").unlink()
                (OUT / name).write_bytes(pack(out))


if __name__ == "__main__":
    main()
