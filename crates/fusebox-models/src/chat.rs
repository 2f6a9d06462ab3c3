//! Chat templates from `tokenizer_config.json`, rendered with minijinja so
//! that the result is byte-identical to transformers' `apply_chat_template`
//! (same whitespace control, Python string methods, `tojson` formatting).

use std::path::Path;

use anyhow::{anyhow, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use crate::config::read_json;

/// One chat message.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// `bos_token` may be a string or an AddedToken object `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        None => String::new(),
    }
}

/// Python's `json.dumps(x, ensure_ascii=False)` formatting, as transformers' `tojson` uses.
fn py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let nl = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, level + 1);
                py_json(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                py_json(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push('}');
        }
        J::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&f.to_string());
            }
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

fn tojson(v: Value, indent: Option<usize>) -> Result<Value, Error> {
    let j = serde_json::to_value(&v).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut s = String::new();
    py_json(&j, indent, 0, &mut s);
    Ok(Value::from_safe_string(s))
}

impl ChatTemplate {
    /// The template of `tokenizer_config.json`, if it has one.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        if !path.exists() {
            return Ok(None);
        }
        let cfg = read_json(path)?;
        let source = match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            // a list of named templates: use "default"
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .ok_or_else(|| anyhow!("{}: `chat_template` list has no \"default\" entry", path.display()))?
                .to_string(),
            Some(_) => return Err(anyhow!("{}: `chat_template` must be a string", path.display())),
        };
        let t = Self::new(&source, &token_string(cfg.get("bos_token")), &token_string(cfg.get("eos_token")))
            .map_err(|e| anyhow!("{}: chat_template: {e:#}", path.display()))?;
        Ok(Some(t))
    }

    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("{e:#}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> Result<Value, Error> {
            Ok(Value::from(strftime_today(&fmt)))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| anyhow!("{e:#}"))?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// Render a conversation, ending with the assistant's turn opening
    /// (`add_generation_prompt`). `enable_thinking: None` leaves the variable
    /// undefined, as transformers does when it is not passed.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| anyhow!("{e:#}"))?;
        let mut ctx = std::collections::BTreeMap::new();
        ctx.insert("messages", Value::from(minijinja::value::Serde(messages)));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("bos_token", Value::from(self.bos_token.clone()));
        ctx.insert("eos_token", Value::from(self.eos_token.clone()));
        if let Some(t) = enable_thinking {
            ctx.insert("enable_thinking", Value::from(t));
        }
        tmpl.render(ctx).map_err(|e| anyhow!("chat template: {e:#}"))
    }
}

/// Today's date for templates that call `strftime_now` (UTC; `%d %b %Y`-style
/// formats are what chat templates use).
fn strftime_today(fmt: &str) -> String {
    let now = fusebox_core::clock::Utc::now();
    let (y, m, d) = (now.year, now.month, now.day);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%d", &format!("{d:02}"))
        .replace("%b", &month[..3])
        .replace("%B", month)
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
}
