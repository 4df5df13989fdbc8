//! Byte-level BPE: learning merges from counted chunks, and encoding with the learned ranks.
//!
//! Training keeps every unique pre-tokenized chunk once (a "word": a run of token ids and how
//! often the chunk occurred). Each step merges the most frequent adjacent pair everywhere it
//! occurs and updates the pair counts *incrementally*: only the words that contain the pair are
//! touched, and only the pairs around each merged position change. Ties are broken by the
//! lowest pair `(left_id, right_id)`, so the result depends only on the multiset of chunks.

use ahash::AHashMap;
use rayon::prelude::*;
use dary_heap::QuaternaryHeap as BinaryHeap;

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

/// All unique chunks ("words") in one flat buffer of u32: for each word its length, its count
/// (as two u32), then its token ids. A word is named by the offset of its header, so reaching
/// a word touches one place in memory. Words only ever shrink, so each keeps its slot.
pub struct Words {
    data: Vec<u32>,
    offsets: Vec<u32>,
}

const HEADER: usize = 3;

impl Words {
    pub fn from_chunks<'a>(chunks: impl IntoIterator<Item = (&'a [u8], i64)>) -> Result<Self, String> {
        let mut words = Words { data: Vec::new(), offsets: Vec::new() };
        for (bytes, count) in chunks {
            let offset = u32::try_from(words.data.len())
                .map_err(|_| "too many unique chunks: their bytes exceed 4 G token slots".to_string())?;
            words.offsets.push(offset);
            words.data.extend([bytes.len() as u32, count as u32, (count >> 32) as u32]);
            words.data.extend(bytes.iter().map(|&b| b as u32));
        }
        Ok(words)
    }

    /// The handles (offsets) of all words, in order.
    pub fn handles(&self) -> &[u32] {
        &self.offsets
    }

    #[inline]
    pub fn word(&self, w: u32) -> &[u32] {
        let w = w as usize;
        &self.data[w + HEADER..w + HEADER + self.data[w] as usize]
    }

    #[inline]
    pub fn count(&self, w: u32) -> i64 {
        let w = w as usize;
        (self.data[w + 1] as u64 | (self.data[w + 2] as u64) << 32) as i64
    }
}

/// In the word whose header is at `data[w]`, replace every non-overlapping occurrence (left to
/// right) of `(a, b)` by `new_id`. For each occurrence, `on_merge(left, right)` gets its
/// neighbours in the new sequence: the left one may itself be `new_id` (merged just before),
/// the right one not yet.
#[inline]
fn merge_in_word(data: &mut [u32], w: usize, a: u32, b: u32, new_id: u32, mut on_merge: impl FnMut(Option<u32>, Option<u32>)) {
    let len = data[w] as usize;
    let sym = &mut data[w + HEADER..w + HEADER + len];
    let (mut read, mut write) = (0usize, 0usize);
    while read < len {
        if read + 1 < len && sym[read] == a && sym[read + 1] == b {
            let left = (write > 0).then(|| sym[write - 1]);
            let right = (read + 2 < len).then(|| sym[read + 2]);
            on_merge(left, right);
            sym[write] = new_id;
            read += 2;
        } else {
            sym[write] = sym[read];
            read += 1;
        }
        write += 1;
    }
    data[w] = write as u32;
}

/// What we know about a pair: its total count, and every word that may contain it (sorted).
struct PairInfo {
    count: i64,
    words: Vec<u32>,
}

/// A heap entry packs `count << 64 | !pair`, so the max-heap pops the highest count first and,
/// among equal counts, the lowest pair. Counts of existing pairs only ever go down (a merge only
/// creates pairs with the brand-new id), so an entry's count is an upper bound; a stale entry
/// is re-pushed with the true count when it reaches the top ("lazy invalidation").
#[inline]
fn heap_entry(count: i64, pair: PairKey) -> u128 {
    ((count as u128) << 64) | !pair as u128
}

/// Per-step scratch, indexed by token id: for merging (a, b) into z, what the occurrences'
/// left neighbours x and right neighbours y add up to. Each occurrence with neighbour x turns
/// one (x, a) into (x, z), and with neighbour y one (b, y) into (z, y), so one counter per
/// neighbour id replaces four hash-map updates per occurrence.
#[derive(Default)]
struct Neighbours {
    count: Vec<i64>,
    words: Vec<Vec<u32>>,
    touched: Vec<u32>,
}

impl Neighbours {
    /// Add `other`'s sums to ours; `other` holds later words, so word lists stay sorted.
    fn absorb(&mut self, other: &mut Neighbours) {
        for &id in &other.touched {
            let n = std::mem::take(&mut other.count[id as usize]);
            let mut words = std::mem::take(&mut other.words[id as usize]);
            self.add_many(id, n, &mut words);
        }
        other.touched.clear();
    }

    fn grow(&mut self, id: usize) {
        if id >= self.count.len() {
            self.count.resize(id + 1, 0);
            self.words.resize_with(id + 1, Vec::new);
        }
    }

    fn add_many(&mut self, id: u32, count: i64, words: &mut Vec<u32>) {
        let id = id as usize;
        self.grow(id);
        if self.count[id] == 0 {
            self.touched.push(id as u32);
        }
        self.count[id] += count;
        self.words[id].append(words);
    }

    #[inline]
    fn add(&mut self, id: u32, count: i64, word: u32) {
        let id = id as usize;
        self.grow(id);
        if self.count[id] == 0 {
            self.touched.push(id as u32);
        }
        self.count[id] += count;
        if self.words[id].last() != Some(&word) {
            self.words[id].push(word);
        }
    }
}

/// The left and right neighbour sums of one merge step (or of one thread's share of it).
#[derive(Default)]
struct Scratch {
    lefts: Neighbours,
    rights: Neighbours,
}

impl Scratch {
    /// Merge (a, b) -> z in `words` (handles into `data`, which starts at handle `base`).
    fn visit(&mut self, data: &mut [u32], base: u32, words: &[u32], a: u32, b: u32, z: u32) {
        let (lefts, rights) = (&mut self.lefts, &mut self.rights);
        for &w in words {
            let at = (w - base) as usize;
            let count = (data[at + 1] as u64 | (data[at + 2] as u64) << 32) as i64;
            merge_in_word(data, at, a, b, z, |left, right| {
                if let Some(x) = left {
                    lefts.add(x, count, w);
                }
                if let Some(y) = right {
                    rights.add(y, count, w);
                }
            });
        }
    }
}

/// Merges touching at least this many words are split across threads.
const PARALLEL_MIN_WORDS: usize = 2048;

/// The merge loop's state; `next_merge` performs one merge.
pub struct Merger {
    pub words: Words,
    pairs: AHashMap<PairKey, PairInfo>,
    heap: BinaryHeap<u128>,
    next_id: u32,
    scratch: Vec<Scratch>, // one per thread
}

impl Merger {
    pub fn new(words: Words) -> Self {
        let mut pairs: AHashMap<PairKey, PairInfo> = AHashMap::new();
        for &w in words.handles() {
            let c = words.count(w);
            for win in words.word(w).windows(2) {
                let info = pairs.entry(pack(win[0], win[1])).or_insert(PairInfo { count: 0, words: Vec::new() });
                info.count += c;
                if info.words.last() != Some(&w) {
                    info.words.push(w);
                }
            }
        }
        let heap = pairs.iter().map(|(&pair, info)| heap_entry(info.count, pair)).collect();
        let scratch = (0..rayon::current_num_threads().max(1)).map(|_| Scratch::default()).collect();
        Merger { words, pairs, heap, next_id: 256, scratch }
    }

    /// Merge the most frequent pair (ties: lowest pair) and return it with its count,
    /// or None when no pair is left (every word is a single token).
    pub fn next_merge(&mut self) -> Option<((u32, u32), i64)> {
        let (pair, info) = loop {
            let top = self.heap.pop()?;
            let (count, pair) = ((top >> 64) as i64, !(top as u64));
            let Some(info) = self.pairs.get(&pair) else { continue };
            if info.count == count {
                break (pair, self.pairs.remove(&pair).unwrap());
            }
            if info.count > 0 {
                self.heap.push(heap_entry(info.count, pair));
            } else {
                self.pairs.remove(&pair);
            }
        };
        let (a, b) = unpack(pair);
        let z = self.next_id;
        self.next_id += 1;

        self.visit_words(&info.words, a, b, z);
        let Scratch { lefts, rights } = &mut self.scratch[0];

        // (b, y) -> (z, y) first: (z, a) is created here and may lose counts to (z, a) -> (z, z) below
        let mut new_pairs = Vec::with_capacity(rights.touched.len() + lefts.touched.len());
        for (side, neighbours) in [(0, &mut *rights), (1, &mut *lefts)] {
            for &id in &neighbours.touched {
                let n = std::mem::take(&mut neighbours.count[id as usize]);
                let words = std::mem::take(&mut neighbours.words[id as usize]);
                let (old, new) = if side == 0 { (pack(b, id), pack(z, id)) } else { (pack(id, a), pack(id, z)) };
                // `old` is gone only if it is the merged pair itself (a == b runs)
                if let Some(old_info) = self.pairs.get_mut(&old) {
                    old_info.count -= n;
                }
                self.pairs.insert(new, PairInfo { count: n, words });
                new_pairs.push(new);
            }
            neighbours.touched.clear();
        }
        for new in new_pairs {
            let count = self.pairs[&new].count;
            if count > 0 {
                self.heap.push(heap_entry(count, new));
            } else {
                self.pairs.remove(&new);
            }
        }
        Some(((a, b), info.count))
    }

    /// Merge (a, b) -> z in every word listed, summing the neighbours into `scratch[0]`. A big
    /// list is cut into one contiguous share per thread: the words of a share sit in their own
    /// region of `data`, so the threads never touch the same memory.
    fn visit_words(&mut self, words: &[u32], a: u32, b: u32, z: u32) {
        let shares = self.scratch.len().min(words.len() / PARALLEL_MIN_WORDS * 2).max(1);
        if shares == 1 {
            self.scratch[0].visit(&mut self.words.data, 0, words, a, b, z);
            return;
        }
        let per_share = words.len().div_ceil(shares);
        let mut jobs = Vec::with_capacity(shares);
        let mut rest: &mut [u32] = &mut self.words.data;
        let mut base = 0u32;
        for (i, (share, scratch)) in words.chunks(per_share).zip(self.scratch.iter_mut()).enumerate() {
            // this share's region ends where the next share's first word starts
            let end = words.get((i + 1) * per_share).copied().unwrap_or(base + rest.len() as u32);
            let (region, tail) = std::mem::take(&mut rest).split_at_mut((end - base) as usize);
            jobs.push((region, base, share, scratch));
            rest = tail;
            base = end;
        }
        jobs.into_par_iter().for_each(|(region, base, share, scratch)| scratch.visit(region, base, share, a, b, z));
        let (first, others) = self.scratch.split_first_mut().unwrap();
        for other in others {
            first.lefts.absorb(&mut other.lefts);
            first.rights.absorb(&mut other.rights);
        }
    }

    /// Current non-zero pair counts (for tests: compare against a full recount).
    pub fn pair_counts(&self) -> AHashMap<PairKey, i64> {
        self.pairs.iter().filter(|(_, info)| info.count != 0).map(|(&k, info)| (k, info.count)).collect()
    }

    /// Count all pairs from scratch (for tests).
    pub fn recount(&self) -> AHashMap<PairKey, i64> {
        let mut counts = AHashMap::new();
        for &w in self.words.handles() {
            for win in self.words.word(w).windows(2) {
                *counts.entry(pack(win[0], win[1])).or_insert(0) += self.words.count(w);
            }
        }
        counts
    }
}

/// Learn up to `num_merges` merges; `progress(done, total, pair, count)` is called after each.
pub fn learn_merges(words: Words, num_merges: usize, mut progress: impl FnMut(usize, usize, (u32, u32), i64)) -> Vec<(u32, u32)> {
    let mut merger = Merger::new(words);
    let mut merges = Vec::with_capacity(num_merges.min(1 << 20)); // vocab_size may be absurd
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
        Words::from_chunks(corpus.iter().map(|(s, c)| (s.as_bytes(), *c))).unwrap()
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

    /// `rounds` random corpora of `n_words` words, drawn alternately from the two alphabets.
    fn random_corpora(seed: u64, rounds: usize, n_words: usize, alphabets: [&[u8]; 2]) -> Vec<Vec<(Vec<u8>, i64)>> {
        let mut rng = Rng(seed);
        (0..rounds).map(|round| random_corpus(&mut rng, n_words, alphabets[round % 2])).collect()
    }

    #[test]
    fn incremental_counts_equal_full_recount_after_every_merge() {
        for (round, corpus) in random_corpora(0x9E3779B97F4A7C15, 20, 200, [b"ab", b"abcde \x00\xff"]).iter().enumerate() {
            let mut m = Merger::new(Words::from_chunks(corpus.iter().map(|(w, c)| (w.as_slice(), *c))).unwrap());
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
        for (round, corpus) in random_corpora(12345, 10, 300, [b"abc", b"abcdefgh  "]).iter().enumerate() {
            let fast = learn_merges(Words::from_chunks(corpus.iter().map(|(w, c)| (w.as_slice(), *c))).unwrap(), 150, |_, _, _, _| {});
            assert_eq!(fast, naive_learn(corpus, 150), "round {round}");
        }
    }

    #[test]
    fn big_merges_split_across_threads_match_naive_trainer() {
        // enough words that the first merges take the multi-threaded path, with 4 threads
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let mut rng = Rng(777);
        let corpus = random_corpus(&mut rng, 30_000, b"abcab a");
        let to_words = || Words::from_chunks(corpus.iter().map(|(w, c)| (w.as_slice(), *c))).unwrap();
        let fast = pool.install(|| learn_merges(to_words(), 60, |_, _, _, _| {}));
        assert_eq!(fast, naive_learn(&corpus, 60));
        pool.install(|| {
            let mut m = Merger::new(to_words());
            for _ in 0..20 {
                m.next_merge().unwrap();
                assert_eq!(m.pair_counts(), m.recount().into_iter().filter(|(_, c)| *c != 0).collect());
            }
        });
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
