//! rustbpe: a fast byte-level BPE tokenizer trainer, exposed to Python with PyO3.
//!
//! Python API:
//!   tok = rustbpe.Tokenizer()
//!   tok.train_from_iterator(iterator_of_str, vocab_size, buffer_size=8192, pattern=None)
//!   tok.get_pattern() -> str
//!   tok.get_mergeable_ranks() -> list[tuple[bytes, int]]   # the 256 bytes, then merges in order
//!   tok.encode(text) -> list[int]                          # same ids as tiktoken with these ranks
//! `vocab_size` counts the 256 byte tokens plus the merges (special tokens are added in Python).

pub mod bpe;
pub mod counts;
pub mod pretok;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};
use std::time::Instant;

use bpe::{Encoder, Words};
use counts::ChunkCounts;
use pretok::{Splitter, DEFAULT_PATTERN};

#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Option<Splitter>,
    encoder: Option<Encoder>,
}

impl Tokenizer {
    fn trained(&self) -> PyResult<(&Splitter, &Encoder)> {
        match (&self.splitter, &self.encoder) {
            (Some(s), Some(e)) => Ok((s, e)),
            _ => Err(PyValueError::new_err("this Tokenizer is not trained yet: call train_from_iterator() first")),
        }
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer { pattern: DEFAULT_PATTERN.to_string(), splitter: None, encoder: None }
    }

    /// Train on the strings yielded by `iterator` until `vocab_size` tokens (256 bytes + merges)
    /// exist or nothing is left to merge. The iterator is pulled `buffer_size` strings at a time.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        if vocab_size > u32::MAX as i64 {
            return Err(PyValueError::new_err(format!("vocab_size {vocab_size} is too large")));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be at least 1, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern)
            .map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))?;
        let items = iterator
            .try_iter()
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "train_from_iterator expects an iterable of str, got {}",
                    type_name(iterator)
                ))
            })?
            .unbind();

        // 1) count unique chunks, one buffer at a time. While the thread pool splits and counts
        //    one buffer (without the GIL), this thread takes the GIL only to pull the next one.
        let start = Instant::now();
        let buffer_size = buffer_size as usize;
        let mut counts = ChunkCounts::default();
        let mut reader = Reader { buffer_size, n_items: 0, n_bytes: 0, exhausted: false };
        let mut buffer = Vec::new();
        reader.pull(items.bind(py), &mut buffer)?;
        let mut next_buffer = Vec::new();
        let mut next_log = 64 << 20;
        while !buffer.is_empty() {
            let mut counted = Ok(());
            let pulled = py.detach(|| {
                rayon::in_place_scope(|scope| {
                    scope.spawn(|_| counted = counts.count_buffer(&splitter, &buffer));
                    Python::attach(|py| reader.pull(items.bind(py), &mut next_buffer))
                })
            });
            counted.map_err(PyValueError::new_err)?;
            pulled?;
            std::mem::swap(&mut buffer, &mut next_buffer);
            if reader.n_bytes >= next_log {
                eprintln!(
                    "rustbpe: read {} texts, {:.1} MB, {} unique chunks ({:.1}s)",
                    reader.n_items,
                    reader.n_bytes as f64 / 1e6,
                    counts.len(),
                    start.elapsed().as_secs_f64()
                );
                next_log += 64 << 20;
            }
        }
        let (n_items, n_bytes) = (reader.n_items, reader.n_bytes);
        if counts.is_empty() {
            return Err(PyValueError::new_err(format!(
                "cannot train on an empty corpus: the iterator gave {n_items} texts and the split pattern found no chunks in them"
            )));
        }
        eprintln!(
            "rustbpe: counted {} unique chunks in {} texts ({:.1} MB) in {:.2}s",
            counts.len(),
            n_items,
            n_bytes as f64 / 1e6,
            start.elapsed().as_secs_f64()
        );

        // 2) learn the merges (sorting first makes the word order independent of hashing)
        let num_merges = (vocab_size - 256) as usize;
        let merges = py.detach(|| {
            let chunks = counts.into_sorted();
            let words = Words::from_chunks(chunks.iter().map(|(chunk, n)| (chunk.as_slice(), *n)))?;
            drop(chunks);
            let merge_start = Instant::now();
            let log_every = (num_merges / 10).max(1);
            let merges = bpe::learn_merges(words, num_merges, |done, total, _pair, count| {
                if done % log_every == 0 || done == total {
                    eprintln!(
                        "rustbpe: merge {done}/{total} (count {count}) {:.2}s",
                        merge_start.elapsed().as_secs_f64()
                    );
                }
            });
            if merges.len() < num_merges {
                eprintln!(
                    "rustbpe: stopped after {} merges: every chunk is already a single token (asked for {num_merges})",
                    merges.len()
                );
            }
            Ok::<_, String>(merges)
        })
        .map_err(PyValueError::new_err)?;
        let encoder = Encoder::new(&merges);
        self.pattern = pattern;
        self.splitter = Some(splitter);
        self.encoder = Some(encoder);
        Ok(())
    }

    /// The split pattern (the default one until trained with another).
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// `[(token_bytes, rank)]`: the 256 single bytes (rank = byte value), then each merge in order.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Vec<(Bound<'py, PyBytes>, u32)>> {
        let (_, encoder) = self.trained()?;
        Ok(encoder
            .token_bytes
            .iter()
            .enumerate()
            .map(|(rank, bytes)| (PyBytes::new(py, bytes), rank as u32))
            .collect())
    }

    /// Ordinary BPE encoding (no special tokens) with the learned merges.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let (splitter, encoder) = self.trained()?;
        py.detach(|| {
            let mut ids = Vec::with_capacity(text.len() / 3);
            splitter.for_each_chunk(text, |chunk| encoder.encode_chunk(chunk.as_bytes(), &mut ids))?;
            Ok::<_, String>(ids)
        })
        .map_err(PyValueError::new_err)
    }
}

/// Pulls strings from the Python iterator, a buffer at a time, checking each one.
struct Reader {
    buffer_size: usize,
    n_items: usize,
    n_bytes: usize,
    exhausted: bool,
}

impl Reader {
    /// Refill `buffer` with up to `buffer_size` copied strings (empty once the iterator is done).
    fn pull(&mut self, items: &Bound<'_, PyIterator>, buffer: &mut Vec<String>) -> PyResult<()> {
        buffer.clear();
        let mut items = items.clone();
        while !self.exhausted && buffer.len() < self.buffer_size {
            let Some(item) = items.next() else {
                self.exhausted = true;
                break;
            };
            let item = item?;
            let n = self.n_items;
            let text = item.downcast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!("train_from_iterator: item {n} is {}, expected str", type_name(&item)))
            })?;
            let text = text.to_str().map_err(|e| {
                PyValueError::new_err(format!("train_from_iterator: item {n} is not valid Unicode text: {e}"))
            })?;
            self.n_bytes += text.len();
            self.n_items += 1;
            buffer.push(text.to_owned());
        }
        Ok(())
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "<unknown type>".to_string())
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
