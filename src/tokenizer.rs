//! The ChatGLM2 tokenizer, built in Rust from the SentencePiece `tokenizer.model`
//! (no C++ sentencepiece): a `tokenizers` BPE whose vocabulary is the pieces and
//! whose merges are every pair of pieces that concatenates to a piece, ranked by
//! that piece's score (transformers' `SentencePieceExtractor`), plus ChatGLM's
//! special tokens. Decoding drops special ids as the official tokenizer does, and
//! [`TextStream`] turns a growing id list into UTF-8-safe text deltas.

use crate::error::{Error, Result};
use prost::Message;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::processors::template::TemplateProcessing;

/// ChatGLM2's special tokens, numbered after the SentencePiece pieces.
pub const CHATGLM2_SPECIAL: [&str; 5] = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"];
/// ChatGLM3's role tokens, numbered after [`CHATGLM2_SPECIAL`].
pub const CHATGLM3_ROLES: [&str; 4] =
    ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"];

/// The subset of sentencepiece's `ModelProto` that the tokenizer needs.
mod spm {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<SentencePiece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
        #[prost(message, optional, tag = "3")]
        pub normalizer_spec: Option<NormalizerSpec>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SentencePiece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        /// 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
        #[prost(int32, optional, tag = "3")]
        pub r#type: Option<i32>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TrainerSpec {
        /// 1 unigram, 2 bpe, 3 word, 4 char
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(bool, optional, tag = "35")]
        pub byte_fallback: Option<bool>,
        #[prost(int32, optional, tag = "40")]
        pub unk_id: Option<i32>,
        #[prost(string, optional, tag = "45")]
        pub unk_piece: Option<String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NormalizerSpec {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(bool, optional, tag = "3")]
        pub add_dummy_prefix: Option<bool>,
        #[prost(bool, optional, tag = "4")]
        pub remove_extra_whitespaces: Option<bool>,
    }
}

/// The ChatGLM2/ChatGLM3 tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Number of SentencePiece pieces; ids from here on are special tokens.
    n_pieces: u32,
    /// Ids that decode to nothing (as the official `convert_id_to_token`):
    /// unk/pad, bos, eos and all special tokens.
    special_ids: Vec<u32>,
    specials: HashMap<String, u32>,
    vocab_size: u32,
    /// The byte of each byte-fallback piece (`<0xAB>`), by id.
    byte_pieces: HashMap<u32, u8>,
    /// Strip the dummy-prefix space when decoding.
    strip_leading_space: bool,
    /// The SentencePiece model it was built from (written into GGUF files).
    spm: std::sync::Arc<Vec<u8>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_pieces", &self.n_pieces)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Build from a SentencePiece `tokenizer.model`. `chatglm3` adds the four role tokens.
    pub fn from_spm_file(path: &Path, chatglm3: bool) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_spm_bytes(&bytes, chatglm3)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    pub fn from_spm_bytes(bytes: &[u8], chatglm3: bool) -> Result<Self> {
        let proto = spm::ModelProto::decode(bytes)
            .map_err(|e| tok_err(format!("not a SentencePiece model ({e})")))?;
        let trainer = proto.trainer_spec.clone().unwrap_or_default();
        if trainer.model_type.unwrap_or(1) != 2 {
            return Err(tok_err(format!(
                "SentencePiece model type {} is not BPE (ChatGLM2 uses BPE)",
                trainer.model_type.unwrap_or(1)
            )));
        }
        if proto.pieces.is_empty() {
            return Err(tok_err("SentencePiece model has no pieces"));
        }
        let norm = proto.normalizer_spec.clone().unwrap_or_default();
        let add_dummy_prefix = norm.add_dummy_prefix.unwrap_or(true);
        if norm.remove_extra_whitespaces.unwrap_or(true) {
            return Err(tok_err(
                "SentencePiece models that collapse whitespace are not supported",
            ));
        }

        let pieces: Vec<(String, f32)> = proto
            .pieces
            .iter()
            .map(|p| (p.piece.clone().unwrap_or_default(), p.score.unwrap_or(0.0)))
            .collect();
        let n_pieces = pieces.len() as u32;
        let mut vocab: ahash::AHashMap<String, u32> = pieces
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (p.clone(), i as u32))
            .collect();

        // Merges as transformers' SentencePieceExtractor: for each piece (in id order), every split
        // whose halves are pieces, ordered by (id left, id right); then stably by score, descending.
        let mut merges: Vec<(u32, u32, f32)> = vec![];
        for (merged, score) in &pieces {
            let mut local: Vec<(u32, u32, f32)> = vec![];
            for (cut, _) in merged.char_indices().skip(1) {
                let (l, r) = merged.split_at(cut);
                if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                    local.push((il, ir, *score));
                }
            }
            local.sort_by_key(|&(l, r, _)| (l, r));
            merges.extend(local);
        }
        merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .map(|(l, r, _)| (pieces[l as usize].0.clone(), pieces[r as usize].0.clone()))
            .collect();

        // Special tokens live in the model vocabulary (not as added tokens), so text that merely
        // spells "[gMASK]" or "sop" is tokenized as ordinary text, as the official tokenizer does.
        let mut specials = HashMap::new();
        let names: Vec<&str> = if chatglm3 {
            CHATGLM2_SPECIAL
                .iter()
                .chain(CHATGLM3_ROLES.iter())
                .copied()
                .collect()
        } else {
            CHATGLM2_SPECIAL.to_vec()
        };
        for (i, name) in names.iter().enumerate() {
            let id = n_pieces + i as u32;
            vocab.insert(name.to_string(), id);
            specials.insert(name.to_string(), id);
        }
        let vocab_size = n_pieces + names.len() as u32;

        let unk_piece = trainer
            .unk_piece
            .clone()
            .unwrap_or_else(|| "<unk>".to_string());
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk_piece)
            .fuse_unk(true)
            .byte_fallback(trainer.byte_fallback.unwrap_or(false))
            .build()
            .map_err(tok_err)?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        let mut norms: Vec<NormalizerWrapper> = vec![];
        if add_dummy_prefix {
            norms.push(Prepend::new("▁".to_string()).into());
        }
        norms.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
        inner.with_normalizer(Some(NormalizerSequence::new(norms)));
        let mut decs: Vec<DecoderWrapper> = vec![
            tokenizers::decoders::DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err)?),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_dummy_prefix {
            decs.push(Strip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(DecoderSequence::new(decs)));
        let gmask = specials["[gMASK]"];
        let sop = specials["sop"];
        let template = TemplateProcessing::builder()
            .try_single("[gMASK] sop $A")
            .map_err(tok_err)?
            .try_pair("[gMASK] sop $A $B:1 </s>:1")
            .map_err(tok_err)?
            .special_tokens(vec![("[gMASK]", gmask), ("sop", sop), ("</s>", 2)])
            .build()
            .map_err(tok_err)?;
        inner.with_post_processor(Some(template));

        let mut special_ids: Vec<u32> = specials.values().copied().collect();
        let unk_id = trainer.unk_id.unwrap_or(0).max(0) as u32;
        for (i, p) in proto.pieces.iter().enumerate() {
            // sentencepiece types: 2 unknown, 3 control (<s>, </s>)
            if matches!(p.r#type, Some(2) | Some(3)) || i as u32 == unk_id {
                special_ids.push(i as u32);
            }
        }
        special_ids.sort_unstable();
        special_ids.dedup();
        let byte_pieces = proto
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.r#type == Some(6))
            .filter_map(|(i, p)| {
                let hex = p.piece.as_deref()?.strip_prefix("<0x")?.strip_suffix('>')?;
                Some((i as u32, u8::from_str_radix(hex, 16).ok()?))
            })
            .collect();
        Ok(Self {
            inner,
            n_pieces,
            special_ids,
            specials,
            vocab_size,
            byte_pieces,
            strip_leading_space: add_dummy_prefix,
            spm: std::sync::Arc::new(bytes.to_vec()),
        })
    }

    /// The SentencePiece pieces (text, score, type: 1 normal, 2 unknown, 3 control, 4 user
    /// defined, 5 unused, 6 byte), whether byte fallback is on and whether a space is put in
    /// front of the text (`add_dummy_prefix`): what a GGUF file's tokenizer fields carry.
    pub(crate) fn spm_pieces(&self) -> Result<(Vec<(String, f32, i32)>, bool, bool)> {
        let proto = spm::ModelProto::decode(&self.spm[..])
            .map_err(|e| tok_err(format!("not a SentencePiece model ({e})")))?;
        let pieces = proto
            .pieces
            .iter()
            .map(|p| {
                let text = p.piece.clone().unwrap_or_default();
                (text, p.score.unwrap_or(0.0), p.r#type.unwrap_or(1))
            })
            .collect();
        let trainer = proto.trainer_spec.unwrap_or_default();
        let norm = proto.normalizer_spec.unwrap_or_default();
        Ok((
            pieces,
            trainer.byte_fallback.unwrap_or(false),
            norm.add_dummy_prefix.unwrap_or(true),
        ))
    }

    /// A SentencePiece BPE model (the bytes [`Tokenizer::from_spm_bytes`] reads) made of these
    /// pieces: the inverse of [`Tokenizer::spm_pieces`] for a tokenizer kept as a piece list.
    pub(crate) fn spm_from_pieces(
        pieces: &[(String, f32, i32)],
        byte_fallback: bool,
        add_dummy_prefix: bool,
    ) -> Vec<u8> {
        let unk = pieces.iter().position(|p| p.2 == 2).unwrap_or(0);
        spm::ModelProto {
            pieces: pieces
                .iter()
                .map(|(t, s, ty)| spm::SentencePiece {
                    piece: Some(t.clone()),
                    score: Some(*s),
                    r#type: Some(*ty),
                })
                .collect(),
            trainer_spec: Some(spm::TrainerSpec {
                model_type: Some(2),
                byte_fallback: Some(byte_fallback),
                unk_id: Some(unk as i32),
                unk_piece: Some(pieces.get(unk).map_or("<unk>".into(), |p| p.0.clone())),
            }),
            normalizer_spec: Some(spm::NormalizerSpec {
                name: Some("identity".into()),
                add_dummy_prefix: Some(add_dummy_prefix),
                remove_extra_whitespaces: Some(false),
            }),
        }
        .encode_to_vec()
    }

    /// The bytes of the SentencePiece model this tokenizer was built from.
    pub fn spm_bytes(&self) -> &[u8] {
        &self.spm
    }

    /// Number of ids the tokenizer knows (pieces plus special tokens).
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// The id of a special token such as `"[gMASK]"`, `"sop"` or `"<|user|>"`.
    pub fn special_id(&self, name: &str) -> Option<u32> {
        self.specials.get(name).copied()
    }

    /// Whether this tokenizer has ChatGLM3's role tokens.
    pub fn has_roles(&self) -> bool {
        self.specials.contains_key("<|user|>")
    }

    /// Encode text; with `add_special_tokens`, `[gMASK] sop` come first (as `tokenizer(text)`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    fn is_skipped(&self, id: u32) -> bool {
        id >= self.vocab_size || self.special_ids.binary_search(&id).is_ok()
    }

    /// Decode ids to text. Special ids and ids outside the tokenizer (the model's padded
    /// vocabulary is larger) decode to nothing, as in the official tokenizer.
    ///
    /// Runs of byte-fallback pieces decode as SentencePiece does: each complete UTF-8 character
    /// is kept and each byte that is not part of one becomes U+FFFD. (The `tokenizers`
    /// ByteFallback decoder turns a whole run into U+FFFDs when any byte is invalid, which also
    /// makes a decoded character vanish when a stray byte follows it.)
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        fn flush(bytes: &mut Vec<u8>, out: &mut String) {
            for chunk in bytes.utf8_chunks() {
                out.push_str(chunk.valid());
                for _ in chunk.invalid() {
                    out.push('\u{FFFD}');
                }
            }
            bytes.clear();
        }
        let mut out = String::new();
        let mut bytes = vec![];
        for &id in ids {
            if self.is_skipped(id) {
                continue;
            }
            if let Some(&b) = self.byte_pieces.get(&id) {
                bytes.push(b);
                continue;
            }
            flush(&mut bytes, &mut out);
            if let Some(piece) = self.inner.id_to_token(id) {
                out.push_str(&piece.replace('\u{2581}', " "));
            }
        }
        flush(&mut bytes, &mut out);
        if self.strip_leading_space && out.starts_with(' ') {
            out.remove(0);
        }
        Ok(out)
    }

    /// The bytes one id stands for in decoded text (a piece's text with `▁` as a space, a
    /// byte-fallback piece's byte; nothing for special ids), as OpenAI's `logprobs.bytes`.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if self.is_skipped(id) {
            return vec![];
        }
        if let Some(&b) = self.byte_pieces.get(&id) {
            return vec![b];
        }
        self.inner
            .id_to_token(id)
            .map(|p| p.replace('\u{2581}', " ").into_bytes())
            .unwrap_or_default()
    }

    /// The piece of one id (`None` for ids outside the vocabulary).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The `tokenizers` tokenizer behind this one.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Write a Hugging Face `tokenizer.json` that `tokenizers.Tokenizer.from_file` loads and that
    /// encodes identically (special tokens are plain vocabulary entries there, so decoding
    /// with that file shows them as text).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.inner.to_string(true).map_err(tok_err)?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

/// Incremental, UTF-8-safe detokenization of a growing id sequence.
///
/// Each [`TextStream::push`] returns the text that the new id completes; text that ends in an
/// unfinished multi-byte character is held back until it completes. [`TextStream::finish`]
/// returns whatever is left, so the pieces always join to exactly `decode(all ids)`.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Decoding restarts from `prefix_offset` (a window, so each step is O(window)).
    prefix_offset: usize,
    /// Ids before this have had their text emitted.
    read_offset: usize,
    /// Text emitted so far.
    emitted: String,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// Add one id; returns the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || !full.starts_with(&prefix) || full.ends_with('\u{FFFD}') {
            // Nothing new, or an unfinished character: wait for more ids.
            return Ok(String::new());
        }
        let delta = full[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.emitted.push_str(&delta);
        Ok(delta)
    }

    /// The text not yet emitted, such that all pieces join to exactly `decode(ids)`.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let full = tok.decode(&self.ids)?;
        let rest = match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            // Cannot happen with a prefix-stable decoder; never lose text if it does.
            None => return Err(tok_err("streamed text diverged from the full decode")),
        };
        self.emitted.push_str(&rest);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(rest)
    }
}
