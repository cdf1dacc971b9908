//! Synthetic checkpoints for benchmarks: the exact tensor names, shapes, dtype, sharding and
//! `config.json` of a named model shape, with deterministic pseudo-random values (from `--seed`)
//! written tensor by tensor, so a 16 GB Llama-3-8B-sized checkpoint costs one tensor of memory.
//!
//! Attention projections (`q_proj`, `k_proj`, `v_proj`) get a decaying spectrum like trained ones:
//! `W = A diag(s) B + noise`, with Gaussian `A` (`[out, c]`) and `B` (`[c, in]`), `c` half of the
//! smaller side, `s_j ∝ (j + c/2)^-0.5`, and an isotropic noise floor holding a fifth of the energy.
//! Tuned so the SmolLM2-135M shape gets about the ranks the real SmolLM2 gets (`--q 0.9`: ~200 of
//! 576 vs 195; `--shared-kv 0.3`: ~22 of 384 vs 28). Every other tensor is uniform noise of a
//! similar scale (norm weights are ones).
//!
//! Values depend only on the seed, the tensor name and the shape: every tensor is generated in
//! fixed-size row blocks, each from its own PCG stream and multiplied sequentially, so the bytes do not
//! depend on the thread count.
//!
//! A byte-level `tokenizer.json` of the shape's vocabulary size comes with it
//! ([`super::tokenizer`]), so calibration and `eval` run on it.

use crate::error::{Error, Result};
use crate::model::arch::{Role, LLAMA};
use crate::model::layout::shard_file_name;
use crate::output::staging::{existing_at, OutTarget, Staging};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use half::bf16;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;
use safetensors::{Dtype, View};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A named model shape (Llama architecture).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Name given to `--shape`.
    pub name: &'static str,
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// `vocab_size`.
    pub vocab: usize,
    /// `tie_word_embeddings` (no `lm_head.weight` when tied).
    pub tied: bool,
    /// Number of safetensors shards (1 = a single `model.safetensors`).
    pub shards: usize,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// `max_position_embeddings`.
    pub max_positions: usize,
}

/// The shapes `synth` knows, as their Hugging Face configs give them (all BF16).
pub const SHAPES: &[ModelShape] = &[
    ModelShape {
        name: "smollm2-135m",
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        intermediate: 1536,
        vocab: 49152,
        tied: true,
        shards: 1,
        rope_theta: 100000.0,
        max_positions: 8192,
    },
    ModelShape {
        name: "tinyllama-1.1b",
        hidden: 2048,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        intermediate: 5632,
        vocab: 32000,
        tied: false,
        shards: 1,
        rope_theta: 10000.0,
        max_positions: 2048,
    },
    ModelShape {
        name: "llama3-8b",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        intermediate: 14336,
        vocab: 128256,
        tied: false,
        shards: 4,
        rope_theta: 500000.0,
        max_positions: 8192,
    },
];

/// Looks a shape up by name.
pub fn shape(name: &str) -> Option<&'static ModelShape> {
    SHAPES.iter().find(|s| s.name == name)
}

/// How a tensor's values are made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// All ones (RMSNorm weights).
    Ones,
    /// Uniform noise with standard deviation `std`.
    Noise { std: f32 },
    /// Decaying-spectrum matrix (attention projections) with per-entry RMS about `std`.
    Spectral { std: f32 },
}

/// One tensor to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthTensor {
    /// Hugging Face name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    kind: Kind,
}

impl ModelShape {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor, in model order (embedding, layers, final norm, head), named from the Llama
    /// table.
    pub fn tensors(&self) -> Vec<SynthTensor> {
        let h = self.hidden;
        let kv = self.kv_heads * self.head_dim();
        let std = (1.0 / h as f32).sqrt();
        let global = |role: Role| LLAMA.global_tensor_name(role).unwrap_or("?").to_string();
        let layer = |l: usize, role: Role| LLAMA.layer_tensor_name(l, role).unwrap_or_default();
        let t = |name: String, shape: Vec<usize>, kind: Kind| SynthTensor { name, shape, kind };
        let mut out = vec![t(
            global(Role::Embedding),
            vec![self.vocab, h],
            Kind::Noise { std: 0.02 },
        )];
        for l in 0..self.layers {
            out.push(t(layer(l, Role::InputNorm), vec![h], Kind::Ones));
            for (role, rows) in [(Role::Query, h), (Role::Key, kv), (Role::Value, kv)] {
                out.push(t(layer(l, role), vec![rows, h], Kind::Spectral { std }));
            }
            out.push(t(layer(l, Role::Output), vec![h, h], Kind::Noise { std }));
            out.push(t(layer(l, Role::PostAttentionNorm), vec![h], Kind::Ones));
            for (role, shape) in [
                (Role::MlpGate, vec![self.intermediate, h]),
                (Role::MlpUp, vec![self.intermediate, h]),
                (Role::MlpDown, vec![h, self.intermediate]),
            ] {
                out.push(t(layer(l, role), shape, Kind::Noise { std }));
            }
        }
        out.push(t(global(Role::FinalNorm), vec![h], Kind::Ones));
        if !self.tied {
            out.push(t(
                global(Role::LmHead),
                vec![self.vocab, h],
                Kind::Noise { std },
            ));
        }
        out
    }

    /// Total bytes of tensor data (BF16).
    pub fn data_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|t| 2 * t.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// The `config.json` of this shape.
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": self.max_positions,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "vocab_size": self.vocab,
            "surgery_synthetic": { "shape": self.name },
        })
    }

    /// Tensors split into `shards` files in model order, each closed once it reaches an equal share of
    /// the total (as `save_pretrained`'s `max_shard_size` does).
    pub fn shard_assignment(&self) -> Vec<Vec<SynthTensor>> {
        let tensors = self.tensors();
        if self.shards <= 1 {
            return vec![tensors];
        }
        let limit = self.data_bytes().div_ceil(self.shards as u64);
        let mut shards: Vec<Vec<SynthTensor>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in tensors {
            let bytes = 2 * t.shape.iter().product::<usize>() as u64;
            let last = shards.len() - 1;
            if size > 0 && size + bytes > limit && shards.len() < self.shards {
                shards.push(Vec::new());
                size = 0;
            }
            size += bytes;
            let last = last.max(shards.len() - 1);
            shards[last].push(t);
        }
        shards
    }
}

/// Rows generated per block (each block has its own random stream).
const BLOCK_ROWS: usize = 64;

/// A seed for one named stream: the first 8 bytes of SHA-256(seed, name, block).
fn stream_seed(seed: u64, name: &str, block: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    h.update((block as u64).to_le_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// `rows x cols` standard normal values (row-major), block by block.
fn gaussian(seed: u64, name: &str, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(BLOCK_ROWS * cols.max(1))
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut rng = Pcg64Mcg::seed_from_u64(stream_seed(seed, name, b));
            for x in chunk.iter_mut() {
                *x = StandardNormal.sample(&mut rng);
            }
        });
    out
}

fn to_bf16_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 2];
    out.par_chunks_mut(1 << 16)
        .zip(values.par_chunks(1 << 15))
        .for_each(|(o, v)| {
            for (dst, x) in o.chunks_exact_mut(2).zip(v) {
                dst.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        });
    out
}

/// The values of one tensor, BF16 little-endian.
fn generate(seed: u64, t: &SynthTensor) -> Vec<u8> {
    let len: usize = t.shape.iter().product();
    match t.kind {
        Kind::Ones => to_bf16_bytes(&vec![1.0; len]),
        Kind::Noise { std } => {
            let cols = t.shape.last().copied().unwrap_or(1).max(1);
            let a = std * 3f32.sqrt();
            let mut out = vec![0u8; len * 2];
            out.par_chunks_mut(BLOCK_ROWS * cols * 2)
                .enumerate()
                .for_each(|(b, chunk)| {
                    let mut rng = Pcg64Mcg::seed_from_u64(stream_seed(seed, &t.name, b));
                    if let Ok(u) = Uniform::new(-a, a) {
                        for dst in chunk.chunks_exact_mut(2) {
                            let x: f32 = u.sample(&mut rng);
                            dst.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
                        }
                    }
                });
            out
        }
        Kind::Spectral { std } => {
            to_bf16_bytes(&spectral(seed, &t.name, t.shape[0], t.shape[1], std))
        }
    }
}

/// `A diag(s) B + noise` (see the module docs), scaled to RMS `std` per entry.
fn spectral(seed: u64, name: &str, rows: usize, cols: usize, std: f32) -> Vec<f32> {
    let c = (rows.min(cols) / 2).max(1);
    let offset = (c as f32 / 2.0).max(1.0);
    let s: Vec<f32> = (0..c).map(|j| (j as f32 + offset).powf(-0.5)).collect();
    let energy: f32 = s.iter().map(|x| x * x).sum();
    // E|A diag(s) B|_F^2 = rows * cols * sum(s^2) with unit-variance A and B / sqrt(cols).
    let signal = 0.8f32.sqrt() * std / energy.sqrt();
    let a = gaussian(seed, &format!("{name}#a"), rows, c);
    let mut b = gaussian(seed, &format!("{name}#b"), c, cols);
    for (j, row) in b.chunks_exact_mut(cols).enumerate() {
        let scale = s[j] * signal;
        row.iter_mut().for_each(|x| *x *= scale);
    }
    let noise = gaussian(seed, &format!("{name}#noise"), rows, cols);
    let b = Mat::<f32>::from_fn(c, cols, |i, j| b[i * cols + j]);
    let noise_std = 0.2f32.sqrt() * std;
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(BLOCK_ROWS * cols)
        .enumerate()
        .for_each(|(blk, chunk)| {
            let r0 = blk * BLOCK_ROWS;
            let n = chunk.len() / cols;
            let a_blk = Mat::<f32>::from_fn(n, c, |i, j| a[(r0 + i) * c + j]);
            let mut p = Mat::<f32>::zeros(n, cols);
            matmul(
                p.as_mut(),
                Accum::Replace,
                a_blk.as_ref(),
                b.as_ref(),
                1.0,
                Par::Seq,
            );
            for i in 0..n {
                for j in 0..cols {
                    chunk[i * cols + j] = p[(i, j)] + noise_std * noise[(r0 + i) * cols + j];
                }
            }
        });
    out
}

/// A tensor generated when the safetensors writer asks for its bytes.
struct LazyTensor<'a> {
    seed: u64,
    tensor: &'a SynthTensor,
    len: usize,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(generate(self.seed, self.tensor))
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes the checkpoint of `shape` into `out` (atomically, via a staging directory); `force`
/// replaces an empty directory or an output of surgery-convert, as the product's `--force` does
/// (not an earlier synthetic checkpoint: it looks like any user's checkpoint). Returns the output
/// path.
pub fn write(shape: &ModelShape, seed: u64, out: &Path, force: bool) -> Result<PathBuf> {
    let out_abs = out_path(out)?;
    let target = OutTarget {
        existing: existing_at(&out_abs, out, force)?,
        path: out_abs.clone(),
    };
    let staging = Staging::create(&target)?;
    let shards = shape.shard_assignment();
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    for (i, tensors) in shards.iter().enumerate() {
        let file = shard_file_name(i, n);
        let path = staging.path().join(&file);
        let views: Vec<(String, LazyTensor)> = tensors
            .iter()
            .map(|t| {
                weight_map.insert(t.name.clone(), file.clone());
                (
                    t.name.clone(),
                    LazyTensor {
                        seed,
                        tensor: t,
                        len: 2 * t.shape.iter().product::<usize>(),
                    },
                )
            })
            .collect();
        safetensors::serialize_to_file(views, Some(metadata.clone()), &path).map_err(|e| {
            Error::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
        // The library writes through a private temporary file (mode 0600); make it readable like
        // any other checkpoint file.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(|e| Error::io(&path, e))?;
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": shape.data_bytes() },
            "weight_map": weight_map,
        });
        write_json(
            &staging.path().join(crate::model::layout::INDEX_FILE),
            &index,
        )?;
    }
    write_json(&staging.path().join("config.json"), &shape.config())?;
    write_json(
        &staging
            .path()
            .join(crate::forward::tokenize::TOKENIZER_FILE),
        &super::tokenizer::byte_level(shape.vocab),
    )?;
    staging.commit()?;
    Ok(out_abs)
}

/// `out` made absolute, its parent created.
fn out_path(out: &Path) -> Result<PathBuf> {
    let out_abs = std::path::absolute(out).map_err(|e| Error::io(out, e))?;
    if let Some(parent) = out_abs.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    Ok(out_abs)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let bytes = crate::model::latent::to_pretty_bytes(value, path)?;
    crate::output::writer::write_file(path, &bytes).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_published_sizes() {
        let tiny = shape("tinyllama-1.1b").unwrap();
        // TinyLlama-1.1B: 1,100,048,384 parameters.
        assert_eq!(tiny.data_bytes(), 2 * 1_100_048_384);
        let l3 = shape("llama3-8b").unwrap();
        // Llama-3-8B: 8,030,261,248 parameters.
        assert_eq!(l3.data_bytes(), 2 * 8_030_261_248);
        let smol = shape("smollm2-135m").unwrap();
        // SmolLM2-135M: 134,515,008 parameters (tied).
        assert_eq!(smol.data_bytes(), 2 * 134_515_008);
    }

    #[test]
    fn shards_split_in_model_order_and_cover_every_tensor() {
        let l3 = shape("llama3-8b").unwrap();
        let shards = l3.shard_assignment();
        assert_eq!(shards.len(), 4);
        let flat: Vec<String> = shards.iter().flatten().map(|t| t.name.clone()).collect();
        let all: Vec<String> = l3.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(flat, all);
        let limit = l3.data_bytes().div_ceil(4);
        for s in &shards[..3] {
            let bytes: u64 = s
                .iter()
                .map(|t| 2 * t.shape.iter().product::<usize>() as u64)
                .sum();
            assert!(bytes <= limit, "{bytes} > {limit}");
        }
    }

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let t = SynthTensor {
            name: "x.q_proj.weight".into(),
            shape: vec![150, 96],
            kind: Kind::Spectral { std: 0.1 },
        };
        let a = generate(7, &t);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| generate(7, &t));
        assert_eq!(a, b);
        assert_ne!(a, generate(8, &t));
        let u = SynthTensor {
            kind: Kind::Noise { std: 0.1 },
            ..t.clone()
        };
        assert_eq!(generate(3, &u), pool.install(|| generate(3, &u)));
    }

    #[test]
    fn spectral_matrices_have_a_decaying_spectrum() {
        let (rows, cols) = (128, 256);
        let w = spectral(1, "w", rows, cols, 0.05);
        let rms = (w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((rms - 0.05).abs() < 0.01, "rms {rms}");
        let m = Mat::<f64>::from_fn(rows, cols, |i, j| w[i * cols + j] as f64);
        let s = m.singular_values().unwrap();
        let total: f64 = s.iter().map(|x| x * x).sum();
        let mut cum = 0.0;
        let mut ranks = Vec::new();
        let mut k = 0;
        for t in [0.3, 0.9, 0.99] {
            while cum / total < t {
                cum += s[k] * s[k];
                k += 1;
            }
            ranks.push(k);
        }
        assert!(ranks[0] < ranks[1] && ranks[1] < ranks[2], "{ranks:?}");
        assert!(ranks[0] <= rows / 8 && ranks[2] > rows / 2, "{ranks:?}");
    }
}
