//! An input checkpoint directory, opened without loading it: `config.json`, the safetensors shards
//! (memory-mapped, headers validated), and the other files to carry over.
//!
//! Tensor data is only ever borrowed from the maps; [`Checkpoint::release`] tells the kernel a tensor's
//! pages are no longer needed, so resident memory does not grow with the model.

use crate::model::arch::{Classified, Role};
use crate::model::config::ModelConfig;
use crate::model::dtype::FloatType;
use crate::error::{Error, Result};
use crate::input::{files, header};
use crate::model::layout::{CONFIG_FILE, GENERATED_FILES, INDEX_FILE, SINGLE_FILE};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Extensions of weight formats other than safetensors: not copied (they would carry the original
/// weights under the converted model's name), listed in the report as skipped.
const FOREIGN_WEIGHT_EXTENSIONS: &[&str] = &[
    "bin",
    "pt",
    "pth",
    "ckpt",
    "h5",
    "msgpack",
    "gguf",
    "onnx",
    "safetensors",
    "npz",
];

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct Shard {
    /// File name inside the checkpoint directory.
    pub file_name: String,
    /// Full path.
    pub path: PathBuf,
    /// The `__metadata__` of its header.
    pub metadata: BTreeMap<String, String>,
    map: Mmap,
}

/// One tensor of the input.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Hugging Face name.
    pub name: String,
    /// Index into [`Checkpoint::shards`].
    pub shard: usize,
    /// Storage type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range inside the shard file.
    pub range: Range<usize>,
    /// Its place in the architecture's name table.
    pub class: Classified,
}

/// An opened input checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Validated configuration.
    pub config: ModelConfig,
    /// Shards in index order.
    pub shards: Vec<Shard>,
    /// Every tensor, ordered by shard then offset.
    pub tensors: Vec<TensorEntry>,
    /// Whether the input uses `model.safetensors.index.json`.
    pub indexed: bool,
    /// Other files to copy unchanged, relative to `dir`, sorted.
    pub other_files: Vec<PathBuf>,
    /// Files not carried over (other weight formats), relative to `dir`, sorted.
    pub skipped_files: Vec<PathBuf>,
    by_name: HashMap<String, usize>,
}

/// Whether files with this extension hold weights in a format this tool does not carry over.
pub fn is_foreign_weight_extension(ext: &str) -> bool {
    FOREIGN_WEIGHT_EXTENSIONS.contains(&ext)
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && !Path::new(name).is_absolute()
}

/// Memory-maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and private to this process. Safety requires that no one
    // truncates or rewrites the file while it is mapped; this tool never writes to its input, and
    // users must not modify a checkpoint while it is being converted (as with any mmap-based loader,
    // e.g. safetensors' own `safe_open`).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`, validating config, index, headers and the tensor-name table.
    ///
    /// Nothing outside the checkpoint is opened: every file read must resolve (symlinks followed)
    /// inside `dir`, or, for a Hugging Face cache snapshot, inside its repo folder (whose
    /// `snapshots/` symlink into `blobs/`); see [`files::containment_root`].
    pub fn open(dir: &Path) -> Result<Self> {
        let root = files::containment_root(dir)?;
        let config_path = dir.join(CONFIG_FILE);
        if config_path.symlink_metadata().is_err() {
            return Err(Error::invalid(
                &config_path,
                "not found: a checkpoint directory needs config.json",
            ));
        }
        files::check_contained(&root, &config_path)?;
        let config = ModelConfig::load(&config_path)?;

        let index_path = dir.join(INDEX_FILE);
        let (shard_names, weight_map) = if index_path.symlink_metadata().is_ok() {
            files::check_contained(&root, &index_path)?;
            let (names, map) = read_index(&index_path)?;
            (names, Some(map))
        } else if dir.join(SINGLE_FILE).symlink_metadata().is_ok() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(Error::invalid(
                dir,
                format!("no {SINGLE_FILE} or {INDEX_FILE} found (only safetensors checkpoints are supported)"),
            ));
        };

        // Every shard the index names must exist before any is read.
        for file_name in &shard_names {
            let path = dir.join(file_name);
            if path.symlink_metadata().is_err() {
                return Err(Error::invalid(
                    &path,
                    format!("shard listed in {INDEX_FILE} is missing"),
                ));
            }
        }
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (shard_index, file_name) in shard_names.iter().enumerate() {
            let path = dir.join(file_name);
            files::check_contained(&root, &path)?;
            let map = map_file(&path)?;
            let header = header::parse(&map).map_err(|e| match e.tensor {
                Some(name) => Error::tensor(&path, name, e.message),
                None => Error::Safetensors {
                    path: path.clone(),
                    message: e.message,
                },
            })?;
            if tensors.len() + header.tensors.len() > header::MAX_TENSORS {
                return Err(Error::Safetensors {
                    path: path.clone(),
                    message: format!(
                        "the checkpoint holds more than {} tensors (the limit)",
                        header::MAX_TENSORS
                    ),
                });
            }
            let data_start = header.data_start;
            for (name, info) in header.tensors {
                let (begin, end) = info.data_offsets;
                // The header module checked that the tensors tile the data section, which ends at
                // the end of the file; the checked sums keep that true here without relying on it.
                let range = data_start
                    .checked_add(begin)
                    .zip(data_start.checked_add(end))
                    .map(|(b, e)| b..e)
                    .filter(|r| r.end <= map.len())
                    .ok_or_else(|| Error::tensor(&path, &name, "data offsets out of bounds"))?;
                if info.shape.contains(&0) {
                    return Err(Error::tensor(
                        &path,
                        &name,
                        format!(
                            "shape {:?} has no elements (no Llama tensor is empty)",
                            info.shape
                        ),
                    ));
                }
                let class = config.arch.classify(&name).ok_or_else(|| {
                    Error::tensor(
                        &path,
                        &name,
                        format!(
                            "not a {} tensor name (unmapped tensors are refused)",
                            config.arch.family
                        ),
                    )
                })?;
                if let Some(layer) = class.layer {
                    if layer >= config.num_layers {
                        return Err(Error::tensor(
                            &path,
                            &name,
                            format!(
                                "layer {layer} but config.json has num_hidden_layers = {}",
                                config.num_layers
                            ),
                        ));
                    }
                }
                if let Some(map) = &weight_map {
                    match map.get(&name) {
                        Some(listed) if listed == file_name => {}
                        Some(listed) => {
                            return Err(Error::tensor(
                                &path,
                                &name,
                                format!("the index places it in {listed}"),
                            ))
                        }
                        None => {
                            return Err(Error::tensor(
                                &path,
                                &name,
                                format!("not listed in {INDEX_FILE}"),
                            ))
                        }
                    }
                }
                if by_name.insert(name.clone(), tensors.len()).is_some() {
                    return Err(Error::tensor(
                        &path,
                        &name,
                        "appears in more than one shard",
                    ));
                }
                tensors.push(TensorEntry {
                    name,
                    shard: shard_index,
                    dtype: info.dtype,
                    shape: info.shape,
                    range,
                    class,
                });
            }
            shards.push(Shard {
                file_name: file_name.clone(),
                path,
                metadata: header.metadata,
                map,
            });
        }
        if let Some(map) = &weight_map {
            for (name, file) in map {
                if !by_name.contains_key(name) {
                    return Err(Error::tensor(
                        dir.join(file),
                        name,
                        format!("listed in {INDEX_FILE} but absent from the shard"),
                    ));
                }
            }
        }

        let weight_files: Vec<&str> = shard_names.iter().map(String::as_str).collect();
        let (other_files, skipped_files) = list_other_files(dir, &root, &weight_files)?;
        let checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
            indexed: weight_map.is_some(),
            other_files,
            skipped_files,
            by_name,
        };
        checkpoint.check_projections()?;
        Ok(checkpoint)
    }

    /// Every layer must have its attention projections (q, k and v, or for a factored checkpoint the
    /// factors `config.json` describes) with the shapes config.json implies, in a float type, and no
    /// others.
    fn check_projections(&self) -> Result<()> {
        let c = &self.config;
        for layer in 0..c.num_layers {
            let expected = c.attention_tensors(layer);
            for &(role, shape) in &expected {
                let Some(name) = c.arch.layer_tensor_name(layer, role) else {
                    continue;
                };
                let Some(t) = self.tensor(&name) else {
                    let file = self.expected_file_for_layer(layer);
                    let why = if c.latent.is_some() {
                        "missing (config.json's latent_attention says this layer has it)"
                    } else {
                        "missing (every layer needs q_proj, k_proj and v_proj)"
                    };
                    return Err(Error::tensor(file, &name, why));
                };
                let path = &self.shards[t.shard].path;
                if t.shape != shape {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!(
                            "shape {:?} disagrees with config.json, which implies {:?}",
                            t.shape, shape
                        ),
                    ));
                }
                if FloatType::from_dtype(t.dtype).is_none() {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!(
                            "dtype {:?} cannot be decomposed (supported: F32, F16, BF16)",
                            t.dtype
                        ),
                    ));
                }
            }
        }
        for t in &self.tensors {
            let attention = matches!(
                t.class.role,
                Role::Query | Role::Key | Role::Value | Role::Factor(_)
            );
            let expected = t.class.layer.is_some_and(|layer| {
                c.attention_tensors(layer)
                    .iter()
                    .any(|&(role, _)| role == t.class.role)
            });
            if attention && !expected {
                let why = match (&c.latent, t.class.role) {
                    (None, _) => "a factor of the factored form, but config.json does not describe one (latent_attention missing)",
                    (Some(_), Role::Factor(_)) => "a factor config.json's latent_attention does not describe",
                    (Some(_), _) => "a dense projection that config.json's latent_attention says is factored",
                };
                return Err(Error::tensor(&self.shards[t.shard].path, &t.name, why));
            }
        }
        Ok(())
    }

    /// The file a layer's tensors are in (the first one found), for messages about missing tensors.
    fn expected_file_for_layer(&self, layer: usize) -> PathBuf {
        self.tensors
            .iter()
            .find(|t| t.class.layer == Some(layer))
            .map(|t| self.shards[t.shard].path.clone())
            .unwrap_or_else(|| self.shards[0].path.clone())
    }

    /// Refuses a factored checkpoint (written by `--emit factored`) for a command that needs a
    /// standard one; `input` is `--in` as given, for the suggested `expand` command.
    pub fn require_dense(&self, input: &str) -> Result<()> {
        match self.config.latent {
            Some(_) => Err(Error::FactoredInput {
                path: self.dir.join(CONFIG_FILE),
                input: input.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Index of a tensor in [`Self::tensors`].
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The tensor's bytes, borrowed from the map.
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.shards[t.shard].map[t.range.clone()]
    }

    /// Tells the kernel the tensor's pages are no longer needed. Failure is harmless and ignored.
    pub fn release(&self, t: &TensorEntry) {
        self.release_range(t.shard, t.range.clone());
    }

    /// Bytes `range` of shard `shard`'s file, borrowed from the map (for hashing whole files).
    pub fn file_bytes(&self, shard: usize, range: Range<usize>) -> &[u8] {
        &self.shards[shard].map[range]
    }

    /// Length of shard `shard`'s file.
    pub fn file_len(&self, shard: usize) -> usize {
        self.shards[shard].map.len()
    }

    /// Tells the kernel that bytes `range` of shard `shard`'s map are no longer needed (the pages
    /// they touch, rounded out to page boundaries). Failure is harmless and ignored.
    pub fn release_range(&self, shard: usize, range: Range<usize>) {
        let map = &self.shards[shard].map;
        if range.is_empty() || range.end > map.len() {
            return;
        }
        // SAFETY: MADV_DONTNEED on a read-only, file-backed private mapping that is never written
        // only drops clean pages; any later access re-reads them from the file, so borrowed slices
        // stay valid and keep their contents.
        let _ = unsafe {
            map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len())
        };
    }

    /// Total bytes of all weight files.
    pub fn weight_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }
}

/// Largest `model.safetensors.index.json` accepted (64 MiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The index's `weight_map`, streamed so duplicate names and oversized maps are refused.
struct WeightMap(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<WeightMap, A::Error> {
                use serde::de::Error as _;
                let mut out = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    if out.len() >= header::MAX_TENSORS {
                        return Err(A::Error::custom(format!(
                            "weight_map lists more than {} tensors (the limit)",
                            header::MAX_TENSORS
                        )));
                    }
                    let file: String = map.next_value().map_err(|e| {
                        A::Error::custom(format!("weight_map entry for `{name}`: {e}"))
                    })?;
                    if out.contains_key(&name) {
                        return Err(A::Error::custom(format!(
                            "weight_map lists `{name}` more than once"
                        )));
                    }
                    out.insert(name, file);
                }
                Ok(WeightMap(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: WeightMap,
}

/// Reads `model.safetensors.index.json`: shard names (sorted) and the weight map.
fn read_index(path: &Path) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let text = files::read_limited(path, MAX_INDEX_BYTES)?;
    let index: IndexFile = serde_json::from_str(&text).map_err(|source| {
        if source.classify() == serde_json::error::Category::Data {
            Error::invalid(path, source.to_string())
        } else {
            Error::Json {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let weight_map = index.weight_map.0;
    for (name, file) in &weight_map {
        if !is_plain_file_name(file) {
            return Err(Error::invalid(
                path,
                format!("weight_map entry for `{name}` names `{file}`, which is not a plain file name in the checkpoint directory (refused: only files inside it are opened)"),
            ));
        }
    }
    if weight_map.is_empty() {
        return Err(Error::invalid(path, "`weight_map` is empty"));
    }
    let mut names: Vec<String> = weight_map.values().cloned().collect();
    names.sort();
    names.dedup();
    Ok((names, weight_map))
}

/// Lists the files of `dir` (recursively, skipping hidden entries) other than the weights: those to
/// copy, and those in other weight formats to skip.
fn list_other_files(
    dir: &Path,
    root: &Path,
    weight_files: &[&str],
) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut copy = Vec::new();
    let mut skip = Vec::new();
    for rel in files::walk_within(dir, false, root)? {
        let top_level = rel.parent().is_none_or(|p| p.as_os_str().is_empty());
        let name = rel.to_string_lossy();
        if top_level
            && (weight_files.contains(&name.as_ref())
                || name == INDEX_FILE
                || GENERATED_FILES.contains(&name.as_ref()))
        {
            continue;
        }
        let ext = rel.extension().and_then(|e| e.to_str()).unwrap_or("");
        if is_foreign_weight_extension(ext) {
            skip.push(rel);
        } else {
            copy.push(rel);
        }
    }
    Ok((copy, skip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_file_names() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        for bad in [
            "",
            "..",
            "../x.safetensors",
            "/etc/passwd",
            "a/b.safetensors",
            "a\\b",
        ] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
