"""Build, offline and deterministically, everything the example jobs in jobs/ need.

    python jobs/assets/make_assets.py [--out DIR]     # default: the folder of this script

Writes under DIR:
  data/summarize/{train,eval}.jsonl   fields `document`, `summary` (t5_summarize.yaml)
  data/lm/{train,eval}.jsonl          field `text` (gpt2_clm.yaml, bert_mlm.yaml)
  data/instruct/{train,eval}.jsonl    fields `prompt`, `response` and `messages` (a chat):
                                      short questions with one right answer (gpt2_instruct.yaml)
  templates/chat.jinja                a chat template for the tiny GPT-2, which has none
  models/t5-tiny                      T5ForConditionalGeneration + T5 tokenizer (Unigram)
  models/gpt2-tiny                    GPT2LMHeadModel + GPT-2 tokenizer (byte-level BPE)
  models/bert-tiny                    BertForMaskedLM + BERT tokenizer (WordPiece)

The text is synthetic but language-like: short local-news reports filled in from templates
with a fixed random seed. Each report's summary is built from the same template slots, so a
tiny model can genuinely learn to summarise (fixed headline words + copied names and numbers).
The models are randomly initialised with the real architectures and a fixed torch seed;
everything is written in a stable order, so running this twice gives identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally

SEED = 20240611
N_TRAIN = 2000
N_EVAL = 128
SOURCE_PREFIX = "summarize: "  # as in jobs/t5_summarize.yaml

# ---------------------------------------------------------------------------------------
# Synthetic news reports

TOWNS = [
    "Norbury", "Eastvale", "Kingsford", "Millbrook", "Ashton", "Redhill", "Westmere",
    "Oakridge", "Brightwater", "Fairhaven", "Stonebridge", "Greenfield", "Clearwater",
    "Harlow", "Lakeside", "Pinecrest", "Riverton", "Summerfield", "Thornbury", "Woodlands",
    "Elmstead", "Marston", "Highgate", "Bramley",
]
FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Hugo", "Irene", "James",
         "Karen", "Leo", "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tara", "Victor"]
LAST = ["Adams", "Baker", "Carter", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ito",
        "Jensen", "Klein", "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Quinn", "Rossi"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
PROJECTS = ["bridge", "library", "school", "park", "hospital", "stadium", "market",
            "museum", "clinic", "swimming pool", "train station", "bike path"]
BODIES = ["city council", "school board", "county board", "town council"]
BUILDINGS = ["warehouse", "restaurant", "hotel", "bakery", "garage", "church", "factory",
             "shop", "barn", "cinema"]
TEAMS = ["Lions", "Eagles", "Rovers", "Wolves", "Hawks", "Tigers", "Bears", "Falcons"]
INDUSTRIES = ["software", "furniture", "food", "shipping", "solar", "bicycle", "textile"]
COMPANIES = ["Northwind", "Bluepeak", "Ironleaf", "Suncrest", "Greystone", "Silverline",
             "Maplewood", "Redwave"]
FILLER = [
    "Local residents have followed the story closely.",
    "The news was shared widely on social media.",
    "More details are expected later this week.",
    "It was the main topic at the weekly market.",
    "Officials said they would give an update soon.",
    "Several neighbours said they were surprised.",
]


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _approval(rng: random.Random) -> tuple[list[str], str]:
    town, body, project = rng.choice(TOWNS), rng.choice(BODIES), rng.choice(PROJECTS)
    cost, votes = rng.randint(2, 90), rng.randint(5, 9)
    who = _person(rng)
    sentences = [
        rng.choice([
            f"On {rng.choice(DAYS)}, the {body} in {town} voted to build a new {project}.",
            f"The {body} in {town} has approved plans for a new {project}.",
        ]),
        f"The {project} will cost about {cost} million dollars and should open in "
        f"{rng.choice(MONTHS)}.",
        rng.choice([
            f"{who}, who leads the {body}, said the {project} would serve people for years.",
            f"The plan passed by {votes} votes to {rng.randint(0, 4)} after a long debate.",
        ]),
    ]
    return sentences, f"{town} {body} approves new {project} costing {cost} million"


def _storm(rng: random.Random) -> tuple[list[str], str]:
    town, roads, homes = rng.choice(TOWNS), rng.randint(2, 40), rng.randint(100, 900)
    kind = rng.choice(["storm", "flood", "snowstorm"])
    sentences = [
        rng.choice([
            f"A {kind} hit {town} on {rng.choice(DAYS)} and closed {roads} roads.",
            f"Heavy rain and wind from a {kind} forced {town} to close {roads} roads.",
        ]),
        f"About {homes} homes lost power for several hours.",
        rng.choice([
            "Crews worked through the night to clear fallen trees.",
            "Schools in the area stayed closed the next day.",
        ]),
    ]
    return sentences, f"{kind} closes {roads} roads in {town}"


def _sports(rng: random.Random) -> tuple[list[str], str]:
    town, other = rng.sample(TOWNS, 2)
    team, rival = rng.sample(TEAMS, 2)
    won, lost = rng.randint(2, 9), rng.randint(0, 1)
    lost = rng.randint(0, won - 1) if lost else 0
    star = _person(rng)
    sentences = [
        rng.choice([
            f"The {town} {team} beat the {other} {rival} {won} to {lost} on {rng.choice(DAYS)}.",
            f"On {rng.choice(DAYS)} the {town} {team} won against the {other} {rival}, "
            f"{won} to {lost}.",
        ]),
        f"{star} scored twice in front of a home crowd of {rng.randint(2, 30)} thousand fans.",
        rng.choice([
            f"The {team} now lead the league by {rng.randint(1, 9)} points.",
            f"It was the first loss of the season for the {rival}.",
        ]),
    ]
    return sentences, f"{town} {team} beat {other} {rival} {won} to {lost}"


def _jobs(rng: random.Random) -> tuple[list[str], str]:
    town, company, industry = rng.choice(TOWNS), rng.choice(COMPANIES), rng.choice(INDUSTRIES)
    workers = rng.randint(20, 900)
    sentences = [
        rng.choice([
            f"{company}, a {industry} company based in {town}, said it will hire {workers} "
            "new workers.",
            f"The {industry} firm {company} plans to add {workers} jobs in {town} this year.",
        ]),
        f"The company said demand had grown quickly since {rng.choice(MONTHS)}.",
        rng.choice([
            f"{_person(rng)}, the head of {company}, called it a good day for {town}.",
            "Most of the new jobs will be in a factory outside the town centre.",
        ]),
    ]
    return sentences, f"{company} to hire {workers} workers in {town}"


def _fire(rng: random.Random) -> tuple[list[str], str]:
    town, building = rng.choice(TOWNS), rng.choice(BUILDINGS)
    crews = rng.randint(2, 12)
    sentences = [
        rng.choice([
            f"A fire broke out at a {building} in {town} early on {rng.choice(DAYS)}.",
            f"Firefighters in {town} were called to a burning {building} on "
            f"{rng.choice(DAYS)} night.",
        ]),
        f"{crews} fire crews fought the flames for {rng.randint(2, 9)} hours.",
        rng.choice([
            "No one was hurt, but the building was badly damaged.",
            "Police said the cause of the fire was not yet known.",
        ]),
    ]
    return sentences, f"fire damages {building} in {town}"


def _election(rng: random.Random) -> tuple[list[str], str]:
    town, winner, loser = rng.choice(TOWNS), _person(rng), _person(rng)
    share = rng.randint(51, 79)
    sentences = [
        rng.choice([
            f"{winner} won the race for mayor of {town} with {share} percent of the vote.",
            f"Voters in {town} chose {winner} as their new mayor, giving {share} percent "
            "of the vote.",
        ]),
        f"{loser} conceded on {rng.choice(DAYS)} evening and thanked supporters.",
        rng.choice([
            f"{winner} promised to fix roads and build more homes in {town}.",
            f"Turnout was {rng.randint(30, 70)} percent, higher than at the last election.",
        ]),
    ]
    return sentences, f"{winner} elected mayor of {town} with {share} percent"


EVENTS: list[Callable[[random.Random], tuple[list[str], str]]] = [
    _approval, _storm, _sports, _jobs, _fire, _election,
]


def make_report(rng: random.Random) -> dict[str, str]:
    sentences, summary = rng.choice(EVENTS)(rng)
    if rng.random() < 0.5:  # an unrelated sentence, so the model must pick what matters
        sentences.insert(rng.randint(1, len(sentences)), rng.choice(FILLER))
    return {"document": " ".join(sentences), "summary": summary}


def make_text(rng: random.Random) -> dict[str, str]:
    # Language-modelling text: one or two reports in a row, headline first.
    parts = []
    for _ in range(rng.randint(1, 2)):
        report = make_report(rng)
        headline = report["summary"][0].upper() + report["summary"][1:] + "."
        parts.append(f"{headline} {report['document']}")
    return {"text": " ".join(parts)}


def write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def make_data(out: Path) -> list[str]:
    """Write the four data files; return all their text (to train the tokenizers on)."""
    rng = random.Random(SEED)
    corpus: list[str] = []
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        reports = [make_report(rng) for _ in range(n)]
        write_jsonl(out / "data" / "summarize" / f"{split}.jsonl", reports)
        texts = [make_text(rng) for _ in range(n)]
        write_jsonl(out / "data" / "lm" / f"{split}.jsonl", texts)
        if split == "train":  # tokenizers learn from train text only, as in real life
            # Documents as the seq2seq job feeds them (with its source prefix), as T5's own
            # vocabulary was learned with its task prefixes in the text.
            corpus += [SOURCE_PREFIX + r["document"] for r in reports]
            corpus += [r["summary"] for r in reports]
            corpus += [t["text"] for t in texts]
    return corpus


# ---------------------------------------------------------------------------------------
# Instruction data: questions with exactly one right, short answer, which a tiny model can
# learn in a couple of minutes (look-ups it can memorise, copies it can learn to make).

N_INSTRUCT_TRAIN = 2000
N_INSTRUCT_EVAL = 128
# The prompt/response form carries its own separators; the chat form has bare turns (the
# chat template adds the rest).
ANSWER_CUE = "\nAnswer:"


def _instruction(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        i = rng.randrange(len(DAYS))
        return f"Which day comes after {DAYS[i]}?", DAYS[(i + 1) % len(DAYS)]
    if kind == 2:
        i = rng.randrange(len(MONTHS))
        return f"Which month comes before {MONTHS[i]}?", MONTHS[i - 1]
    if kind == 3:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        return f"What is the first name of {first} {last}?", first
    sentences, _ = rng.choice(EVENTS)(rng)
    town = next((t for t in TOWNS if t in sentences[0]), None)
    if town is None:  # a first sentence that names no town: draw another question
        return _instruction(rng)
    return f"Which town does this sentence name? {sentences[0]}", town


def make_instructions(out: Path) -> None:
    rng = random.Random(SEED + 1)  # its own stream: the other data files stay as they were
    for split, n in (("train", N_INSTRUCT_TRAIN), ("eval", N_INSTRUCT_EVAL)):
        rows = []
        for _ in range(n):
            question, answer = _instruction(rng)
            rows.append({
                "prompt": question + ANSWER_CUE, "response": " " + answer,
                "messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer}],
            })
        write_jsonl(out / "data" / "instruct" / f"{split}.jsonl", rows)


# A plain chat format: "User: ..." and "Assistant: ..." turns on lines of their own, each
# assistant turn closed by eos; the generation prompt is "Assistant:".
CHAT_TEMPLATE = """\
{%- for message in messages -%}
{%- if not loop.first %}{{ '\\n' }}{% endif -%}
{%- if message['role'] == 'assistant' -%}
{{ 'Assistant: ' + message['content'] + eos_token }}
{%- elif message['role'] == 'user' -%}
{{ 'User: ' + message['content'] }}
{%- else -%}
{{ message['content'] }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif -%}
"""


def write_chat_template(out: Path) -> None:
    path = out / "templates" / "chat.jinja"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CHAT_TEMPLATE, encoding="utf-8", newline="\n")


# ---------------------------------------------------------------------------------------
# Tokenizers: trained with the `tokenizers` library using each family's own pipeline, then
# handed to the family's transformers class, so `AutoTokenizer` gives the usual behaviour
# (T5 appends </s>, BERT wraps in [CLS] ... [SEP], GPT-2 adds nothing and has no pad).


def _word_counts(
    corpus: list[str], pre_tokenizer: Any, normalizer: Any = None, split: str | None = None
) -> list[tuple[str, int]]:
    """Words as the family's pre-tokenizer splits them, most frequent first (ties by word).

    `split`, a regex, cuts each word further (e.g. punctuation off the end of a word).
    """
    counts: Counter[str] = Counter()
    for text in corpus:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            counts.update(re.findall(split, word) if split else [word])
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def train_t5_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A SentencePiece-style Unigram vocab: frequent whole words plus single characters.

    Not `UnigramTrainer`: its EM sums floats in hash-map order, so scores (and with them the
    files) differ from run to run. Whole-word pieces scored by log frequency are what Unigram
    converges to on a small closed vocabulary anyway; characters keep any text encodable.
    """
    from tokenizers import pre_tokenizers
    from transformers import T5Tokenizer

    # The same pre-tokenizer T5Tokenizer uses, so the vocab matches how it splits text.
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    specials = ["<pad>", "</s>", "<unk>"]  # T5's layout: pad=0 (= decoder start), eos=1, unk=2
    # Punctuation as its own piece (as SentencePiece learns it), not glued to the word.
    words = _word_counts(corpus, pre, split=r"\u2581?[^.,!?;:]+|[.,!?;:]")
    chars = sorted({c for word, _ in words for c in word} | {"▁"})
    total = sum(n for _, n in words)
    kept = words[: vocab_size - len(specials) - len(chars)]
    pieces = [(w, round(math.log(n / total), 4)) for w, n in kept]
    # Characters score below any word so whole words win; still finite so unseen words split.
    floor = min(score for _, score in pieces) - 2.0
    pieces += [(c, floor) for c in chars if c not in dict(pieces)]
    vocab = [(s, 0.0) for s in specials] + pieces
    # extra_ids=0: the <extra_id_N> sentinels only matter for span-corruption pretraining.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def train_gpt2_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Like GPT-2: <|endoftext|> is bos, eos and unk; no pad token (the clm objective uses eos).
    return GPT2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=256)


def train_bert_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A WordPiece vocab: BERT's specials, every character (plain and ##), frequent words.

    Not `WordPieceTrainer`: it numbers the ## pieces in hash-map order, so ties between
    merges (and the files) change from run to run.
    """
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = _word_counts(
        corpus, pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(lowercase=True)
    )
    chars = sorted({c for word, _ in words for c in word})
    tokens = specials + chars + [f"##{c}" for c in chars]
    tokens += [w for w, _ in words if w not in set(chars)][: vocab_size - len(tokens)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=256)


# ---------------------------------------------------------------------------------------
# Tiny models: real architectures, small enough to train in well under a minute on 2 CPUs.
# Dropout is off: on thousands of templated examples these models do not overfit in a few
# hundred steps, and dropout would only slow learning (and each CPU step) down.


def build_t5(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=128, d_kv=32, d_ff=256, num_layers=2,
        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="relu",
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


def build_gpt2(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_inner=256, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def build_bert(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


FAMILIES = {
    # name: (tokenizer trainer, vocab size, model builder)
    "t5-tiny": (train_t5_tokenizer, 1000, build_t5),
    "gpt2-tiny": (train_gpt2_tokenizer, 1000, build_gpt2),
    "bert-tiny": (train_bert_tokenizer, 1000, build_bert),
}


def make_models(out: Path, corpus: list[str]) -> None:
    import torch

    for name, (train_tokenizer, vocab_size, build) in FAMILIES.items():
        target = out / "models" / name
        target.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer(corpus, vocab_size)
        torch.manual_seed(SEED)  # same weights on every run
        model = build(tokenizer)
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where to write data/ and models/ (default: beside this script)")
    args = parser.parse_args(argv)
    corpus = make_data(args.out)
    make_instructions(args.out)
    write_chat_template(args.out)
    make_models(args.out, corpus)
    print(f"wrote assets under {args.out}")


if __name__ == "__main__":
    main()
