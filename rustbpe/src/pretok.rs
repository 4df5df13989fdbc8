//! Pre-tokenization: splitting text into chunks with the split pattern, exactly as tiktoken's
//! `Encoding(pat_str=...)` does (fancy-regex `find_iter`).
//!
//! Splitting dominates training time, and a backtracking regex is slow at it, so the default
//! pattern (and GPT-4's, which differs only in the digit-run length) is run by a hand-written
//! scanner that makes the same decisions as the regex. Its character classes come from the
//! same Unicode tables the regex uses (regex-syntax), and tests check it against fancy-regex on
//! random and real text. Any other pattern goes through fancy-regex.

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};
use std::sync::OnceLock;

/// GPT-4's split pattern, except that numbers are split into runs of 1-2 digits (not 1-3).
pub const DEFAULT_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The default pattern with numbers in runs of 1 to `max_digits` digits.
fn pattern_with_digit_runs(max_digits: usize) -> String {
    DEFAULT_PATTERN.replace(r"\p{N}{1,2}", &format!(r"\p{{N}}{{1,{max_digits}}}"))
}

pub enum Splitter {
    /// the default pattern family, scanned by hand; the number is the longest digit run
    Fast(usize),
    Regex(Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, String> {
        for max_digits in 1..=9 {
            if pattern == pattern_with_digit_runs(max_digits) {
                return Ok(Splitter::Fast(max_digits));
            }
        }
        Ok(Splitter::Regex(Regex::new(pattern).map_err(|e| e.to_string())?))
    }

    /// Call `f` on every chunk of `text`, in order. Fails only if the regex engine gives up
    /// (fancy-regex's backtrack limit on a pathological custom pattern).
    #[inline]
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Fast(max_digits) => {
                let scanner = Scanner { s: text.as_bytes(), classes: classes(), max_digits: *max_digits };
                let mut start = 0;
                while start < text.len() {
                    let end = scanner.chunk_end(start);
                    f(&text[start..end]);
                    start = end;
                }
            }
            Splitter::Regex(regex) => {
                for m in regex.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed: {e}"))?;
                    f(m.as_str());
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// character classes, built from regex-syntax's Unicode tables (the ones fancy-regex uses)

const OTHER: u8 = 0; // none of the below: punctuation, symbols, marks, controls, ...
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const NEWLINE: u8 = 3; // \r or \n (which are also \s)
const SPACE: u8 = 4; // any other \s
// contraction letters, as bits: which of s d m t l v e r a char equals case-insensitively
const FOLD_SDMT: u8 = 1;
const FOLD_L: u8 = 2;
const FOLD_V: u8 = 4;
const FOLD_E: u8 = 8;
const FOLD_R: u8 = 16;

struct Classes {
    class: Vec<u8>,           // per code point, 0..=0x10FFFF
    fold: Vec<(char, u8)>,    // sorted; every char that case-folds to one of the letters above
}

fn unicode_ranges(pattern: &str) -> Vec<(char, char)> {
    let hir = regex_syntax::Parser::new().parse(pattern).expect("valid class pattern");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class.ranges().iter().map(|r| (r.start(), r.end())).collect(),
        HirKind::Literal(_) => {
            let c = pattern.chars().last().unwrap();
            vec![(c, c)]
        }
        other => panic!("unexpected HIR for {pattern}: {other:?}"),
    }
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut class = vec![OTHER; 0x110000];
        for (pattern, value) in [(r"\s", SPACE), (r"\p{L}", LETTER), (r"\p{N}", NUMBER)] {
            for (lo, hi) in unicode_ranges(pattern) {
                class[lo as usize..=hi as usize].fill(value);
            }
        }
        class['\r' as usize] = NEWLINE;
        class['\n' as usize] = NEWLINE;
        let mut fold: Vec<(char, u8)> = Vec::new();
        for (letters, bit) in [("sdmt", FOLD_SDMT), ("l", FOLD_L), ("v", FOLD_V), ("e", FOLD_E), ("r", FOLD_R)] {
            for letter in letters.chars() {
                for (lo, hi) in unicode_ranges(&format!("(?i:{letter})")) {
                    for c in lo..=hi {
                        match fold.iter_mut().find(|(f, _)| *f == c) {
                            Some((_, bits)) => *bits |= bit,
                            None => fold.push((c, bit)),
                        }
                    }
                }
            }
        }
        fold.sort();
        Classes { class, fold }
    })
}

/// Scans the default pattern. At each position it tries the pattern's alternatives in order:
///   1 `'(?i:[sdmt]|ll|ve|re)`        contractions
///   2 `[^\r\n\p{L}\p{N}]?+\p{L}+`    a word, with at most one leading non-letter (not \r \n)
///   3 `\p{N}{1,k}`                   a run of 1..k digits
///   4 ` ?[^\s\p{L}\p{N}]++[\r\n]*`   punctuation, an optional leading space, trailing newlines
///   5 `\s*[\r\n]`                    whitespace up to and including its last newline
///   6 `\s+(?!\S)`                    whitespace, except the last char if a non-space follows
///   7 `\s+`                          whitespace
struct Scanner<'a> {
    s: &'a [u8],
    classes: &'a Classes,
    max_digits: usize,
}

impl Scanner<'_> {
    /// (char, class, byte length) at byte offset i (which is < len and on a char boundary)
    #[inline(always)]
    fn at(&self, i: usize) -> (char, u8, usize) {
        let b = self.s[i];
        if b < 0x80 {
            return (b as char, self.classes.class[b as usize], 1);
        }
        // the text came from a &str, so it is valid UTF-8
        let (c, len) = if b < 0xE0 {
            (((b as u32 & 0x1F) << 6) | (self.s[i + 1] as u32 & 0x3F), 2)
        } else if b < 0xF0 {
            (((b as u32 & 0x0F) << 12) | ((self.s[i + 1] as u32 & 0x3F) << 6) | (self.s[i + 2] as u32 & 0x3F), 3)
        } else {
            (
                ((b as u32 & 0x07) << 18)
                    | ((self.s[i + 1] as u32 & 0x3F) << 12)
                    | ((self.s[i + 2] as u32 & 0x3F) << 6)
                    | (self.s[i + 3] as u32 & 0x3F),
                4,
            )
        };
        (char::from_u32(c).unwrap_or('\u{FFFD}'), self.classes.class[c as usize], len)
    }

    #[inline(always)]
    fn class_at(&self, i: usize) -> u8 {
        if i >= self.s.len() {
            return u8::MAX; // end of text: matches no class
        }
        let b = self.s[i];
        if b < 0x80 {
            self.classes.class[b as usize]
        } else {
            self.at(i).1
        }
    }

    fn fold_bits(&self, c: char) -> u8 {
        match self.classes.fold.binary_search_by(|(f, _)| f.cmp(&c)) {
            Ok(i) => self.classes.fold[i].1,
            Err(_) => 0,
        }
    }

    /// end of the chunk that starts at byte offset `start`
    #[inline]
    fn chunk_end(&self, start: usize) -> usize {
        let (c0, class0, len0) = self.at(start);
        let next = start + len0;
        match class0 {
            LETTER => self.skip(next, LETTER),
            NUMBER => {
                let mut end = next;
                for _ in 1..self.max_digits {
                    if self.class_at(end) != NUMBER {
                        break;
                    }
                    end += self.at(end).2;
                }
                end
            }
            NEWLINE => self.whitespace(start),
            _ => {
                if c0 == '\'' {
                    if let Some(end) = self.contraction(next) {
                        return end; // 1
                    }
                }
                if self.class_at(next) == LETTER {
                    return self.skip(next, LETTER); // 2
                }
                if class0 == OTHER {
                    return self.punctuation(next); // 4 without the space
                }
                if c0 == ' ' && self.class_at(next) == OTHER {
                    return self.punctuation(next + self.at(next).2); // 4 with the space
                }
                self.whitespace(start) // 5, 6, 7
            }
        }
    }

    /// alternative 1 after the apostrophe at `i - 1`
    fn contraction(&self, i: usize) -> Option<usize> {
        if i >= self.s.len() {
            return None;
        }
        let (c1, _, len1) = self.at(i);
        let bits1 = self.fold_bits(c1);
        if bits1 & FOLD_SDMT != 0 {
            return Some(i + len1);
        }
        if bits1 & (FOLD_L | FOLD_V | FOLD_R) == 0 || i + len1 >= self.s.len() {
            return None;
        }
        let (c2, _, len2) = self.at(i + len1);
        let bits2 = self.fold_bits(c2);
        let second = if bits1 & FOLD_L != 0 { FOLD_L } else { FOLD_E }; // ll | ve | re
        (bits2 & second != 0).then_some(i + len1 + len2)
    }

    /// skip chars of `class` from `i`
    #[inline(always)]
    fn skip(&self, mut i: usize, class: u8) -> usize {
        while self.class_at(i) == class {
            i += self.at(i).2;
        }
        i
    }

    /// alternative 4 after its first punctuation char: more punctuation, then \r and \n
    fn punctuation(&self, i: usize) -> usize {
        let mut i = self.skip(i, OTHER);
        while i < self.s.len() && (self.s[i] == b'\r' || self.s[i] == b'\n') {
            i += 1;
        }
        i
    }

    /// alternatives 5-7 at the whitespace char at `start`
    fn whitespace(&self, start: usize) -> usize {
        let (mut i, mut last_char) = (start, start);
        let mut after_last_newline = None;
        while i < self.s.len() {
            let (_, class, len) = self.at(i);
            if class == NEWLINE {
                after_last_newline = Some(i + len);
            } else if class != SPACE {
                break;
            }
            last_char = i;
            i += len;
        }
        if let Some(end) = after_last_newline {
            end // 5: \s*[\r\n]
        } else if i == self.s.len() || last_char == start {
            i // 6 at the end of the text, or 7: a single space before a non-space
        } else {
            last_char // 6: leave the last space to start the next chunk
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex_chunks(pattern: &str, text: &str) -> Vec<String> {
        let re = Regex::new(pattern).unwrap();
        re.find_iter(text).map(|m| m.unwrap().as_str().to_string()).collect()
    }

    fn fast_chunks(max_digits: usize, text: &str) -> Vec<String> {
        let mut out = vec![];
        Splitter::Fast(max_digits).for_each_chunk(text, |c| out.push(c.to_string())).unwrap();
        out
    }

    fn assert_same(max_digits: usize, text: &str) {
        let expected = regex_chunks(&pattern_with_digit_runs(max_digits), text);
        let got = fast_chunks(max_digits, text);
        assert_eq!(got, expected, "text {text:?}");
    }

    #[test]
    fn default_pattern_uses_the_scanner() {
        assert!(matches!(Splitter::new(DEFAULT_PATTERN).unwrap(), Splitter::Fast(2)));
        let gpt4 = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
        assert!(matches!(Splitter::new(gpt4).unwrap(), Splitter::Fast(3)));
        assert!(matches!(Splitter::new(r"\w+|\s+").unwrap(), Splitter::Regex(_)));
    }

    #[test]
    fn hand_picked_cases() {
        let cases = [
            "Hello world", "I'm here, aren't you? We'LL see. THEY'VE 're 'd 'x 'sam", "\u{17F}", "'\u{17F} '\u{212A}",
            "1234567 12 1", "  leading  and trailing  ", "a\n\nb\r\n  c", "  \n  x", "x  \t\n", "\n", " ", "   ",
            "...!!! ?? ,\n\n", " (a) [b] {c}", "tab\there", "emoji 😀😀 ok", "naïve café", "e\u{301}t\u{301}",
            "中文字符 テスト", "١٢٣٤ Ⅻ ½", "\u{a0}x \u{3000}y \u{85}z", "a\u{2028}b", "' '' '''", "don't", "'", "'l", "'v",
        ];
        for max_digits in 1..=3 {
            for text in cases {
                assert_same(max_digits, text);
            }
        }
    }

    #[test]
    fn fuzz_against_fancy_regex() {
        // tricky characters: every class boundary, case-folding look-alikes (long s, Kelvin sign)
        let alphabet: Vec<char> = "aZsStTlLvVeErRdDmM'’ \t\n\r\u{b}\u{c}\u{85}\u{a0}\u{2028}\u{3000}\u{200b}05٣Ⅻ½.,!?-_()\"#\u{301}\u{17F}\u{212A}é中😀\u{0}\u{7f}"
            .chars()
            .collect();
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..3000 {
            let len = (next() % 40) as usize;
            let text: String = (0..len)
                .map(|_| {
                    if next() % 8 == 0 {
                        // any scalar value from any plane
                        loop {
                            if let Some(c) = char::from_u32((next() % 0x110000) as u32) {
                                break c;
                            }
                        }
                    } else {
                        alphabet[(next() % alphabet.len() as u64) as usize]
                    }
                })
                .collect();
            assert_same(1 + round % 3, &text);
        }
    }

    #[test]
    fn agrees_with_fancy_regex_on_real_text() {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/pretrain");
        let Ok(entries) = std::fs::read_dir(data.join("train")) else {
            eprintln!("skipping: {} not found", data.display());
            return;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        paths.push(data.join("val/wikitext2_valid.txt"));
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap();
            let text = &text[..text.floor_char_boundary(300_000)];
            assert_same(2, text);
        }
    }
}
