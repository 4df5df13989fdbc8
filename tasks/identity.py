"""Identity: teach the model who it is from a persona: "who are you/who made you" conversations for SFT, and DPO pairs.
    python -m tasks.identity --persona persona.json --n 1000 --out identity.jsonl   # without --out: a preview
    python -m tasks.identity --persona persona.json --pairs --n 500 --out identity_pairs.jsonl"""
import argparse
import json
import random
from pathlib import Path

from nanochat.common import HelpFormatter, atomic_write, exit_on
from tasks.common import Task
from tasks.customjson import CustomJSON
from tasks.preferences import preference_pair

# A persona: {"name": "nanochat", "maker": "Ada Lovelace", "description": "a small chat model trained
# from scratch on a single GPU node", "style": "friendly, honest and concise"}; name and maker required
# (None here), description completes "I am ...", style completes "I try to be ..."
PERSONA_FIELDS = {"name": None, "maker": None, "description": "a small AI assistant",
                  "style": "helpful, honest and concise"}
# besides the built-ins below: LLaMA-Factory's identity templates (Apache-2.0; English, Chinese), when present
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat" / "identity_template_chat.jsonl"

def validate_persona(persona, source="persona"):
    """A checked persona dict with defaults filled in; ValueError naming the bad field otherwise."""
    if not isinstance(persona, dict):
        raise ValueError(f"{source}: expected a JSON object with fields {', '.join(PERSONA_FIELDS)}, "
                         f"got {type(persona).__name__}")
    if unknown := sorted(set(persona) - set(PERSONA_FIELDS)):
        # LLaMA-Factory's templates call the maker "author": a likely slip
        hint = " (the creator's field is called 'maker')" if {"author", "creator"} & set(unknown) else ""
        raise ValueError(f"{source}: unknown field(s) {unknown}; allowed: {', '.join(PERSONA_FIELDS)}{hint}")
    clean = {field: persona.get(field, default) for field, default in PERSONA_FIELDS.items()}
    for field, value in clean.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: field '{field}' " + ("is required (a non-empty string)" if value is None
                                                              else f"must be a non-empty string, got {value!r}"))
    # the fields are spliced into sentences
    return {field: value.strip().rstrip(".") for field, value in clean.items()}

def load_persona(path):
    try:
        return validate_persona(json.loads(Path(path).read_text(encoding="utf-8")), source=str(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

# -----------------------------------------------------------------------------
# The built-in templates, data in a file of their own so that you can edit what your model says about itself: per topic,
# (user questions, persona answers) with {name}, {maker}, {description} and {style} slots; greetings; and what a model
# says when it has not been taught its identity (it claims to be ChatGPT), which the DPO pairs reject. The topic
# "not_someone_else" asks exactly what such a model answers wrongly.
_TEMPLATES = json.loads(Path(__file__).with_name("identity_templates.json").read_text(encoding="utf-8"))
TOPICS = {topic: tuple(qa) for topic, qa in _TEMPLATES["topics"].items()}
GREETINGS, GENERIC_ANSWERS = tuple(_TEMPLATES["greetings"]), _TEMPLATES["generic_answers"]

# users do not type like style guides: vary case, punctuation and openers
def _vary(rng, question):
    question = question.lower() if rng.random() < 0.3 else question
    question = question.rstrip("?.!") if rng.random() < 0.25 else question
    # the condition draws first, then the opener: reordering the draws would change every seeded example
    if rng.random() < 0.15:
        question = rng.choice(["hey, ", "ok so ", "quick question: ", "hi! "]) + question[0].lower() + question[1:]
    return question

class IdentityConversations(Task):
    def __init__(self, persona, n=1000, seed=42, template_path=DEFAULT_TEMPLATE, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.persona, self.n, self.seed = validate_persona(persona), n, seed
        # the template conversations keep their {{name}}/{{author}} placeholders until an example is made
        found = template_path is not None and Path(template_path).exists()
        self.templates = [c["messages"] for c in CustomJSON(str(template_path))] if found else []
    def num_examples(self):
        return self.n
    def _fill(self, text):
        # LLaMA-Factory's templates say {{name}} and {{author}}; ours are str.format templates
        if "{{" in text:
            return text.replace("{{name}}", self.persona["name"]).replace("{{author}}", self.persona["maker"])
        return text.format(**self.persona)
    def get_example(self, index):
        # a string seed: example i is the same in every run, whatever the slice or order
        rng = random.Random(f"identity/{self.seed}/{index}")
        if self.templates and rng.random() < 0.3:  # a template conversation, 30% of the time
            return {"messages": [dict(m, content=self._fill(m["content"])) for m in rng.choice(self.templates)]}
        # (question, answer) exchanges, sometimes a greeting first to make multi-turn examples
        exchanges = [(rng.choice(GREETINGS[0]), self._fill(rng.choice(GREETINGS[1])))] if rng.random() < 0.25 else []
        for questions, answers in map(TOPICS.get, rng.sample(sorted(TOPICS), 2 if rng.random() < 0.2 else 1)):
            exchanges.append((_vary(rng, rng.choice(questions)), self._fill(rng.choice(answers))))
        turns = [({"role": "user", "content": q}, {"role": "assistant", "content": a}) for q, a in exchanges]
        return {"messages": [message for turn in turns for message in turn]}

def identity_preference_pairs(persona, n=500, seed=42):
    """DPO pairs {"prompt_messages", "chosen", "rejected"}: the persona's answer over a generic one."""
    persona = validate_persona(persona)
    # a persona named like a generic answer's model ("Claude") must not have that answer rejected
    generic = [a for a in GENERIC_ANSWERS if persona["name"].lower() not in a.lower()]
    topics = ["who", "name", "maker", "not_someone_else", "human"]  # where generic replies are wrong
    pairs = []
    for rng in (random.Random(f"identity_pairs/{seed}/{index}") for index in range(n)):
        questions, answers = TOPICS[rng.choice(topics)]
        pairs.append({"prompt_messages": [{"role": "user", "content": _vary(rng, rng.choice(questions))}],
                      "chosen": rng.choice(answers).format(**persona), "rejected": rng.choice(generic)})
    return pairs

class IdentityPreferences(Task):
    """identity_preference_pairs as a task, each pair checked like a loaded one (tasks.preferences)."""
    def __init__(self, persona, n=500, seed=42, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.items = [preference_pair(item) for item in identity_preference_pairs(persona, n, seed)]
    def get_example(self, index):
        # copies: a caller that edits an item must not change the task
        return {**self.items[index], "prompt_messages": [dict(m) for m in self.items[index]["prompt_messages"]]}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Make identity conversations (or DPO pairs) for a persona.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--persona", required=True, help='persona JSON: {"name", "maker", "description"?, "style"?}')
    parser.add_argument("--n", type=int, default=5, help="how many conversations / pairs")
    parser.add_argument("--pairs", action="store_true", help="make DPO preference pairs instead of conversations")
    parser.add_argument("--seed", type=int, default=42, help="generation seed")
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE),
                        help="identity template jsonl with {{name}}/{{author}} placeholders ('' = built-ins only)")
    parser.add_argument("--out", default="-", help="write jsonl here ('-' = print to stdout)")
    args = parser.parse_args()
    with exit_on(ValueError, OSError):  # a bad or missing persona file: one line naming it, not a traceback
        persona = load_persona(args.persona)
    rows = (identity_preference_pairs(persona, args.n, args.seed) if args.pairs
            else list(IdentityConversations(persona, args.n, args.seed, template_path=args.template or None)))
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.out != "-":
        atomic_write(args.out, lines)
        print(f"wrote {len(rows)} {'pairs' if args.pairs else 'conversations'} to {args.out}")
    else:
        print(lines, end="")
