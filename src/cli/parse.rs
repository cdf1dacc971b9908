//! Value parsers of the command line: sizes, and the entries of comma-separated SPEC lists (a fit
//! list's entries are parsed next to `FitArg`, in `convert`).

use crate::fit::spec::Spec;

/// One entry of a comma-separated SPEC list.
pub fn parse_spec_item(s: &str) -> Result<Spec, String> {
    if s.trim().is_empty() {
        return Err(
            "an empty entry: give comma-separated SPECs, e.g. 0.9,0.5,budget:0.25".to_string(),
        );
    }
    s.parse()
}

/// Parses a size like `2GB` (10^9), `2GiB` (2^30), `500MB`, `64KiB` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let number: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 2GB, 500MB, 1GiB or a number of bytes)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let bytes = (number * scale).floor();
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}`: the size must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Refuses an entry listed twice in `option`'s list.
pub(super) fn refuse_duplicates<T: ToString>(
    option: &str,
    items: &[T],
) -> crate::error::Result<()> {
    let names: Vec<String> = items.iter().map(ToString::to_string).collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(crate::error::Error::usage(
                option,
                format!("`{name}` is listed twice; give each entry once"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("64kib"), Ok(65536));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert!(parse_size("0").is_err());
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("abc").is_err());
    }
}
