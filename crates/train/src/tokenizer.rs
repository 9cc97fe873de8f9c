//! Tokenizers we own: byte-level BPE (GPT-2 style, as SmolLM2 and Llama 3 use), built from a GGUF
//! file's `tokenizer.ggml.tokens`/`merges` or a `tokenizer.json`; and BERT WordPiece from a
//! `tokenizer.json`. Owning them keeps the dependency tree small and lets us ignore the
//! padding/truncation presets some `tokenizer.json` files carry (we pad and truncate ourselves).

use std::collections::HashMap;
use std::path::Path;

use crate::{Result, TrainError};

/// How text is split into words before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's pattern, with every digit its own word first (SmolLM2 / StarCoder).
    Gpt2Digits,
    /// GPT-2's pattern.
    Gpt2,
}

/// A byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct BpeTokenizer {
    vocab: HashMap<String, u32>,
    tokens: Vec<String>,
    ranks: HashMap<(String, String), usize>,
    /// Special tokens matched literally in text (`<|im_start|>`, ...), longest first.
    specials: Vec<(String, u32)>,
    pre: PreTokenizer,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
    /// Padding id (EOS when the model has none).
    pub pad: u32,
}

/// GPT-2's reversible byte → printable-char map.
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        map[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    map
}

impl BpeTokenizer {
    /// From a vocabulary (id order), merges (`"a b"`), special-token ids and a pre-tokenizer.
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        special_ids: &[u32],
        pre: PreTokenizer,
    ) -> Result<Self> {
        if tokens.is_empty() {
            return Err(TrainError::BadModel(
                "tokenizer has an empty vocabulary".into(),
            ));
        }
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| TrainError::BadModel(format!("malformed BPE merge `{m}`")))?;
            ranks.insert((a.to_string(), b.to_string()), i);
        }
        let mut specials: Vec<(String, u32)> = special_ids
            .iter()
            .filter_map(|&id| tokens.get(id as usize).map(|t| (t.clone(), id)))
            .filter(|(t, _)| !t.is_empty())
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let byte_to_char = byte_chars();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(BpeTokenizer {
            vocab,
            tokens,
            ranks,
            specials,
            pre,
            byte_to_char,
            char_to_byte,
            bos: None,
            eos: None,
            pad: 0,
        })
    }

    /// From the metadata of a llama.cpp GGUF file.
    pub fn from_gguf(
        md: &HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> Result<Self> {
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| TrainError::BadModel(format!("GGUF has no `{k}`")))
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)?
                .to_vec()?
                .iter()
                .map(|v| Ok(v.to_string()?.clone()))
                .collect::<Result<Vec<String>>>()
        };
        let model = get("tokenizer.ggml.model")?.to_string()?.clone();
        if model != "gpt2" {
            return Err(TrainError::BadModel(format!(
                "GGUF tokenizer `{model}` is not byte-level BPE (gpt2)"
            )));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        // Token type 3 is CONTROL in llama.cpp's vocabulary: those are the special tokens.
        let specials: Vec<u32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .enumerate()
                .filter(|(_, t)| t.to_i32().ok() == Some(3) || t.to_u32().ok() == Some(3))
                .map(|(i, _)| i as u32)
                .collect(),
            None => Vec::new(),
        };
        let pre = match md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("smollm") | Some("starcoder") | Some("refact") => PreTokenizer::Gpt2Digits,
            _ => PreTokenizer::Gpt2,
        };
        let mut t = BpeTokenizer::new(tokens, &merges, &specials, pre)?;
        t.bos = md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok());
        t.eos = md
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok());
        t.pad = md
            .get("tokenizer.ggml.padding_token_id")
            .and_then(|v| v.to_u32().ok())
            .or(t.eos)
            .unwrap_or(0);
        Ok(t)
    }

    /// From a Hugging Face `tokenizer.json` whose model is BPE.
    pub fn from_tokenizer_json(v: &serde_json::Value) -> Result<Self> {
        let model = &v["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(TrainError::BadModel(
                "tokenizer.json model is not BPE".into(),
            ));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| TrainError::BadModel("tokenizer.json: no vocab".into()))?;
        let mut added: Vec<(String, u32)> = v["added_tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| {
                        Some((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let size = vocab
            .values()
            .filter_map(|x| x.as_u64())
            .chain(added.iter().map(|a| u64::from(a.1)))
            .max()
            .unwrap_or(0) as usize
            + 1;
        let mut tokens = vec![String::new(); size];
        for (k, id) in vocab {
            if let Some(id) = id.as_u64() {
                tokens[id as usize] = k.clone();
            }
        }
        for (t, id) in &added {
            tokens[*id as usize] = t.clone();
        }
        let merges: Vec<String> = model["merges"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| match m {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Array(p) => {
                            Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let pre = if v["pre_tokenizer"]
            .to_string()
            .contains("\"individual_digits\":true")
        {
            PreTokenizer::Gpt2Digits
        } else {
            PreTokenizer::Gpt2
        };
        added.sort_by_key(|a| a.1);
        let ids: Vec<u32> = added.iter().map(|a| a.1).collect();
        BpeTokenizer::new(tokens, &merges, &ids, pre)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Id of a token string (special tokens included).
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.vocab.get(s).copied()
    }

    /// Encodes text; special tokens written literally (`<|im_end|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // Next special token, if any.
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|p| (p, s.len(), *id)))
                .min_by_key(|(p, len, _)| (*p, usize::MAX - len));
            let (plain, special) = match next {
                Some((p, len, id)) => (&rest[..p], Some((len, id, p))),
                None => (rest, None),
            };
            self.encode_plain(plain, &mut out);
            match special {
                Some((len, id, p)) => {
                    out.push(id);
                    rest = &rest[p + len..];
                }
                None => break,
            }
        }
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for word in pre_tokenize(text, self.pre) {
            let mapped: Vec<String> = word
                .bytes()
                .map(|b| self.byte_to_char[b as usize].to_string())
                .collect();
            for piece in self.bpe(mapped) {
                match self.vocab.get(&piece) {
                    Some(id) => out.push(*id),
                    None => {
                        // Unknown merge result: fall back to single byte tokens.
                        out.extend(
                            piece
                                .chars()
                                .filter_map(|c| self.vocab.get(&c.to_string()).copied()),
                        )
                    }
                }
            }
        }
    }

    fn bpe(&self, mut parts: Vec<String>) -> Vec<String> {
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { return parts };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts[i] = merged;
            parts.remove(i + 1);
        }
    }

    /// Decodes ids to text (invalid UTF-8 replaced); special tokens are kept as written.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(tok) = self.tokens.get(id as usize) else {
                continue;
            };
            if self.specials.iter().any(|(_, s)| *s == id) {
                bytes.extend_from_slice(tok.as_bytes());
                continue;
            }
            for c in tok.chars() {
                match self.char_to_byte.get(&c) {
                    Some(b) => bytes.push(*b),
                    None => bytes.extend_from_slice(c.to_string().as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Splits text the way GPT-2's regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` does, written as a
/// scanner (no regex engine needed).
pub fn pre_tokenize(text: &str, pre: PreTokenizer) -> Vec<&str> {
    let mut out = Vec::new();
    if pre == PreTokenizer::Gpt2Digits {
        // Digits(individual_digits) runs first: every digit is its own segment.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                if start < i {
                    gpt2_split(&text[start..i], &mut out);
                }
                out.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < text.len() {
            gpt2_split(&text[start..], &mut out);
        }
    } else {
        gpt2_split(text, &mut out);
    }
    out
}

#[derive(PartialEq, Clone, Copy)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

fn gpt2_split<'a>(s: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { chars[i].0 } else { s.len() };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions.
        if c == '\'' && i + 1 < n {
            let rest = &s[at(i + 1)..];
            let len = ["re", "ve", "ll", "s", "t", "m", "d"]
                .iter()
                .find(|p| rest.starts_with(*p))
                .map(|p| p.len());
            if let Some(l) = len {
                out.push(&s[at(i)..at(i + 1 + l)]);
                i += 1 + l;
                continue;
            }
        }
        // Optional leading space, then a run of one class.
        let j = if c == ' ' && i + 1 < n && class(chars[i + 1].1) != Class::Space {
            i + 1
        } else {
            i
        };
        let k = class(chars[j].1);
        if k != Class::Space {
            let mut e = j + 1;
            while e < n && class(chars[e].1) == k {
                e += 1;
            }
            out.push(&s[at(i)..at(e)]);
            i = e;
            continue;
        }
        // Whitespace: `\s+(?!\S)` leaves the last space for the next word.
        let mut e = i;
        while e < n && class(chars[e].1) == Class::Space {
            e += 1;
        }
        let end = if e < n && e - i > 1 { e - 1 } else { e };
        out.push(&s[at(i)..at(end)]);
        i = end;
    }
}

/// BERT's WordPiece tokenizer (lower-casing, punctuation splitting, `##` continuations).
#[derive(Debug, Clone)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    lowercase: bool,
    /// `[CLS]`.
    pub cls: u32,
    /// `[SEP]`.
    pub sep: u32,
    /// `[PAD]`.
    pub pad: u32,
    unk: u32,
}

impl WordPiece {
    /// From a `tokenizer.json` file. Its `padding`/`truncation` presets are ignored on purpose.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::io(format!("reading {}", path.display()), e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::json(format!("parsing {}", path.display()), e))?;
        WordPiece::from_json(&v)
    }

    /// From a parsed `tokenizer.json`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        if v["model"]["type"].as_str() != Some("WordPiece") {
            return Err(TrainError::BadModel(
                "tokenizer.json model is not WordPiece".into(),
            ));
        }
        let vocab: HashMap<String, u32> = v["model"]["vocab"]
            .as_object()
            .ok_or_else(|| TrainError::BadModel("tokenizer.json: no vocab".into()))?
            .iter()
            .filter_map(|(k, id)| Some((k.clone(), id.as_u64()? as u32)))
            .collect();
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| TrainError::BadModel(format!("vocab lacks {t}")))
        };
        Ok(WordPiece {
            lowercase: v["normalizer"]["lowercase"].as_bool().unwrap_or(true),
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            vocab,
        })
    }

    /// `[CLS] tokens [SEP]`, truncated to `max_len` ids in all.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut out = vec![self.cls];
        let budget = max_len.saturating_sub(1);
        'words: for word in bert_words(text, self.lowercase) {
            for id in self.word_pieces(&word) {
                if out.len() >= budget {
                    break 'words;
                }
                out.push(id);
            }
        }
        out.push(self.sep);
        out
    }

    fn word_pieces(&self, word: &str) -> Vec<u32> {
        if word.chars().count() > 100 {
            return vec![self.unk];
        }
        let mut out = Vec::new();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while end > start {
                if word.is_char_boundary(end) {
                    let piece = if start == 0 {
                        word[..end].to_string()
                    } else {
                        format!("##{}", &word[start..end])
                    };
                    if let Some(id) = self.vocab.get(&piece) {
                        found = Some((*id, end));
                        break;
                    }
                }
                end -= 1;
            }
            match found {
                Some((id, e)) => {
                    out.push(id);
                    start = e;
                }
                None => return vec![self.unk],
            }
        }
        out
    }
}

/// BERT's basic tokenization: clean control characters, lowercase, split on whitespace and
/// punctuation, isolate CJK ideographs, strip Latin accents.
fn bert_words(text: &str, lowercase: bool) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, words: &mut Vec<String>| {
        if !cur.is_empty() {
            words.push(std::mem::take(cur));
        }
    };
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || (c.is_control() && !c.is_whitespace()) {
            continue;
        }
        if c.is_whitespace() {
            flush(&mut cur, &mut words);
        } else if c.is_ascii_punctuation() || is_cjk(c) || (!c.is_alphanumeric() && !c.is_ascii()) {
            flush(&mut cur, &mut words);
            words.push(c.to_string());
        } else if lowercase {
            // BERT's uncased normalizer lowercases, then strips accents (NFD minus marks).
            for l in c.to_lowercase() {
                if let Some(base) = strip_accent(l) {
                    cur.push(base);
                }
            }
        } else {
            cur.push(c);
        }
    }
    flush(&mut cur, &mut words);
    words
}

/// The base letter of an accented Latin letter (Latin-1 Supplement and Latin Extended-A, the
/// letters whose NFD form is a base letter plus combining marks); `None` for a combining mark;
/// the character itself otherwise. A table instead of full Unicode normalization: it covers the
/// European text our tasks hold without another dependency.
fn strip_accent(c: char) -> Option<char> {
    let base = match c as u32 {
        0x0300..=0x036F => return None,
        0xE0..=0xE5 | 0x0100..=0x0105 => 'a',
        0xE7 | 0x0106..=0x010D => 'c',
        0x010E..=0x010F => 'd',
        0xE8..=0xEB | 0x0112..=0x011B => 'e',
        0x011C..=0x0123 => 'g',
        0x0124..=0x0125 => 'h',
        0xEC..=0xEF | 0x0128..=0x0130 => 'i',
        0x0134..=0x0135 => 'j',
        0x0136..=0x0137 => 'k',
        0x0139..=0x013E => 'l',
        0xF1 | 0x0143..=0x0148 => 'n',
        0xF2..=0xF6 | 0x014C..=0x0151 => 'o',
        0x0154..=0x0159 => 'r',
        0x015A..=0x0161 => 's',
        0x0162..=0x0165 => 't',
        0xF9..=0xFC | 0x0168..=0x0173 => 'u',
        0x0174..=0x0175 => 'w',
        0xFD | 0xFF | 0x0176..=0x0178 => 'y',
        0x0179..=0x017E => 'z',
        _ => c,
    };
    Some(base)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0xF900..=0xFAFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_pretokenizer_matches_regex_semantics() {
        let s = "Hello world's  end\n\nx 12 ab!!";
        assert_eq!(
            pre_tokenize(s, PreTokenizer::Gpt2),
            vec!["Hello", " world", "'s", " ", " end", "\n", "\n", "x", " 12", " ab", "!!"]
        );
        assert_eq!(
            pre_tokenize("a 12", PreTokenizer::Gpt2Digits),
            vec!["a", " ", "1", "2"]
        );
    }

    #[test]
    fn bpe_round_trips_and_merges() {
        let bc = byte_chars();
        let mut tokens: Vec<String> = bc.iter().map(|c| c.to_string()).collect();
        tokens.push("he".into());
        tokens.push("hel".into());
        tokens.push("<|end|>".into());
        let merges = vec!["h e".to_string(), "he l".to_string()];
        let t = BpeTokenizer::new(tokens, &merges, &[258], PreTokenizer::Gpt2).expect("tok");
        let ids = t.encode("help<|end|> é");
        assert_eq!(ids[0], 257);
        assert!(ids.contains(&258));
        assert_eq!(t.decode(&ids), "help<|end|> é");
    }

    #[test]
    fn bpe_from_tokenizer_json_reads_vocab_merges_and_added_tokens() {
        let bc = byte_chars();
        let mut vocab = serde_json::Map::new();
        for (i, c) in bc.iter().enumerate() {
            vocab.insert(c.to_string(), serde_json::Value::from(i));
        }
        vocab.insert("ab".into(), serde_json::Value::from(256));
        let v = serde_json::json!({
            "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]},
            "added_tokens": [{"id": 257, "content": "<|eot|>"}],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}]}
        });
        let t = BpeTokenizer::from_tokenizer_json(&v).expect("tok");
        assert_eq!(t.vocab_size(), 258);
        assert_eq!(t.encode("ab<|eot|>"), vec![256, 257]);
        assert_eq!(t.encode("12"), vec![u32::from(b'1'), u32::from(b'2')]);
        assert!(BpeTokenizer::from_tokenizer_json(
            &serde_json::json!({"model": {"type": "Unigram"}})
        )
        .is_err());
    }

    #[test]
    fn wordpiece_splits_words() {
        let v = serde_json::json!({
            "normalizer": {"lowercase": true},
            "model": {"type": "WordPiece", "vocab": {"[PAD]":0,"[UNK]":1,"[CLS]":2,"[SEP]":3,"un":4,"##aff":5,"##able":6,"!":7}}
        });
        let t = WordPiece::from_json(&v).expect("wp");
        assert_eq!(t.encode("Unaffable! zz", 16), vec![2, 4, 5, 6, 7, 1, 3]);
        assert_eq!(t.encode("Unaffable! zz", 4), vec![2, 4, 5, 3]);
        // Accents are stripped after lower-casing, as BERT's uncased normalizer does.
        assert_eq!(t.encode("ÚNÄFFÂBLE", 16), vec![2, 4, 5, 6, 3]);
    }
}
