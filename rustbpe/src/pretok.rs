//! Pre-tokenization: splitting text into chunks with the split pattern, the same way
//! tiktoken's `Encoding(pat_str=...)` does (fancy-regex `find_iter`, unmatched text skipped).

use fancy_regex::Regex;

/// GPT-4's split pattern, except that numbers are split into runs of 1-2 digits (not 1-3).
pub const DEFAULT_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub struct Splitter {
    regex: Regex,
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, String> {
        let regex = Regex::new(pattern).map_err(|e| e.to_string())?;
        Ok(Splitter { regex })
    }

    /// Call `f` on every chunk of `text`, in order. Fails only if the regex engine gives up
    /// (fancy-regex's backtrack limit on a pathological custom pattern).
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| format!("split pattern failed: {e}"))?;
            f(m.as_str());
        }
        Ok(())
    }
}
