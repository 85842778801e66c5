//! JSONL `{"prompt", "response"}` files -> chat-templated, padded, masked token batches in the
//! layout of the authors' code: the prompt (templated user turn + assistant header) left-padded
//! to `max_prompt` tokens, the response right-padded to `max_response` tokens, concatenated.
//! Positions are 0..T-1 for every row; padding is hidden from attention by the attention mask.

use crate::model::{ChatTokenizer, Message};
use anyhow::{bail, Context, Result};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub prompt: String,
    pub response: String,
}

/// Reads a JSONL file of `{"prompt": ..., "response": ...}` objects. `response` may be absent
/// when `need_response` is false (prompt-only sets). Errors name the file and line.
pub fn read_jsonl(path: &Path, need_response: bool) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{n}: malformed JSON", path.display()))?;
        let field = |k: &str| -> Result<Option<String>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => bail!(
                    "{}:{n}: field {k:?} must be a string, found {other}",
                    path.display()
                ),
            }
        };
        let Some(prompt) = field("prompt")?.filter(|s| !s.trim().is_empty()) else {
            bail!("{}:{n}: missing or empty \"prompt\"", path.display());
        };
        let response = match field("response")? {
            Some(r) if !r.trim().is_empty() => r,
            _ if need_response => bail!("{}:{n}: missing or empty \"response\"", path.display()),
            _ => String::new(),
        };
        out.push(Example { prompt, response });
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}

/// Which tokens an objective looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskMode {
    /// Response tokens only (default).
    ResponseAll,
    /// The last prompt token.
    RequestLast,
    /// Every prompt token.
    RequestAll,
    /// Every non-pad token.
    All,
}

impl std::str::FromStr for MaskMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.replace('-', "_").as_str() {
            "response_all" => Self::ResponseAll,
            "request_last" => Self::RequestLast,
            "request_all" => Self::RequestAll,
            "all" => Self::All,
            other => bail!("unknown mask {other:?} (response_all, request_last, request_all, all)"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub max_prompt: usize,
    pub max_response: usize,
}

/// `[batch, seq]` token ids with their masks (1.0 / 0.0), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<f32>,
    pub prompt_mask: Vec<f32>,
    pub response_mask: Vec<f32>,
    /// Position of each row's last prompt token.
    pub last_prompt_index: Vec<usize>,
}

impl TokenBatch {
    /// The token mask an objective uses, as f64 (`[batch, seq]`).
    pub fn mask(&self, mode: MaskMode) -> Vec<f64> {
        let mut m = vec![0.0; self.batch * self.seq];
        for b in 0..self.batch {
            for t in 0..self.seq {
                let i = b * self.seq + t;
                m[i] = match mode {
                    MaskMode::ResponseAll => self.response_mask[i],
                    MaskMode::RequestAll => self.prompt_mask[i],
                    MaskMode::All => self.attention_mask[i],
                    MaskMode::RequestLast => (t == self.last_prompt_index[b]) as u8 as f32,
                } as f64;
            }
        }
        m
    }
}

/// Tokenises examples: the prompt through the chat template (user turn + generation prompt),
/// the response as plain text followed by the template's end-of-turn token when it has one.
pub struct Encoder<'a> {
    pub tokenizer: &'a ChatTokenizer,
    pub layout: Layout,
    pub pad_id: u32,
    pub end_of_turn: Option<u32>,
    pub system: Option<String>,
}

impl<'a> Encoder<'a> {
    pub fn new(tokenizer: &'a ChatTokenizer, layout: Layout) -> Self {
        let end_of_turn = ["<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t));
        let pad_id = [
            "<|endoftext|>",
            "<pad>",
            "<|finetune_right_pad_id|>",
            "</s>",
        ]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .or(end_of_turn)
        .unwrap_or(0);
        Self {
            tokenizer,
            layout,
            pad_id,
            end_of_turn,
            system: None,
        }
    }

    /// Prompt ids (truncated from the left, so the generation prompt survives) and response ids
    /// (truncated on the right).
    pub fn encode(&self, ex: &Example) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &ex.prompt));
        let mut p = self.tokenizer.encode_chat(&msgs, true)?;
        if p.len() > self.layout.max_prompt {
            p.drain(..p.len() - self.layout.max_prompt);
        }
        let mut r = if ex.response.is_empty() {
            vec![]
        } else {
            self.tokenizer.encode(&ex.response, false)?
        };
        if let Some(e) = self.end_of_turn {
            if !ex.response.is_empty() {
                r.push(e);
            }
        }
        r.truncate(self.layout.max_response);
        Ok((p, r))
    }

    pub fn batch(&self, examples: &[Example]) -> Result<TokenBatch> {
        let (pl, rl) = (self.layout.max_prompt, self.layout.max_response);
        let seq = pl + rl;
        let n = examples.len();
        let mut tb = TokenBatch {
            batch: n,
            seq,
            input_ids: vec![self.pad_id; n * seq],
            attention_mask: vec![0.0; n * seq],
            prompt_mask: vec![0.0; n * seq],
            response_mask: vec![0.0; n * seq],
            last_prompt_index: vec![pl - 1; n],
        };
        for (b, ex) in examples.iter().enumerate() {
            let (p, r) = self.encode(ex)?;
            let row = b * seq;
            for (i, &id) in p.iter().enumerate() {
                let t = row + pl - p.len() + i;
                tb.input_ids[t] = id;
                tb.attention_mask[t] = 1.0;
                tb.prompt_mask[t] = 1.0;
            }
            for (i, &id) in r.iter().enumerate() {
                let t = row + pl + i;
                tb.input_ids[t] = id;
                tb.attention_mask[t] = 1.0;
                tb.response_mask[t] = 1.0;
            }
        }
        Ok(tb)
    }
}
