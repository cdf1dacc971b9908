//! A model's chat template: the Jinja template transformers' `apply_chat_template` renders
//! (`chat_template.jinja`, or `tokenizer_config.json`'s `chat_template`), rendered the same way
//! (trim and lstrip blocks, `raise_exception`, Python string methods) with `minijinja`. The
//! built-in calibration text renders its dialogue through it, as instruct models are used.

use crate::error::{Error, Result};
use crate::input::files::read_limited;
use crate::input::text::Message;
use minijinja::{context, Environment, ErrorKind};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The standalone template file transformers writes beside `tokenizer_config.json`.
const TEMPLATE_FILE: &str = "chat_template.jinja";
/// The tokenizer's configuration, which may hold the template and names the special tokens.
const CONFIG_FILE: &str = "tokenizer_config.json";
/// Largest template or tokenizer configuration read.
const MAX_BYTES: u64 = 16 << 20;

/// A chat template and the special tokens it may print.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    path: PathBuf,
    bos_token: String,
    eos_token: String,
}

/// A special token's text from `tokenizer_config.json` (a string or an `AddedToken` object).
fn token_text(config: &Value, key: &str) -> String {
    match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the tokenizer in `dir`, if it has one: `chat_template.jinja` first (as
    /// transformers reads it), else `tokenizer_config.json`'s `chat_template` (a string, or a list
    /// of named templates, of which `default`).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join(CONFIG_FILE);
        let config: Value = if config_path.is_file() {
            let text = read_limited(&config_path, MAX_BYTES)?;
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: config_path.clone(),
                source,
            })?
        } else {
            Value::Null
        };
        let file = dir.join(TEMPLATE_FILE);
        let (source, path) = if file.is_file() {
            (read_limited(&file, MAX_BYTES)?, file)
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => (s.clone(), config_path.clone()),
                Some(Value::Array(named)) => {
                    let default = named.iter().find(|t| t.get("name") == Some(&"default".into()));
                    match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                        Some(s) => (s.to_string(), config_path.clone()),
                        None => return Ok(None),
                    }
                }
                Some(Value::Null) | None => return Ok(None),
                Some(other) => {
                    return Err(Error::invalid(
                        &config_path,
                        format!("chat_template must be a string or a list of named templates, found {other}"),
                    ))
                }
            }
        };
        Ok(Some(ChatTemplate {
            source,
            path,
            bos_token: token_text(&config, "bos_token"),
            eos_token: token_text(&config, "eos_token"),
        }))
    }

    /// Renders each conversation as transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=False)` does, less a leading BOS (the windows put their own first).
    pub fn render_all(&self, conversations: &[&[Message]]) -> Result<Vec<String>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        let fail = |e: minijinja::Error| Error::invalid(&self.path, format!("chat template: {e}"));
        let template = env.template_from_str(&self.source).map_err(fail)?;
        conversations
            .iter()
            .map(|messages| {
                let text = template
                    .render(context! {
                        messages => messages,
                        add_generation_prompt => false,
                        bos_token => &self.bos_token,
                        eos_token => &self.eos_token,
                    })
                    .map_err(fail)?;
                Ok(match text.strip_prefix(self.bos_token.as_str()) {
                    Some(rest) if !self.bos_token.is_empty() => rest.to_string(),
                    _ => text,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<Message> {
        vec![
            Message {
                role: "user".into(),
                content: "Why?".into(),
            },
            Message {
                role: "assistant".into(),
                content: " Because. ".into(),
            },
        ]
    }

    #[test]
    fn renders_a_chatml_template_from_the_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        let template = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let config = serde_json::json!({"chat_template": template, "bos_token": "<s>",
            "eos_token": {"content": "</s>"}});
        std::fs::write(dir.path().join(CONFIG_FILE), config.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        let c = conversation();
        let out = t.render_all(&[&c]).unwrap();
        assert_eq!(
            out,
            vec!["<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nBecause.<|im_end|>\n"]
        );
    }

    #[test]
    fn a_standalone_file_wins_and_python_methods_work() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"{"chat_template": "ignored"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join(TEMPLATE_FILE),
            "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}{{ m.content.strip().upper() }}|{% endfor %}",
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        let c = conversation();
        assert_eq!(t.render_all(&[&c]).unwrap(), vec!["WHY?|BECAUSE.|"]);
        let bad = [Message {
            role: "tool".into(),
            content: "x".into(),
        }];
        let e = t.render_all(&[&bad]).unwrap_err().to_string();
        assert!(
            e.contains("chat_template.jinja") && e.contains("bad role"),
            "{e}"
        );
    }

    #[test]
    fn no_template_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::load(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"bos_token": "<s>"}"#).unwrap();
        assert!(ChatTemplate::load(dir.path()).unwrap().is_none());
    }
}
