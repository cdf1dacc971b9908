//! Parsing a safetensors file's header with explicit resource limits and exact diagnostics.
//!
//! The `safetensors` crate's own reader merges duplicate tensor names silently (it collects them into
//! a map) and names no tensor in most of its errors, so this module parses the header itself while
//! reusing the crate's types: the 8-byte length is checked against [`MAX_HEADER_BYTES`] and the file
//! length before anything is read, the JSON object is streamed entry by entry so a duplicate name or
//! an entry past [`MAX_TENSORS`] stops it before more is allocated (only a failure is parsed again,
//! without allocating, to tell bad syntax from bad entries), and every offset and size is computed
//! with checked arithmetic. What it accepts, the `safetensors` crate accepts too.

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde::de::{self, MapAccess, Visitor};
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// Largest header accepted (64 MiB): about 400,000 tensor entries; real Llama headers are tens of
/// kilobytes (Llama-3-8B: 27 KB over four shards).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

/// Most tensors accepted in one file, and in one checkpoint (262,144; Llama-3-405B has 1,138).
pub const MAX_TENSORS: usize = 1 << 18;

/// Most dimensions one tensor may have.
pub const MAX_DIMS: usize = 8;

/// A validated header.
#[derive(Debug)]
pub struct Header {
    /// Byte offset of the data section in the file (8 + header length).
    pub data_start: usize,
    /// The `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
    /// Tensors in data order, their `data_offsets` relative to `data_start`, contiguous from 0 to the
    /// end of the file.
    pub tensors: Vec<(String, TensorInfo)>,
}

/// Why a header was refused; `tensor` names the entry when the problem is in one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    /// The tensor concerned, if any.
    pub tensor: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl HeaderError {
    fn file(message: impl Into<String>) -> Self {
        HeaderError {
            tensor: None,
            message: message.into(),
        }
    }

    fn tensor(name: &str, message: impl Into<String>) -> Self {
        HeaderError {
            tensor: Some(name.to_string()),
            message: message.into(),
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tensor {
            Some(t) => write!(f, "tensor `{t}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Bytes one tensor's data takes, or why it cannot be computed.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Result<usize, String> {
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?}: the element count overflows"))?;
    let bits = elements
        .checked_mul(dtype.bitsize())
        .ok_or_else(|| format!("shape {shape:?} of {dtype:?}: the size overflows"))?;
    if bits % 8 != 0 {
        return Err(format!(
            "shape {shape:?} of {dtype:?} is not a whole number of bytes"
        ));
    }
    Ok(bits / 8)
}

/// Parses and validates the header of `file` (the whole file's bytes).
pub fn parse(file: &[u8]) -> Result<Header, HeaderError> {
    let Some(prefix) = file.get(..8) else {
        return Err(HeaderError::file(format!(
            "file is {} bytes, too short for the 8-byte header length",
            file.len()
        )));
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len == 0 {
        return Err(HeaderError::file(
            "header length is 0 (a header is a JSON object of at least 2 bytes)",
        ));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(HeaderError::file(format!(
            "header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes (refused before reading it)"
        )));
    }
    let remaining = file.len() - 8;
    let header_len = usize::try_from(header_len)
        .ok()
        .filter(|&n| n <= remaining)
        .ok_or_else(|| {
            HeaderError::file(format!(
                "header length {header_len} is larger than the {remaining} bytes after it (truncated file?)"
            ))
        })?;
    let data_start = 8 + header_len;
    let text = std::str::from_utf8(&file[8..data_start])
        .map_err(|e| HeaderError::file(format!("header is not UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(HeaderError::file(
            "header is not JSON: it must be a JSON object starting with `{`",
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = de::Deserializer::deserialize_map(&mut de, HeaderVisitor)
        .and_then(|entries| de.end().map(|()| entries))
        .map_err(|e| {
            // The visitor's context hides the error's kind; only on failure, a second pass that
            // allocates nothing tells a malformed header from a well-formed one with bad entries.
            match serde_json::from_str::<de::IgnoredAny>(text) {
                Err(syntax) => HeaderError::file(format!("header is not valid JSON: {syntax}")),
                Ok(_) => HeaderError::file(format!("header: {e}")),
            }
        })?;
    let Entries { metadata, tensors } = entries;
    let data_len = file.len() - data_start;
    Ok(Header {
        data_start,
        metadata,
        tensors: check_layout(tensors, data_len)?,
    })
}

/// Orders tensors by offset and checks that they tile the data section exactly: no gap, no overlap,
/// each span exactly the size its dtype and shape imply, the last ending at the end of the file.
fn check_layout(
    mut tensors: Vec<(String, TensorInfo)>,
    data_len: usize,
) -> Result<Vec<(String, TensorInfo)>, HeaderError> {
    tensors.sort_by(|a, b| {
        a.1.data_offsets
            .cmp(&b.1.data_offsets)
            .then_with(|| a.0.cmp(&b.0))
    });
    let mut expected = 0usize;
    let mut previous: Option<&str> = None;
    for (name, info) in &tensors {
        let (begin, end) = info.data_offsets;
        if end < begin {
            return Err(HeaderError::tensor(
                name,
                format!("data_offsets [{begin}, {end}] end before they begin"),
            ));
        }
        if info.shape.len() > MAX_DIMS {
            return Err(HeaderError::tensor(
                name,
                format!(
                    "{} dimensions (at most {MAX_DIMS} are accepted)",
                    info.shape.len()
                ),
            ));
        }
        let size = byte_len(info.dtype, &info.shape).map_err(|m| HeaderError::tensor(name, m))?;
        if size != end - begin {
            return Err(HeaderError::tensor(
                name,
                format!(
                    "{:?} {:?} needs {size} bytes but data_offsets [{begin}, {end}] span {}",
                    info.dtype,
                    info.shape,
                    end - begin
                ),
            ));
        }
        if begin < expected {
            let other = previous.unwrap_or("?");
            return Err(HeaderError::tensor(
                name,
                format!("data_offsets [{begin}, {end}] overlap those of `{other}`"),
            ));
        }
        if begin > expected {
            return Err(HeaderError::tensor(
                name,
                format!("data_offsets [{begin}, {end}] leave bytes [{expected}, {begin}) of the data to no tensor (offsets not contiguous)"),
            ));
        }
        expected = end;
        previous = Some(name);
    }
    if expected > data_len {
        let name = previous.unwrap_or("?");
        return Err(HeaderError::tensor(
            name,
            format!("data ends at byte {expected} of the data section but the file holds {data_len} (truncated file or offsets out of bounds)"),
        ));
    }
    if expected < data_len {
        return Err(HeaderError::file(format!(
            "the tensors cover {expected} of the {data_len} data bytes; the rest belongs to no tensor"
        )));
    }
    Ok(tensors)
}

struct Entries {
    metadata: BTreeMap<String, String>,
    tensors: Vec<(String, TensorInfo)>,
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Entries;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
        let mut seen = HashSet::new();
        let mut metadata = None;
        let mut tensors = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("`{key}` appears more than once")));
            }
            if key == "__metadata__" {
                metadata = Some(map.next_value::<BTreeMap<String, String>>().map_err(|e| {
                    de::Error::custom(format!("`__metadata__` must map strings to strings: {e}"))
                })?);
                continue;
            }
            if tensors.len() >= MAX_TENSORS {
                return Err(de::Error::custom(format!(
                    "more than {MAX_TENSORS} tensors (the limit; refused before reading the rest)"
                )));
            }
            let info = map
                .next_value::<TensorInfo>()
                .map_err(|e| de::Error::custom(format!("tensor `{key}`: {e}")))?;
            tensors.push((key, info));
        }
        Ok(Entries {
            metadata: metadata.unwrap_or_default(),
            tensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data));
        out
    }

    fn err(header: &str, data: usize) -> String {
        parse(&file(header, data)).unwrap_err().to_string()
    }

    #[test]
    fn accepts_what_safetensors_writes() {
        let a = vec![1u8; 16];
        let b = vec![2u8; 8];
        let views = vec![
            (
                "b",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &b).unwrap(),
            ),
            (
                "a",
                safetensors::tensor::TensorView::new(Dtype::F16, vec![2, 4], &a).unwrap(),
            ),
        ];
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(meta)).unwrap();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.metadata["format"], "pt");
        let names: Vec<&str> = h.tensors.iter().map(|(n, _)| n.as_str()).collect();
        // The crate orders by dtype alignment then name; we order by offset.
        let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(names, st.offset_keys());
        assert_eq!(h.data_start + 24, bytes.len());
    }

    #[test]
    fn a_header_with_too_many_tensors_is_refused_while_streaming() {
        let mut header = String::from("{");
        for i in 0..=MAX_TENSORS {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&format!(
                r#""t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                i + 1
            ));
        }
        header.push('}');
        let e = parse(&file(&header, MAX_TENSORS + 1)).unwrap_err();
        assert!(e.message.contains("more than 262144 tensors"), "{e}");
    }

    #[test]
    fn refuses_with_the_cause() {
        let one = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(parse(&file(one, 8)).is_ok());
        assert!(err(one, 4).contains("truncated"));
        assert!(err(one, 12).contains("belongs to no tensor"));
        assert!(parse(&[1, 2, 3]).unwrap_err().message.contains("too short"));
        let mut huge = file(one, 8);
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(parse(&huge).unwrap_err().message.contains("limit"));
        huge[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(parse(&huge).unwrap_err().message.contains("larger than"));
        huge[..8].copy_from_slice(&0u64.to_le_bytes());
        assert!(parse(&huge).unwrap_err().message.contains("is 0"));
        let dup = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(err(dup, 4).contains("more than once"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let e = parse(&file(overlap, 12)).unwrap_err();
        assert_eq!(e.tensor.as_deref(), Some("b"));
        assert!(e.message.contains("overlap those of `a`"));
        let gap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(err(gap, 12).contains("not contiguous"));
        let size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(err(size, 8).contains("needs 12 bytes"));
        let overflow =
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(err(overflow, 8).contains("overflows"));
        let dtype = r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(err(dtype, 8).contains("tensor `a`"));
        assert!(err("[1,2]", 0).contains("JSON object"));
        assert!(err("{\"a\": ", 0).contains("not valid JSON"));
    }
}
