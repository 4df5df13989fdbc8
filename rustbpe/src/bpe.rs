//! Byte-level BPE: learning merges from counted chunks, and encoding with the learned ranks.
//!
//! Training keeps every unique pre-tokenized chunk once (a "word": a run of token ids and how
//! often the chunk occurred). Each step merges the most frequent adjacent pair everywhere it
//! occurs and updates the pair counts *incrementally*: only the words that contain the pair are
//! touched, and only the pairs around each merged position change. Ties are broken by the
//! lowest pair `(left_id, right_id)`, so the result depends only on the multiset of chunks.

use ahash::AHashMap;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A pair of adjacent token ids packed as `left << 32 | right`; its integer order is the
/// lexicographic order of `(left, right)`, which is the tie-break order.
pub type PairKey = u64;

#[inline]
pub fn pack(left: u32, right: u32) -> PairKey {
    ((left as u64) << 32) | right as u64
}

#[inline]
pub fn unpack(key: PairKey) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// All unique chunks as token-id sequences in one flat buffer (words only ever shrink, so each
/// keeps its slot; this avoids one heap allocation per unique chunk).
pub struct Words {
    symbols: Vec<u32>,
    starts: Vec<usize>,
    lens: Vec<u32>,
    counts: Vec<i64>,
}

impl Words {
    pub fn from_chunks<'a>(chunks: impl IntoIterator<Item = (&'a [u8], i64)>) -> Self {
        let mut words = Words { symbols: Vec::new(), starts: Vec::new(), lens: Vec::new(), counts: Vec::new() };
        for (bytes, count) in chunks {
            words.starts.push(words.symbols.len());
            words.lens.push(bytes.len() as u32);
            words.counts.push(count);
            words.symbols.extend(bytes.iter().map(|&b| b as u32));
        }
        words
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn word(&self, i: usize) -> &[u32] {
        &self.symbols[self.starts[i]..self.starts[i] + self.lens[i] as usize]
    }

    pub fn count(&self, i: usize) -> i64 {
        self.counts[i]
    }

    /// Replace every non-overlapping occurrence (left to right) of `(a, b)` in word `i` by
    /// `new_id`, reporting each pair-count change as `(pair, delta)` to `on_delta`.
    /// Pairs that include `new_id` are the only ones that can get a positive delta.
    #[inline]
    fn merge_pair(&mut self, i: usize, a: u32, b: u32, new_id: u32, mut on_delta: impl FnMut(PairKey, i64)) {
        let start = self.starts[i];
        let len = self.lens[i] as usize;
        let count = self.counts[i];
        let sym = &mut self.symbols[start..start + len];
        let (mut read, mut write) = (0usize, 0usize);
        while read < len {
            if read + 1 < len && sym[read] == a && sym[read + 1] == b {
                // the left neighbour is what we already wrote (it may itself be new_id)
                if write > 0 {
                    let left = sym[write - 1];
                    on_delta(pack(left, a), -count);
                    on_delta(pack(left, new_id), count);
                }
                if read + 2 < len {
                    let right = sym[read + 2];
                    on_delta(pack(b, right), -count);
                    on_delta(pack(new_id, right), count);
                }
                on_delta(pack(a, b), -count);
                sym[write] = new_id;
                read += 2;
            } else {
                sym[write] = sym[read];
                read += 1;
            }
            write += 1;
        }
        self.lens[i] = write as u32;
    }
}

/// A heap entry: a pair, its count when pushed, and every word that may contain it.
/// Counts of existing pairs only ever go down (a merge creates pairs only with the brand-new
/// id), so an entry's count is an upper bound; a stale entry is re-pushed with its true count
/// when it reaches the top ("lazy invalidation").
struct Candidate {
    count: i64,
    pair: PairKey,
    words: Vec<u32>,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // max-heap: highest count first, then the lowest pair
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}

/// The merge loop's state; `next_merge` performs one merge.
pub struct Merger {
    pub words: Words,
    pair_counts: AHashMap<PairKey, i64>,
    heap: BinaryHeap<Candidate>,
    next_id: u32,
    // scratch for one step, kept to reuse its allocation
    new_pair_words: AHashMap<PairKey, Vec<u32>>,
}

impl Merger {
    pub fn new(words: Words) -> Self {
        let mut pair_counts: AHashMap<PairKey, i64> = AHashMap::new();
        let mut pair_words: AHashMap<PairKey, Vec<u32>> = AHashMap::new();
        for i in 0..words.len() {
            let w = words.word(i);
            let c = words.count(i);
            for win in w.windows(2) {
                let key = pack(win[0], win[1]);
                *pair_counts.entry(key).or_insert(0) += c;
                let list = pair_words.entry(key).or_default();
                if list.last() != Some(&(i as u32)) {
                    list.push(i as u32);
                }
            }
        }
        let heap = pair_words
            .into_iter()
            .map(|(pair, words)| Candidate { count: pair_counts[&pair], pair, words })
            .collect();
        Merger { words, pair_counts, heap, next_id: 256, new_pair_words: AHashMap::new() }
    }

    /// Merge the most frequent pair (ties: lowest pair) and return it with its count,
    /// or None when no pair is left (every word is a single token).
    pub fn next_merge(&mut self) -> Option<((u32, u32), i64)> {
        loop {
            let mut top = self.heap.pop()?;
            let current = self.pair_counts.get(&top.pair).copied().unwrap_or(0);
            if current <= 0 {
                self.pair_counts.remove(&top.pair);
                continue;
            }
            if current != top.count {
                top.count = current;
                self.heap.push(top);
                continue;
            }
            let (a, b) = unpack(top.pair);
            let new_id = self.next_id;
            self.next_id += 1;
            let pair_counts = &mut self.pair_counts;
            let new_pair_words = &mut self.new_pair_words;
            for &wi in &top.words {
                self.words.merge_pair(wi as usize, a, b, new_id, |key, delta| {
                    *pair_counts.entry(key).or_insert(0) += delta;
                    if delta > 0 {
                        let list = new_pair_words.entry(key).or_default();
                        if list.last() != Some(&wi) {
                            list.push(wi);
                        }
                    }
                });
            }
            debug_assert_eq!(self.pair_counts.get(&top.pair).copied().unwrap_or(0), 0);
            self.pair_counts.remove(&top.pair);
            for (pair, words) in self.new_pair_words.drain() {
                let count = self.pair_counts.get(&pair).copied().unwrap_or(0);
                if count > 0 {
                    self.heap.push(Candidate { count, pair, words });
                } else {
                    self.pair_counts.remove(&pair);
                }
            }
            return Some(((a, b), top.count));
        }
    }

    /// Current non-zero pair counts (for tests: compare against a full recount).
    pub fn pair_counts(&self) -> AHashMap<PairKey, i64> {
        self.pair_counts.iter().filter(|(_, &c)| c != 0).map(|(&k, &c)| (k, c)).collect()
    }

    /// Count all pairs from scratch (for tests).
    pub fn recount(&self) -> AHashMap<PairKey, i64> {
        let mut counts = AHashMap::new();
        for i in 0..self.words.len() {
            for win in self.words.word(i).windows(2) {
                *counts.entry(pack(win[0], win[1])).or_insert(0) += self.words.count(i);
            }
        }
        counts
    }
}

/// Learn up to `num_merges` merges; `progress(done, total, pair, count)` is called after each.
pub fn learn_merges(words: Words, num_merges: usize, mut progress: impl FnMut(usize, usize, (u32, u32), i64)) -> Vec<(u32, u32)> {
    let mut merger = Merger::new(words);
    let mut merges = Vec::with_capacity(num_merges);
    while merges.len() < num_merges {
        match merger.next_merge() {
            Some((pair, count)) => {
                merges.push(pair);
                progress(merges.len(), num_merges, pair, count);
            }
            None => break,
        }
    }
    merges
}

/// Encoding with the learned merges, exactly as tiktoken does it with the same ranks: a chunk
/// that is itself a token maps to it directly; otherwise repeatedly join the adjacent parts whose
/// concatenated bytes have the lowest rank (leftmost on ties) until no join is a token.
pub struct Encoder {
    ranks: AHashMap<Vec<u8>, u32>,
    pub token_bytes: Vec<Vec<u8>>,
}

impl Encoder {
    pub fn new(merges: &[(u32, u32)]) -> Self {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in merges {
            let mut bytes = token_bytes[a as usize].clone();
            bytes.extend_from_slice(&token_bytes[b as usize]);
            token_bytes.push(bytes);
        }
        let ranks = token_bytes.iter().enumerate().map(|(id, bytes)| (bytes.clone(), id as u32)).collect();
        Encoder { ranks, token_bytes }
    }

    pub fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        if let Some(&id) = self.ranks.get(chunk) {
            out.push(id);
            return;
        }
        // boundaries[i] is where part i starts; the last entry is chunk.len()
        let mut boundaries: Vec<usize> = (0..=chunk.len()).collect();
        let rank_of = |bounds: &[usize], i: usize| -> u32 {
            // rank of parts i and i+1 joined, if that is a token
            if i + 2 < bounds.len() {
                self.ranks.get(&chunk[bounds[i]..bounds[i + 2]]).copied().unwrap_or(u32::MAX)
            } else {
                u32::MAX
            }
        };
        let mut join_ranks: Vec<u32> = (0..boundaries.len() - 1).map(|i| rank_of(&boundaries, i)).collect();
        loop {
            let mut best = (u32::MAX, 0usize);
            for (i, &r) in join_ranks.iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            if best.0 == u32::MAX {
                break;
            }
            let i = best.1;
            boundaries.remove(i + 1);
            join_ranks.remove(i + 1);
            join_ranks[i] = rank_of(&boundaries, i);
            if i > 0 {
                join_ranks[i - 1] = rank_of(&boundaries, i - 1);
            }
        }
        for win in boundaries.windows(2) {
            out.push(self.ranks[&chunk[win[0]..win[1]]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words_of(corpus: &[(&str, i64)]) -> Words {
        Words::from_chunks(corpus.iter().map(|(s, c)| (s.as_bytes(), *c)))
    }

    fn learn(corpus: &[(&str, i64)], n: usize) -> Vec<(u32, u32)> {
        learn_merges(words_of(corpus), n, |_, _, _, _| {})
    }

    /// The plain algorithm: recount every pair each step, take max count then lowest pair.
    fn naive_learn(corpus: &[(Vec<u8>, i64)], n: usize) -> Vec<(u32, u32)> {
        let mut words: Vec<(Vec<u32>, i64)> = corpus.iter().map(|(b, c)| (b.iter().map(|&x| x as u32).collect(), *c)).collect();
        let mut merges = vec![];
        for step in 0..n {
            let mut counts: std::collections::BTreeMap<(u32, u32), i64> = Default::default();
            for (w, c) in &words {
                for win in w.windows(2) {
                    *counts.entry((win[0], win[1])).or_insert(0) += c;
                }
            }
            let Some((&pair, _)) = counts.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0))) else { break };
            let new_id = 256 + step as u32;
            for (w, _) in words.iter_mut() {
                let mut out = vec![];
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == pair {
                        out.push(new_id);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
            merges.push(pair);
        }
        merges
    }

    const A: u32 = b'a' as u32;
    const B: u32 = b'b' as u32;
    const C: u32 = b'c' as u32;

    #[test]
    fn hand_checked_small_corpus() {
        // pairs: ab: 5+2=7, bc: 5, ca: 0 ... "abc"x5, "ab"x2, "bcbc"x1 -> bc: 5+2=7, cb: 1
        // step 1: ab (7) vs bc (7) tie -> lowest pair (a,b) wins
        // then words: [256,c]x5, [256]x2, [b,c,b,c]x1: (256,c)=5, bc=2, cb=1 -> (256,c)
        // then bc=2, cb=1 -> (b,c) -> [258,258]: (258,258)=1
        let merges = learn(&[("abc", 5), ("ab", 2), ("bcbc", 1)], 10);
        assert_eq!(merges, vec![(A, B), (256, C), (B, C), (258, 258)]);
    }

    #[test]
    fn overlapping_runs_count_correctly() {
        // "aaaa" has 3 (a,a) pairs but merging gives [z,z]; "aaa" gives [z,a]
        let merges = learn(&[("aaaa", 1), ("aaa", 1)], 10);
        // after (a,a): [z,z] and [z,a]; both pairs count 1 -> lowest pair (z, a) first
        assert_eq!(merges, vec![(A, A), (256, A), (256, 256)]);
        let mut m = Merger::new(words_of(&[("aaaa", 3), ("aaa", 2), ("abab", 1)]));
        while m.next_merge().is_some() {
            assert_eq!(m.pair_counts(), m.recount().into_iter().filter(|(_, c)| *c != 0).collect());
        }
    }

    #[test]
    fn tie_break_is_lowest_pair_regardless_of_input_order() {
        let corpus = [("xy", 3), ("ba", 3), ("ab", 3), ("yx", 3)];
        let mut reversed = corpus;
        reversed.reverse();
        let m1 = learn(&corpus, 4);
        assert_eq!(m1, learn(&reversed, 4));
        assert_eq!(m1, vec![(A, B), (B, A), (b'x' as u32, b'y' as u32), (b'y' as u32, b'x' as u32)]);
    }

    #[test]
    fn stops_when_nothing_left_to_merge() {
        assert_eq!(learn(&[("ab", 1), ("c", 5)], 100), vec![(A, B)]);
        assert!(learn(&[("a", 1)], 100).is_empty());
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_corpus(rng: &mut Rng, n_words: usize, alphabet: &[u8]) -> Vec<(Vec<u8>, i64)> {
        (0..n_words)
            .map(|_| {
                let len = 1 + rng.below(12) as usize;
                let w = (0..len).map(|_| alphabet[rng.below(alphabet.len() as u64) as usize]).collect();
                (w, 1 + rng.below(20) as i64)
            })
            .collect()
    }

    #[test]
    fn incremental_counts_equal_full_recount_after_every_merge() {
        let mut rng = Rng(0x9E3779B97F4A7C15);
        for round in 0..20 {
            let alphabet: &[u8] = if round % 2 == 0 { b"ab" } else { b"abcde \x00\xff" };
            let corpus = random_corpus(&mut rng, 200, alphabet);
            let mut m = Merger::new(Words::from_chunks(corpus.iter().map(|(w, c)| (w.as_slice(), *c))));
            let mut steps = 0;
            while m.next_merge().is_some() {
                let recount: AHashMap<_, _> = m.recount().into_iter().filter(|(_, c)| *c != 0).collect();
                assert_eq!(m.pair_counts(), recount, "round {round} step {steps}");
                steps += 1;
            }
            assert!(m.recount().is_empty(), "every word should end as one token");
        }
    }

    #[test]
    fn merges_equal_naive_trainer_on_random_data() {
        let mut rng = Rng(12345);
        for round in 0..10 {
            let alphabet: &[u8] = if round % 2 == 0 { b"abc" } else { b"abcdefgh  " };
            let corpus = random_corpus(&mut rng, 300, alphabet);
            let fast = learn_merges(Words::from_chunks(corpus.iter().map(|(w, c)| (w.as_slice(), *c))), 150, |_, _, _, _| {});
            assert_eq!(fast, naive_learn(&corpus, 150), "round {round}");
        }
    }

    #[test]
    fn encoder_roundtrips_and_uses_merges() {
        let merges = learn(&[("hello", 10), ("hell", 3), ("low", 4)], 20);
        let enc = Encoder::new(&merges);
        let mut ids = vec![];
        enc.encode_chunk(b"hello", &mut ids);
        assert_eq!(ids.len(), 1);
        for text in [&b"hellohello low"[..], b"xyz", b"", b"\xff\x00hel"] {
            let mut ids = vec![];
            enc.encode_chunk(text, &mut ids);
            let back: Vec<u8> = ids.iter().flat_map(|&i| enc.token_bytes[i as usize].clone()).collect();
            assert_eq!(back, text);
        }
    }
}
