//! An input checkpoint directory, opened without loading it: `config.json`, the safetensors shards
//! (memory-mapped, headers validated), and the other files to carry over.
//!
//! Tensor data is only ever borrowed from the maps; [`Checkpoint::release`] tells the kernel a tensor's
//! pages are no longer needed, so resident memory does not grow with the model.

pub use crate::input::entry::{FusedPart, TensorEntry};

use crate::error::{Error, Result};
use crate::input::header::{self, Header};
use crate::input::{config_file, files, fused, index};
use crate::model::arch::Classified;
use crate::model::config::ModelConfig;
use crate::model::dtype::FloatType;
use crate::model::layout::{CONFIG_FILE, GENERATED_FILES, INDEX_FILE, SINGLE_FILE};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::TensorInfo;
use std::collections::{BTreeMap, HashMap, HashSet};
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

/// Memory-maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and private to this process. Safety requires that no one
    // truncates or rewrites the file while it is mapped; this tool never writes to its input, and
    // users must not modify a checkpoint while it is being converted (as with any mmap-based loader,
    // e.g. safetensors' own `safe_open`).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The shard files of a checkpoint and, for an indexed one, the index's weight map.
#[derive(Debug)]
struct ShardList {
    /// Shard file names, in the order they are read.
    names: Vec<String>,
    /// Tensor name to shard file name, when the checkpoint has an index.
    weight_map: Option<BTreeMap<String, String>>,
}

/// The tensors found so far, with the name lookup that catches duplicates across shards.
#[derive(Debug, Default)]
struct TensorTable {
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    /// The names the shards store (a fused tensor's, where `by_name` has its parts').
    stored: HashSet<String>,
}

/// What checking one shard's tensors against the configuration and the index needs.
struct ShardScan<'a> {
    config: &'a ModelConfig,
    weight_map: Option<&'a BTreeMap<String, String>>,
    /// Index of the shard in [`Checkpoint::shards`].
    index: usize,
    file_name: &'a str,
    path: &'a Path,
    /// Length of the shard file.
    len: usize,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`, validating config, index, headers and the tensor-name table.
    ///
    /// Nothing outside the checkpoint is opened: every file read must resolve (symlinks followed)
    /// inside `dir`, or, for a Hugging Face cache snapshot, inside its repo folder (whose
    /// `snapshots/` symlink into `blobs/`); see [`files::containment_root`].
    pub fn open(dir: &Path) -> Result<Self> {
        let root = files::containment_root(dir)?;
        let config = open_config(dir, &root)?;
        let list = list_shards(dir, &root)?;
        let mut shards = Vec::with_capacity(list.names.len());
        let mut table = TensorTable::default();
        for (shard_index, file_name) in list.names.iter().enumerate() {
            let (shard, header) = open_shard(dir, &root, file_name)?;
            let scan = ShardScan {
                config: &config,
                weight_map: list.weight_map.as_ref(),
                index: shard_index,
                file_name,
                path: &shard.path,
                len: shard.map.len(),
            };
            table.add_shard(&scan, header)?;
            shards.push(shard);
        }
        if let Some(map) = &list.weight_map {
            table.check_all_present(dir, map)?;
        }
        let weight_files: Vec<&str> = list.names.iter().map(String::as_str).collect();
        let (other_files, skipped_files) = list_other_files(dir, &root, &weight_files)?;
        let checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors: table.tensors,
            indexed: list.weight_map.is_some(),
            other_files,
            skipped_files,
            by_name: table.by_name,
        };
        checkpoint.check_tensors()?;
        Ok(checkpoint)
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

    /// An [`Error::Tensor`] about `t`, naming its file and the tensor as stored
    /// ([`TensorEntry::error`]).
    pub fn tensor_error(&self, t: &TensorEntry, message: impl std::fmt::Display) -> Error {
        t.error(&self.shards[t.shard].path, message)
    }

    /// The float type of `t`, refused (naming its file and the tensor as stored) when it is not one
    /// the tool computes with; `purpose` says what was to be done (`decomposed`, `evaluated`, ...).
    pub fn float_type(&self, t: &TensorEntry, purpose: &'static str) -> Result<FloatType> {
        FloatType::of_tensor(
            t.dtype,
            &self.shards[t.shard].path,
            t.stored_name(),
            purpose,
        )
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
}

/// Reads and validates `config.json` of `dir`, which must exist and stay inside `root`.
fn open_config(dir: &Path, root: &Path) -> Result<ModelConfig> {
    let config_path = dir.join(CONFIG_FILE);
    if config_path.symlink_metadata().is_err() {
        return Err(Error::invalid(
            &config_path,
            "not found: a checkpoint directory needs config.json",
        ));
    }
    files::check_contained(root, &config_path)?;
    config_file::read(&config_path)
}

/// The shard files of `dir`: those `model.safetensors.index.json` lists, or `model.safetensors`
/// alone. Every one must exist before any is read.
fn list_shards(dir: &Path, root: &Path) -> Result<ShardList> {
    let index_path = dir.join(INDEX_FILE);
    let list = if index_path.symlink_metadata().is_ok() {
        files::check_contained(root, &index_path)?;
        let index = index::read(&index_path)?;
        ShardList {
            names: index.shards,
            weight_map: Some(index.weight_map),
        }
    } else if dir.join(SINGLE_FILE).symlink_metadata().is_ok() {
        ShardList {
            names: vec![SINGLE_FILE.to_string()],
            weight_map: None,
        }
    } else {
        return Err(Error::invalid(
            dir,
            format!("no {SINGLE_FILE} or {INDEX_FILE} found (only safetensors checkpoints are supported)"),
        ));
    };
    for file_name in &list.names {
        let path = dir.join(file_name);
        if path.symlink_metadata().is_err() {
            return Err(Error::invalid(
                &path,
                format!("shard listed in {INDEX_FILE} is missing"),
            ));
        }
    }
    Ok(list)
}

/// Maps the shard `file_name` of `dir` (which must stay inside `root`) and parses its header.
fn open_shard(dir: &Path, root: &Path, file_name: &str) -> Result<(Shard, Header)> {
    let path = dir.join(file_name);
    files::check_contained(root, &path)?;
    let map = map_file(&path)?;
    let mut header = header::parse(&map).map_err(|e| match e.tensor {
        Some(name) => Error::tensor(&path, name, e.message),
        None => Error::Safetensors {
            path: path.clone(),
            message: e.message,
        },
    })?;
    let shard = Shard {
        file_name: file_name.to_string(),
        path,
        metadata: std::mem::take(&mut header.metadata),
        map,
    };
    Ok((shard, header))
}

impl TensorTable {
    /// Adds the tensors of one shard's header, each checked by `scan`, refusing a name already seen.
    fn add_shard(&mut self, scan: &ShardScan, header: Header) -> Result<()> {
        if self.tensors.len() + header.tensors.len() > header::MAX_TENSORS {
            return Err(Error::Safetensors {
                path: scan.path.to_path_buf(),
                message: format!(
                    "the checkpoint holds more than {} tensors (the limit)",
                    header::MAX_TENSORS
                ),
            });
        }
        for (name, info) in header.tensors {
            let stored = scan.entry(name, info, header.data_start)?;
            self.stored.insert(stored.name.clone());
            for entry in fused::split(scan.config, scan.path, stored)? {
                self.add(scan, entry)?;
            }
        }
        Ok(())
    }

    /// Adds one entry, refusing a name already seen.
    fn add(&mut self, scan: &ShardScan, entry: TensorEntry) -> Result<()> {
        if self
            .by_name
            .insert(entry.name.clone(), self.tensors.len())
            .is_some()
        {
            return Err(entry.error(
                scan.path,
                "appears twice (in more than one shard, or also inside a fused tensor)",
            ));
        }
        self.tensors.push(entry);
        Ok(())
    }

    /// Every tensor the index lists must be in a shard (under the name the shard stores: a fused
    /// tensor's, not its parts').
    fn check_all_present(&self, dir: &Path, weight_map: &BTreeMap<String, String>) -> Result<()> {
        for (name, file) in weight_map {
            if !self.stored.contains(name) {
                return Err(Error::tensor(
                    dir.join(file),
                    name,
                    format!("listed in {INDEX_FILE} but absent from the shard"),
                ));
            }
        }
        Ok(())
    }
}

impl ShardScan<'_> {
    /// Checks one header entry (data range, shape, name, layer, index) into a [`TensorEntry`].
    fn entry(&self, name: String, info: TensorInfo, data_start: usize) -> Result<TensorEntry> {
        let range = self.data_range(&name, data_start, info.data_offsets)?;
        if info.shape.contains(&0) {
            return Err(Error::tensor(
                self.path,
                &name,
                format!(
                    "shape {:?} has no elements (no Llama tensor is empty)",
                    info.shape
                ),
            ));
        }
        let class = self.classify(&name)?;
        self.check_listed(&name)?;
        Ok(TensorEntry {
            name,
            shard: self.index,
            dtype: info.dtype,
            shape: info.shape,
            range,
            class,
            fused: None,
        })
    }

    /// The tensor's byte range in the file.
    fn data_range(
        &self,
        name: &str,
        data_start: usize,
        (begin, end): (usize, usize),
    ) -> Result<Range<usize>> {
        // The header module checked that the tensors tile the data section, which ends at the end
        // of the file; the checked sums keep that true here without relying on it.
        data_start
            .checked_add(begin)
            .zip(data_start.checked_add(end))
            .map(|(b, e)| b..e)
            .filter(|r| r.end <= self.len)
            .ok_or_else(|| Error::tensor(self.path, name, "data offsets out of bounds"))
    }

    /// The tensor's place in the architecture's table, its layer within `num_hidden_layers`.
    fn classify(&self, name: &str) -> Result<Classified> {
        let config = self.config;
        let class = config.arch.classify(name).ok_or_else(|| {
            Error::tensor(
                self.path,
                name,
                format!(
                    "not a {} tensor name (unmapped tensors are refused)",
                    config.arch.family
                ),
            )
        })?;
        if let Some(layer) = class.layer {
            if layer >= config.num_layers {
                return Err(Error::tensor(
                    self.path,
                    name,
                    format!(
                        "layer {layer} but config.json has num_hidden_layers = {}",
                        config.num_layers
                    ),
                ));
            }
        }
        Ok(class)
    }

    /// For an indexed checkpoint: the index must place the tensor in this shard.
    fn check_listed(&self, name: &str) -> Result<()> {
        let Some(map) = self.weight_map else {
            return Ok(());
        };
        match map.get(name) {
            Some(listed) if listed == self.file_name => Ok(()),
            Some(listed) => Err(Error::tensor(
                self.path,
                name,
                format!("the index places it in {listed}"),
            )),
            None => Err(Error::tensor(
                self.path,
                name,
                format!("not listed in {INDEX_FILE}"),
            )),
        }
    }
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

mod checks;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_shapes;
