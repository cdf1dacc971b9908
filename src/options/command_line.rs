//! The command that reproduces an output, as recorded in its report: the program, then each
//! option that changes the output (and none that do not, such as `--out` or `--threads`).

/// A command line being built, word by word.
#[derive(Debug, Clone)]
pub struct CommandLine {
    words: Vec<String>,
}

impl CommandLine {
    /// `surgery-convert` followed by `words` (a subcommand and its positional argument, say).
    pub fn new<'a>(words: impl IntoIterator<Item = &'a str>) -> Self {
        let mut all = vec!["surgery-convert".to_string()];
        all.extend(words.into_iter().map(str::to_string));
        CommandLine { words: all }
    }

    /// Appends `flag value`.
    pub fn flag(&mut self, flag: &str, value: impl ToString) -> &mut Self {
        self.words.push(flag.to_string());
        self.words.push(value.to_string());
        self
    }

    /// Appends a switch (`--check`).
    pub fn switch(&mut self, flag: &str) -> &mut Self {
        self.words.push(flag.to_string());
        self
    }

    /// Appends `flag value` when there is a value.
    pub fn optional(&mut self, flag: &str, value: Option<impl ToString>) -> &mut Self {
        if let Some(v) = value {
            self.flag(flag, v);
        }
        self
    }

    /// Appends `--revision REV` unless it is the default, `main`.
    pub fn revision(&mut self, revision: &str) -> &mut Self {
        if revision != "main" {
            self.flag("--revision", revision);
        }
        self
    }

    /// Appends `flag a,b,c` when the list is not empty.
    pub fn list<T: ToString>(&mut self, flag: &str, items: &[T]) -> &mut Self {
        if !items.is_empty() {
            let joined: Vec<String> = items.iter().map(ToString::to_string).collect();
            self.flag(flag, joined.join(","));
        }
        self
    }

    /// The words, space-separated.
    pub fn finish(&self) -> String {
        self.words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_words_in_order() {
        let mut c = CommandLine::new(["expand", "m"]);
        c.revision("main")
            .optional("--q", None::<&str>)
            .list("--fit", &["pca", "svd"])
            .list::<String>("--q", &[])
            .revision("v1")
            .flag("--ctx", 512)
            .switch("--check");
        assert_eq!(
            c.finish(),
            "surgery-convert expand m --fit pca,svd --revision v1 --ctx 512 --check"
        );
    }
}
