//! Counting unique chunks. Memory grows with the number of unique chunks, not corpus size.
//!
//! Almost all chunks are short, so a chunk of up to 15 bytes is packed into a u128 (its bytes,
//! then its length in the top byte): hashing and comparing that is a few instructions, where a
//! string key costs a hash over the bytes plus a memcmp call per probe. Longer chunks are kept
//! as byte strings.

use crate::pretok::Splitter;
use ahash::AHashMap;
use rayon::prelude::*;

const SHORT: usize = 15;

#[inline(always)]
fn pack_short(chunk: &[u8]) -> u128 {
    // little-endian loads that may overlap, instead of copying into a buffer and reloading it
    // (that store-then-load of a different width stalls the CPU)
    let len = chunk.len();
    let load8 = |at: usize| u64::from_le_bytes(chunk[at..at + 8].try_into().unwrap());
    let load4 = |at: usize| u32::from_le_bytes(chunk[at..at + 4].try_into().unwrap()) as u64;
    let (lo, hi) = if len >= 8 {
        // bytes 8..len are the top len-8 bytes of the last 8
        (load8(0), if len > 8 { load8(len - 8) >> (8 * (16 - len)) } else { 0 })
    } else if len >= 4 {
        (load4(0) | (load4(len - 4) >> (8 * (8 - len))) << 32, 0)
    } else {
        let mut lo = 0u64;
        for (i, &b) in chunk.iter().enumerate() {
            lo |= (b as u64) << (8 * i);
        }
        (lo, 0)
    };
    (lo as u128) | ((hi as u128) << 64) | ((len as u128) << 120)
}

fn unpack_short(key: u128) -> Vec<u8> {
    let bytes = key.to_le_bytes();
    bytes[..bytes[15] as usize].to_vec()
}

#[derive(Default)]
pub struct ChunkCounts {
    short: AHashMap<u128, i64>,
    long: AHashMap<Box<[u8]>, i64>,
}

impl ChunkCounts {
    #[inline]
    pub fn add(&mut self, chunk: &[u8], n: i64) {
        if chunk.len() <= SHORT {
            *self.short.entry(pack_short(chunk)).or_insert(0) += n;
        } else if let Some(total) = self.long.get_mut(chunk) {
            *total += n;
        } else {
            self.long.insert(chunk.into(), n);
        }
    }

    pub fn absorb(&mut self, other: ChunkCounts) {
        self.short.reserve(other.short.len());
        for (key, n) in other.short {
            *self.short.entry(key).or_insert(0) += n;
        }
        for (chunk, n) in other.long {
            *self.long.entry(chunk).or_insert(0) += n;
        }
    }

    pub fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All (chunk, count), sorted by chunk bytes, so what follows never depends on hashing.
    pub fn into_sorted(self) -> Vec<(Vec<u8>, i64)> {
        let mut chunks: Vec<(Vec<u8>, i64)> = Vec::with_capacity(self.len());
        chunks.extend(self.short.into_iter().map(|(key, n)| (unpack_short(key), n)));
        chunks.extend(self.long.into_iter().map(|(chunk, n)| (chunk.into_vec(), n)));
        chunks.sort_unstable();
        chunks
    }

    /// Split one buffer of texts in parallel (a few rayon tasks per thread, each counting
    /// into its own map) and add the counts to `self`.
    pub fn count_buffer(&mut self, splitter: &Splitter, texts: &[String]) -> Result<(), String> {
        let tasks = rayon::current_num_threads() * 4;
        let per_task = texts.len().div_ceil(tasks).max(1);
        let partials: Vec<Result<ChunkCounts, String>> = texts
            .par_chunks(per_task)
            .map(|group| {
                let mut local = ChunkCounts::default();
                for text in group {
                    splitter.for_each_chunk(text, |chunk| local.add(chunk.as_bytes(), 1))?;
                }
                Ok(local)
            })
            .collect();
        for partial in partials {
            self.absorb(partial?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_short_keeps_every_byte() {
        let bytes: Vec<u8> = (1..=15).map(|i| i * 17).collect();
        for len in 0..=SHORT {
            let mut expected = [0u8; 16];
            expected[..len].copy_from_slice(&bytes[..len]);
            expected[15] = len as u8;
            assert_eq!(pack_short(&bytes[..len]), u128::from_le_bytes(expected), "len {len}");
            assert_eq!(unpack_short(pack_short(&bytes[..len])), &bytes[..len]);
        }
    }

    #[test]
    fn short_and_long_chunks_count_and_sort_by_bytes() {
        let mut counts = ChunkCounts::default();
        let chunks: [&[u8]; 6] = [b"a", b"a\0", b"", b"exactly15bytes!", b"sixteen bytes!!!", b"\xff\x00\xfe"];
        for (i, chunk) in chunks.iter().enumerate() {
            counts.add(chunk, i as i64 + 1);
            counts.add(chunk, 10);
        }
        let mut expected: Vec<(Vec<u8>, i64)> = chunks.iter().enumerate().map(|(i, c)| (c.to_vec(), i as i64 + 11)).collect();
        expected.sort();
        assert_eq!(counts.into_sorted(), expected);
    }
}
