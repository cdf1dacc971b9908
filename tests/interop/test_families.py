"""The families other than Llama (tests/interop/families.py: tiny random Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 models
written by transformers) converted by surgery-convert and checked in transformers, the tool's own
eval and llama.cpp: full rank reproduces the original, compressed and calibrated outputs load with
exactly the expected keys, the factored form loads with trust_remote_code, computes its factors'
product and generates the same tokens with and without its cache, expand gives back the dense
form, eval scores like transformers, and llama.cpp's converter and perplexity agree at full rank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import common
import families
from test_eval import rust_eval
from test_llama_cpp import llama_perplexity, to_gguf

FAMILY_NAMES = list(families.FAMILIES)
EVAL_RTOL = 1e-4  # eval vs transformers (issue 16's bound)
LLAMA_CPP_RTOL = 0.005


@pytest.fixture(scope="module")
def family_models(surgery_bin, original, work) -> dict[str, dict[str, Path]]:
    """Per family: the original and every conversion (plus `expanded`), written once per session."""
    result = {}
    for family in FAMILY_NAMES:
        root = work / "families" / family
        models = {"original": families.write_original(family, original, root / "original")}
        for name, options in families.CONVERSIONS.items():
            models[name] = families.convert(surgery_bin, models["original"], root / name, options)
        models["expanded"] = families.expand(surgery_bin, models["rank-factored"], root / "expanded")
        result[family] = models
    return result


def logits64(model, ids: torch.Tensor) -> torch.Tensor:
    return common.forward_logits(model.to(torch.float64), ids).to(torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_rank_reproduces_the_original(family, family_models, wiki_text):
    m = family_models[family]
    want = common.logits(str(m["original"]), str(wiki_text))
    got = common.logits(str(m["full"]), str(wiki_text))
    diff = float((got - want).abs().max())
    common.record(runtime="transformers", model=f"{family}-full", figure="max abs logit diff vs original", value=diff)
    assert diff < 1e-4, f"{family}: full rank differs by {diff}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("name", ["kv05", "act", "expanded"])
def test_outputs_load_with_exactly_the_expected_keys(family, name, family_models, wiki_text):
    m = family_models[family]
    common.load_checked(str(m[name]))
    got = common.logits(str(m[name]), str(wiki_text))
    want = common.logits(str(m["original"]), str(wiki_text))
    assert float((got - want).abs().max()) > 1e-3, f"{family} {name}: the surgery changed nothing"


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("name", ["rank-factored", "latent-factored"])
def test_factored_loads_and_generates_the_same_with_and_without_cache(family, name, family_models):
    m = family_models[family]
    model = common.load_remote(str(m[name]))
    assert type(model).__name__ == f"Surgery{family.split('-')[0].capitalize()}ForCausalLM"
    with_cache = common.generate(str(m[name]), use_cache=True, remote=True)
    without = common.generate(str(m[name]), use_cache=False, remote=True)
    assert with_cache == without, f"{family} {name}: cache changes the greedy tokens"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_factored_computes_the_product_of_its_factors(family, family_models, wiki_text):
    m = family_models[family]
    ids = common.logit_ids(str(m["original"]), str(wiki_text))
    factored = common.load_checked(str(m["rank-factored"]), dtype=torch.float64, trust_remote_code=True)
    stock = families.stock_with_products(family, m["rank-factored"], m["original"])
    r = rel(logits64(factored, ids), logits64(stock, ids))
    common.record(runtime="transformers", model=f"{family}-rank-factored", figure="f64 rel diff vs product", value=r)
    assert r < 1e-6, f"{family}: factored vs its factors' product {r}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_expand_gives_the_dense_twin(family, family_models, wiki_text):
    m = family_models[family]
    a = common.logits(str(m["expanded"]), str(wiki_text))
    b = common.logits(str(m["rank"]), str(wiki_text))
    diff = float((a - b).abs().max())
    common.record(runtime="transformers", model=f"{family}-expanded", figure="max abs logit diff vs dense twin", value=diff)
    assert diff < 1e-4, f"{family}: expanded vs dense twin {diff}"


def json_ids(model_dir: Path, text: Path) -> list[int]:
    """The ids of `text` by the checkpoint's tokenizer.json, as `eval` tokenizes (transformers'
    AutoTokenizer builds its own Qwen2Tokenizer for model_type qwen2 instead)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids[: common.EVAL_TOKENS]


def perplexity(model, ids: list[int]) -> float:
    """common.perplexity's convention (WINDOW-token windows, every prediction) on given ids."""
    n = len(ids) // common.WINDOW
    x = torch.tensor(ids[: n * common.WINDOW]).view(n, common.WINDOW)
    nll = 0.0
    with torch.inference_mode():
        for w in x:
            out = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(out, w[1:], reduction="sum"))
    return math.exp(nll / (n * (common.WINDOW - 1)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("name", ["original", "kv05", "act", "latent-factored"])
def test_eval_matches_transformers(family, name, family_models, surgery_bin, wiki_text):
    """The Rust pass (the factored form with a latent shared across layers included, against the
    factored module) scores like transformers on the same ids."""
    model_dir = family_models[family][name]
    report = rust_eval(surgery_bin, model_dir, wiki_text)
    remote = name.endswith("factored")
    model = common.load_remote(str(model_dir)) if remote else common.load(str(model_dir))
    ppl = perplexity(model, json_ids(model_dir, wiki_text))
    r = report["perplexity"] / ppl - 1
    common.record(runtime="surgery-convert eval", model=f"{family}-{name}", figure="ppl rel diff vs transformers", value=r)
    assert math.isfinite(ppl) and abs(r) < EVAL_RTOL, f"{family} {name}: eval {report['perplexity']} vs {ppl}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_llama_cpp_full_rank_has_the_original_perplexity(family, family_models, work, wiki_text):
    m = family_models[family]
    before = llama_perplexity(to_gguf(f"{family}-original", m["original"], work), wiki_text)
    after = llama_perplexity(to_gguf(f"{family}-full", m["full"], work), wiki_text)
    common.record(runtime="llama.cpp", model=f"{family}-full", figure="ppl rel diff vs original GGUF", value=after / before - 1)
    assert abs(after / before - 1) < LLAMA_CPP_RTOL, f"{family}: llama.cpp {after} vs original {before}"
