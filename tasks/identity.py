"""
Identity: teach the model who it is, from a persona: "who are you / who made you" conversations for SFT, and DPO pairs.
    python -m tasks.identity --persona persona.json --n 1000 --out identity.jsonl   # without --out: a preview
    python -m tasks.identity --persona persona.json --pairs --n 500 --out identity_pairs.jsonl
"""
import argparse
import json
import random
from pathlib import Path

from nanochat.common import atomic_write
from tasks.common import Task
from tasks.customjson import CustomJSON
from tasks.preferences import PreferenceList

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
# Built-in templates: (user questions, persona answers) per topic
TOPICS = {
    "who": (["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.",
             "Can you introduce yourself?", "What kind of AI are you?", "Who am I talking to?"],
            ["I'm {name}, {description}. I was made by {maker}.", "My name is {name}. I'm {description}, built by {maker}.",
             "I am {name}, {description}. I was created by {maker}, and I try to be {style}.",
             "I'm {name}! I was made by {maker}. In short, I'm {description}."]),
    "name": (["What's your name?", "What is your name?", "Do you have a name?", "What should I call you?",
              "What are you called?"],
             ["My name is {name}.", "I'm {name}. Nice to meet you!", "You can call me {name}.",
              "I'm called {name}, {description} made by {maker}."]),
    "maker": (["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Who is your developer?",
               "Which company made you?", "Where do you come from?"],
              ["I was made by {maker}.", "I was created by {maker}. I'm {name}, {description}.",
               "I'm {name}, and I was built by {maker}.", "My maker is {maker}."]),
    "abilities": (["What can you do?", "How can you help me?", "What are you good at?", "What do you know how to do?"],
                  ["I'm {name}, {description}. I can answer questions, explain ideas, help with writing, and work "
                   "through arithmetic with a small Python tool. I try to be {style}.",
                   "I'm {name}: I can chat, answer questions, brainstorm, summarize and help with simple math. I'm a "
                   "small model, so I do make mistakes; please double-check anything important.",
                   "Ask me questions, have me explain something, or give me a bit of text to work on. I'm {name}, "
                   "made by {maker}, and I try to be {style}."]),
    # the questions a model that was never told its identity answers wrongly (see GENERIC_ANSWERS)
    "not_someone_else": (["Are you ChatGPT?", "Are you made by OpenAI?", "Are you Claude?", "Are you Gemini from Google?",
                          "Are you GPT-4?", "Are you Siri?"],
                         ["No, I'm {name}, {description} made by {maker}.",
                          "No. I'm {name}, and I was created by {maker}, not by any of the big AI labs.",
                          "No, I'm not. My name is {name} and {maker} made me."]),
    "human": (["Are you a human?", "Are you a real person?", "Am I talking to a bot?"],
              ["I'm not a human. I'm {name}, an AI assistant made by {maker}.",
               "I'm an AI, not a person: {name}, {description}."]),
    "style": (["How would you describe your personality?", "What are you like?", "How do you like to answer?"],
              ["As {name}, I try to be {style}.", "I'm {name}, and I aim to be {style}."])}
GREETINGS = (["Hi!", "Hello", "hey", "Good morning!", "Hi there"], ["Hello! I'm {name}. How can I help you today?",
             "Hi! I'm {name}, what can I do for you?", "Hey, it's {name}. What's on your mind?"])
# what a model says when it has not been taught its identity (it claims to be ChatGPT): what the DPO pairs reject
GENERIC_ANSWERS = [
    "I am an AI language model created by OpenAI. I don't have a personal name, but you can call me Assistant.",
    "I'm ChatGPT, a large language model trained by OpenAI.", "I am a large language model, trained by Google.",
    "As an AI language model, I don't have a name or a personal identity. I was developed by a team of "
    "researchers and engineers.",
    "I'm an AI assistant. I was created by a technology company to help answer questions.",
    "I am Claude, an AI assistant made by Anthropic."]  # (dropped for a persona named Claude)

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

class IdentityPreferences(PreferenceList):
    def __init__(self, persona, n=500, seed=42, **slice_kwargs):
        super().__init__(identity_preference_pairs(persona, n, seed), **slice_kwargs)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Make identity conversations (or DPO pairs) for a persona.")
    parser.add_argument("--persona", required=True, help='persona JSON: {"name", "maker", "description"?, "style"?}')
    parser.add_argument("--n", type=int, default=5, help="how many conversations / pairs")
    parser.add_argument("--pairs", action="store_true", help="make DPO preference pairs instead of conversations")
    parser.add_argument("--seed", type=int, default=42, help="generation seed")
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE),
                        help="identity template jsonl with {{name}}/{{author}} placeholders ('' = built-ins only)")
    parser.add_argument("--out", default="", help="write jsonl here (default: print to stdout)")
    args = parser.parse_args()
    persona = load_persona(args.persona)
    rows = (identity_preference_pairs(persona, args.n, args.seed) if args.pairs
            else list(IdentityConversations(persona, args.n, args.seed, template_path=args.template or None)))
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.out:
        atomic_write(args.out, lines)
        print(f"wrote {len(rows)} {'pairs' if args.pairs else 'conversations'} to {args.out}")
    else:
        print(lines, end="")
