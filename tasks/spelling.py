"""Spelling tasks generated from a built-in word list (nothing to download): a model that sees tokens,
not letters, must be taught to spell, and to count letters with a tool.
    SpellingBee(size=1000, split="train"), SimpleSpelling(size=300, split="test")"""
import random
import re
from pathlib import Path

from tasks.common import Task
from tasks.gsm8k import GSM8K

# the words to spell, one per line (edit the file to teach others); sorted(set()): the same list, in the
# same order, in every Python process
WORDS = sorted(set((Path(__file__).with_name("spelling_words.txt")).read_text(encoding="utf-8").split()))
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
COUNT_QUESTIONS = [
    "How many {letter}'s are in the word {word}?", "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the number of {letter}'s in \"{word}\".", "In the word {word}, how many times does the letter {letter} occur?",
    "how many {letter} in {word}", "How many letter {letter} are there in {word}?",
    "Can you count how many '{letter}' characters the word '{word}' has?"]
SPELL_QUESTIONS = ["Spell the word {word}.", "How do you spell \"{word}\"?", "spell {word} letter by letter",
                   "Can you spell out the word '{word}' for me?", "What are the letters of the word {word}?"]
# a word spelled out with hyphens, "a-p-p-l-e": the last one in a completion is its answer
SPELLED = re.compile(r"\b[a-zA-Z](?:-[a-zA-Z])+\b")

class _GeneratedTask(Task):
    eval_type = "generative"
    def __init__(self, size=1000, split="train", seed=42, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__} split must be train or test, got {split!r}")
        self.size, self.split, self.seed = size, split, seed
    def num_examples(self):
        return self.size
    def rng_and_word(self, index):
        # example i is a pure function of (split, seed, i), so any slice or order is reproducible;
        # a string seed is hashed with sha512: stable across runs and Python versions
        rng = random.Random(f"{type(self).__name__}/{self.split}/{self.seed}/{index}")
        return rng, rng.choice(WORDS)

class SpellingBee(_GeneratedTask):
    # "How many r's are in strawberry?" -> spell it out, the tool call 'strawberry'.count('r') -> 3,
    # and a final "#### 3", graded like GSM8K
    def get_example(self, index):
        rng, word = self.rng_and_word(index)
        # mostly letters of the word, sometimes one it lacks (answer 0)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(ALPHABET)
        count, question = word.count(letter), rng.choice(COUNT_QUESTIONS).format(letter=letter, word=word)
        # spelling the word out first puts its letters in the context as separate tokens
        parts = [{"type": "text", "text": f"Spelling \"{word}\" out: {', '.join(word)}. "
                                          f"Let me count the '{letter}'s with Python.\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\nThe letter '{letter}' appears {count} time{'' if count == 1 else 's'} "
                                          f"in \"{word}\".\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": count, "word": word, "letter": letter}

    # GSM8K's grader: the number after the last "####" against conversation["answer"]
    evaluate = GSM8K.evaluate

class SimpleSpelling(_GeneratedTask):
    # "Spell the word apple" -> "apple: a-p-p-l-e"
    def get_example(self, index):
        rng, word = self.rng_and_word(index)
        user, reply = rng.choice(SPELL_QUESTIONS).format(word=word), f"{word}: {'-'.join(word)}"
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], "word": word}
    def evaluate(self, conversation, completion):
        spelled = SPELLED.findall(completion)
        return float(bool(spelled) and spelled[-1].replace("-", "").lower() == conversation["word"])
