"""Generate Search-QA data offline: `stepopsd-make-qa --out DIR --seed N`.

The data is GENERATED: a fictional knowledge base, never NQ, HotpotQA or any Search-R1 data set, and
results on it must never be presented as such. It is written in Search-R1's formats so the same
loader, retriever and environment serve both:

    DIR/corpus.jsonl    wiki-18 format, one passage a line: {"id": "0", "contents": "\\"Title\\"\\ntext"}
    DIR/train.parquet   id, question, golden_answers (list<string>), data_source, metadata (JSON)
    DIR/test.parquet    same; file-level parquet metadata `stepopsd_generated=1`

The knowledge base holds countries (currency), rivers, towns (country, river), organisations
(founder, founding year, headquarters town) and people (birthplace town, occupation, employer).
Every name is built from a small syllable inventory around a medial "kv" or "zv", a letter pair no
English word has inside it, so no name is a real word and no pretrained knowledge answers a
question. About a fifth of the people, towns and organisations are distractors: near twins of
another entity's name (same given name with a changed family name, same stem with another kind of
organisation), never asked about. Each fact is stated in exactly one passage (people get two: an
early-life and a career passage), with a few reused sentence templates.

Questions (data sources `generated_singlehop`, `generated_multihop`): single-hop asks one fact of
a named entity; two-hop needs a bridge entity found by a first search ("In which country was X
born?": X's passage gives the town, the town's passage the country). The answer is never in the
question nor, for two-hop, in the first passage. Train and test ask about disjoint entities.
`metadata` records the expert's searches in order, the bridge and the supporting passage ids;
`expert_steps` turns it into per-step (think, action) pairs. Same seed and sizes, same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from stepopsd.envs.search.corpus import passage_line
from stepopsd.envs.search.data import GENERATED_KEY, GENERATED_MULTIHOP, GENERATED_SINGLEHOP
from stepopsd.errors import UserError, refuse_foreign_folder
from stepopsd.progress import Progress

GENERATOR_VERSION = 1
SPLITS = ("train", "test")
ONSETS = tuple("bdfgklmnprstvz")
VOWELS = tuple("aeiou")
CODAS = tuple("lnrs")
MARKERS = ("kv", "zv")  # never inside an English word: every name carries one
OCCUPATIONS = ("painter", "teacher", "builder", "physician", "poet", "carpenter", "sailor", "merchant",
               "composer", "historian", "lawyer", "farmer")  # all take "a"
ORG_KINDS = ("Institute", "Company", "Society", "Guild", "Bank", "Academy", "Museum", "Library")
DISTRACTOR_SHARE = 5  # one in five people, towns and organisations is a distractor twin
SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("golden_answers", pa.list_(pa.string())),
                    ("data_source", pa.string()), ("metadata", pa.string())])


@dataclass(frozen=True)
class Rel:
    """One fact type: where it is stated, how it is asked, searched for and reasoned about."""

    kind: str  # subject kind: person, org, town, country
    part: str  # which passage of the subject states it: "" (the only one), "a" (early life), "b" (career)
    attr: str  # attribute of the subject entity holding the object's name
    key: str  # the word of the supporting passage the expert adds to the subject's name when searching
    question: str
    need: str  # what the expert is looking for
    found: str  # what the expert read, {s} subject, {o} object


REL = {
    "birthplace": Rel("person", "a", "town", "born", "In which town was {s} born?",
                      "the town where {s} was born", "{s} was born in {o}"),
    "occupation": Rel("person", "a", "occupation", "occupation", "What is the occupation of {s}?",
                      "the occupation of {s}", "{s} is a {o} by occupation"),
    "employer": Rel("person", "b", "org", "works", "Which organisation does {s} work for?",
                    "the organisation that {s} works for", "{s} works for the {o}"),
    "founder": Rel("org", "", "founder", "founded", "Who founded the {s}?",
                   "the founder of the {s}", "the {s} was founded by {o}"),
    "founded_year": Rel("org", "", "year", "founded", "In which year was the {s} founded?",
                        "the year the {s} was founded", "the {s} was founded in {o}"),
    "headquarters": Rel("org", "", "town", "headquarters", "In which town are the headquarters of the {s}?",
                        "the town where the {s} has its headquarters", "the headquarters of the {s} are in {o}"),
    "town_country": Rel("town", "", "country", "country", "In which country is {s}?",
                        "the country where {s} lies", "{s} is a town in {o}"),
    "river": Rel("town", "", "river", "river", "Which river flows through {s}?",
                 "the river that flows through {s}", "the {o} flows through {s}"),
    "currency": Rel("country", "", "currency", "currency", "What is the currency of {s}?",
                    "the currency of {s}", "the currency of {s} is the {o}"),
}

# two-hop: first fact, second fact (of the bridge), question, what the expert is looking for
MULTI = {
    "birth_country": ("birthplace", "town_country", "In which country was {s} born?",
                      "the country where {s} was born"),
    "birth_river": ("birthplace", "river", "Which river flows through the town where {s} was born?",
                    "the river that flows through the town where {s} was born"),
    "employer_founder": ("employer", "founder", "Who founded the organisation that {s} works for?",
                         "the founder of the organisation that {s} works for"),
    "employer_year": ("employer", "founded_year", "In which year was the organisation that {s} works for founded?",
                      "the year the organisation that {s} works for was founded"),
    "employer_headquarters": ("employer", "headquarters",
                              "In which town are the headquarters of the organisation that {s} works for?",
                              "the town where the organisation that {s} works for has its headquarters"),
    "headquarters_country": ("headquarters", "town_country", "In which country are the headquarters of the {s}?",
                             "the country where the {s} has its headquarters"),
    "founder_birthplace": ("founder", "birthplace", "In which town was the founder of the {s} born?",
                           "the town where the founder of the {s} was born"),
    "country_currency": ("town_country", "currency", "What is the currency of the country where {s} lies?",
                         "the currency of the country where {s} lies"),
}


@dataclass
class Entity:
    kind: str
    name: str
    distractor: bool = False
    attrs: dict = field(default_factory=dict)  # attribute -> value (a name, an occupation, a year)


@dataclass
class QAReport:
    """What was generated (all of it labelled "generated")."""

    seed: int
    entities: dict = field(default_factory=dict)  # kind -> count
    distractors: int = 0
    passages: int = 0
    questions: dict = field(default_factory=dict)  # split -> data_source -> count
    relations: dict = field(default_factory=dict)  # split -> relation -> count
    seconds: float = 0.0
    data_label: str = "generated"

    def table(self) -> str:
        rows = ["split | data_source | questions [generated]", "--- | --- | ---"]
        for split in SPLITS:
            for source in (GENERATED_SINGLEHOP, GENERATED_MULTIHOP):
                rows.append(f"{split} | {source} | {self.questions.get(split, {}).get(source, 0)}")
        kinds = ", ".join(f"{k} {v}" for k, v in self.entities.items())
        rows.append(f"entities [generated]: {sum(self.entities.values())} ({kinds}; {self.distractors} distractors)")
        rows.append(f"passages [generated]: {self.passages}; seed {self.seed}; {self.seconds:.2f} s")
        return "\n".join(rows)


class _Names:
    """Unique capitalised words from the syllable inventory; every one carries a medial marker."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _tail(self) -> str:
        r = self.rng
        tail = r.choice(VOWELS)
        if r.random() < 0.5:
            tail += r.choice(ONSETS) + r.choice(VOWELS)
        if r.random() < 0.5:
            tail += r.choice(CODAS)
        return tail

    def _take(self, make) -> str:
        while True:
            word = make().capitalize()
            if word not in self.used:
                self.used.add(word)
                return word

    def new(self) -> str:
        r = self.rng
        return self._take(lambda: r.choice(ONSETS) + r.choice(VOWELS) + r.choice(MARKERS) + self._tail())

    def twin(self, word: str) -> str:
        """A new word sharing `word`'s beginning up to and including its marker."""
        head = word[:3].lower() + word[3]  # onset, vowel, marker (2 letters)
        return self._take(lambda: head + self._tail())


def build_world(rng: random.Random, num_entities: int) -> dict[str, list[Entity]]:
    """The fictional knowledge base: entities by kind, each fact an attribute of its subject."""
    names = _Names(rng)
    n_countries = max(2, num_entities // 30)
    n_rivers = max(2, num_entities // 15)
    n_towns = max(5, num_entities // 5)
    n_orgs = max(5, num_entities // 6)
    n_persons = num_entities - n_countries - n_rivers - n_towns - n_orgs
    countries = [Entity("country", names.new(), attrs={"currency": names.new()}) for _ in range(n_countries)]
    rivers = [Entity("river", names.new() + " River", attrs={"country": rng.choice(countries).name})
              for _ in range(n_rivers)]

    def town(name: str, country: str, distractor=False) -> Entity:
        options = [r.name for r in rivers if r.attrs["country"] == country]
        river = rng.choice(options) if options and rng.random() < 0.7 else ""
        return Entity("town", name, distractor, {"country": country, "river": river})

    n_twins = n_towns // DISTRACTOR_SHARE
    towns = [town(names.new(), countries[i % n_countries].name) for i in range(n_towns - n_twins)]
    towns += [town(names.twin(t.name), rng.choice(countries).name, True) for t in rng.sample(towns, n_twins)]

    n_twins = n_orgs // DISTRACTOR_SHARE
    orgs = []
    for _ in range(n_orgs - n_twins):
        orgs.append(Entity("org", f"{names.new()} {rng.choice(ORG_KINDS)}",
                           attrs={"year": str(rng.randint(1750, 1990)), "town": rng.choice(towns).name}))
    for o in rng.sample(orgs, n_twins):  # same stem, another kind, a close year, a town of the same country
        stem, kind = o.name.split(" ")
        kind = rng.choice([k for k in ORG_KINDS if f"{stem} {k}" not in [x.name for x in orgs]])
        country = _by_name(towns)[o.attrs["town"]].attrs["country"]
        near = [t.name for t in towns if t.attrs["country"] == country]
        orgs.append(Entity("org", f"{stem} {kind}", True,
                           {"year": str(int(o.attrs["year"]) + rng.choice((-3, -2, -1, 1, 2, 3))), "town": rng.choice(near)}))

    n_twins = n_persons // DISTRACTOR_SHARE
    n_base = n_persons - n_twins
    given = [names.new() for _ in range(max(4, n_base // 4))]
    family = [names.new() for _ in range(max(4, n_base // 2))]
    pairs = rng.sample([(g, f) for g in given for f in family], n_base)
    persons = [Entity("person", f"{g} {f}", attrs={"town": rng.choice(towns).name, "occupation": rng.choice(OCCUPATIONS),
                                                   "org": rng.choice(orgs).name}) for g, f in pairs]
    for p in rng.sample(persons, n_twins):  # same given name and occupation, a family name that looks alike
        g, f = p.name.split(" ")
        persons.append(Entity("person", f"{g} {names.twin(f)}", True, {
            "town": rng.choice(towns).name, "occupation": p.attrs["occupation"], "org": rng.choice(orgs).name}))
    for o in orgs:  # founders neither work for it nor were born in its town (no passage pairs them twice)
        fit = [p.name for p in persons if p.attrs["org"] != o.name and p.attrs["town"] != o.attrs["town"]]
        o.attrs["founder"] = rng.choice(fit or [p.name for p in persons if p.attrs["org"] != o.name])
    return {"country": countries, "river": rivers, "town": towns, "org": orgs, "person": persons}


def _by_name(entities) -> dict[str, Entity]:
    return {e.name: e for e in entities}


_SENTENCES = {
    "person/a": ("{s} was born in {town}. {s} is a {occupation} by occupation.",
                 "{s} is a {occupation} by occupation. {s} was born in {town} and grew up there."),
    "person/b": ("{s} works for the {org}. {s} is known for careful work and a quiet life.",
                 "{s} works for the {org}, where {s} has spent many years."),
    "org/": ("The {s} was founded in {year} by {founder}. The headquarters of the {s} are in {town}.",
             "The {s} is an organisation founded by {founder} in {year}. Its headquarters are in {town}."),
    "town/": ("{s} is a town in the country of {country}. {s} is known for its old market.",
              "{s} is a small town in the country of {country}. Many people visit {s} in summer."),
    "town/river": ("{s} is a town in the country of {country}. The {river} flows through {s}.",
                   "{s} is a small town in the country of {country}. The {river} flows through {s} from the hills."),
    "country/": ("{s} is a country. The currency of {s} is the {currency}.",
                 "{s} is a country with many farms. The currency of {s} is the {currency}."),
    "river/": ("The {s} is a river in the country of {country}. It is known for its clear water.",
               "The {s} is a long river in the country of {country}."),
}


def passages_of(rng: random.Random, world) -> list[tuple[tuple[str, str], str, str]]:
    """((entity name, part), title, text) for every passage, in a seeded shuffled order."""
    out = []
    for kind, entities in world.items():
        for e in entities:
            parts = ("a", "b") if kind == "person" else ("",)
            for part in parts:
                key = f"{kind}/{part}"
                if kind == "town" and e.attrs["river"]:
                    key = "town/river"
                text = rng.choice(_SENTENCES[key]).format(s=e.name, **e.attrs)
                out.append(((e.name, part), e.name, text))
    rng.shuffle(out)
    return out


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(phrase.lower())}(?![\w])", text.lower()) is not None


def _candidates(world, subjects: list[Entity], pid: dict, text: dict) -> dict[str, list[dict]]:
    """Every askable question about `subjects`, by relation name."""
    entity = {e.name: e for es in world.values() for e in es}
    out: dict[str, list[dict]] = {}

    def hop(rel_name: str, subject: Entity):
        rel = REL[rel_name]
        value = subject.attrs[rel.attr]
        return (value, pid[(subject.name, rel.part)]) if value else (None, None)

    for s in subjects:
        for name, rel in REL.items():
            if rel.kind != s.kind:
                continue
            answer, p = hop(name, s)
            if answer is None:
                continue
            out.setdefault(name, []).append(dict(relation=name, hops=1, subject=s.name, bridge=None, path=[name],
                                                 answer=answer, support=[p], question=rel.question.format(s=s.name)))
        for name, (first, second, question, _) in MULTI.items():
            if REL[first].kind != s.kind:
                continue
            bridge, p1 = hop(first, s)
            if bridge is None:
                continue
            answer, p2 = hop(second, entity[bridge])
            if answer is None or _mentions(text[p1], answer):
                continue  # the first passage must not give the answer away
            out.setdefault(name, []).append(dict(relation=name, hops=2, subject=s.name, bridge=bridge,
                                                 path=[first, second], answer=answer, support=[p1, p2],
                                                 question=question.format(s=s.name)))
    return out


def _pick(rng: random.Random, by_relation: dict[str, list[dict]], n: int, what: str) -> list[dict]:
    """n questions, taken round-robin over the relations (each relation's candidates shuffled)."""
    pools = [list(v) for _, v in sorted(by_relation.items())]
    for p in pools:
        rng.shuffle(p)
    total = sum(len(p) for p in pools)
    if total < n:
        raise ValueError(f"only {total} {what} questions can be asked: raise --entities or lower the question counts")
    picked = []
    while len(picked) < n:
        for p in pools:
            if p and len(picked) < n:
                picked.append(p.pop())
    return picked


def _answers(answer: str) -> list[str]:
    return [answer, answer[: -len(" River")]] if answer.endswith(" River") else [answer]


def _queries(q: dict) -> list[str]:
    subjects = [q["subject"]] + ([q["bridge"]] if q["bridge"] else [])
    return [f"{s.lower()} {REL[r].key}" for s, r in zip(subjects, q["path"])]


def _own_output(out: str) -> bool:
    """Whether `out` holds only what make_qa writes, its questions marked generated."""
    names = set(os.listdir(out)) if os.path.isdir(out) else set()
    if not names <= {"corpus.jsonl", "train.parquet", "test.parquet"}:
        return False
    try:
        return all((pq.read_schema(os.path.join(out, n)).metadata or {}).get(GENERATED_KEY.encode())
                   for n in names if n.endswith(".parquet"))
    except Exception:  # unreadable parquet: not ours to overwrite
        return False


def make_qa(out: str, seed: int = 0, *, num_entities: int = 300, train_questions: int = 400,
            test_questions: int = 100) -> QAReport:
    """Write DIR/corpus.jsonl, DIR/train.parquet and DIR/test.parquet (all generated) and report them."""
    if num_entities < 40:
        raise ValueError(f"num_entities={num_entities} must be >= 40")
    if train_questions < 0 or test_questions < 0:
        raise ValueError("question counts must be >= 0")
    refuse_foreign_folder(out, _own_output(out), "stepopsd-make-qa")
    start = time.perf_counter()
    rng = random.Random(f"stepopsd-qa/{GENERATOR_VERSION}/{seed}")
    world = build_world(rng, num_entities)
    passages = passages_of(rng, world)
    pid = {key: str(i) for i, (key, _, _) in enumerate(passages)}
    text = {str(i): t for i, (_, _, t) in enumerate(passages)}

    # train and test ask about disjoint subjects (distractors are never asked about)
    subjects = [e for kind in ("person", "org", "town", "country") for e in world[kind] if not e.distractor]
    rng.shuffle(subjects)
    wanted = {"train": train_questions, "test": test_questions}
    n_test = round(len(subjects) * test_questions / max(1, train_questions + test_questions))
    if test_questions and not n_test:
        n_test = 1
    chosen = {"test": subjects[:n_test], "train": subjects[n_test:]}

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for i, (_, title, body) in enumerate(passages):
            f.write(passage_line(str(i), title, body) + "\n")
    report = QAReport(seed, {k: len(v) for k, v in world.items()},
                      sum(e.distractor for es in world.values() for e in es), len(passages))
    with Progress("questions", sum(wanted.values()), "question", description="Generating questions [generated]") as bar:
        for split in SPLITS:
            cands = _candidates(world, chosen[split], pid, text)
            n_multi = wanted[split] // 2
            single = _pick(rng, {k: v for k, v in cands.items() if k in REL}, wanted[split] - n_multi, f"{split} single-hop")
            multi = _pick(rng, {k: v for k, v in cands.items() if k in MULTI}, n_multi, f"{split} two-hop")
            rows = single + multi
            rng.shuffle(rows)
            for q in rows:
                if _mentions(q["question"], q["answer"]):  # by construction names are unique: never happens
                    raise AssertionError(f"answer {q['answer']!r} in question {q['question']!r}")
            _write_split(os.path.join(out, f"{split}.parquet"), split, rows, seed)
            report.questions[split] = {GENERATED_SINGLEHOP: len(single), GENERATED_MULTIHOP: len(multi)}
            report.relations[split] = {}
            for q in rows:
                report.relations[split][q["relation"]] = report.relations[split].get(q["relation"], 0) + 1
            bar.advance(len(rows))
    report.seconds = time.perf_counter() - start
    return report


def _write_split(path: str, split: str, rows: list[dict], seed: int) -> None:
    meta = [json.dumps({"relation": q["relation"], "hops": q["hops"], "subject": q["subject"], "bridge": q["bridge"],
                        "path": q["path"], "queries": _queries(q), "support": q["support"]}, sort_keys=True)
            for q in rows]
    table = pa.table({
        "id": [f"{split}_{i}" for i in range(len(rows))],
        "question": [q["question"] for q in rows],
        "golden_answers": [_answers(q["answer"]) for q in rows],
        "data_source": [GENERATED_MULTIHOP if q["hops"] == 2 else GENERATED_SINGLEHOP for q in rows],
        "metadata": meta,
    }, schema=SCHEMA)
    table = table.replace_schema_metadata({GENERATED_KEY: "1", "stepopsd_generator": f"stepopsd-make-qa v{GENERATOR_VERSION}",
                                           "stepopsd_seed": str(seed)})
    # fixed writer options: the bytes depend only on the rows (and the pyarrow version)
    pq.write_table(table, path, compression="snappy", version="2.6", data_page_version="1.0", use_dictionary=True,
                   write_statistics=True, store_schema=True, row_group_size=1 << 20)


def expert_steps(metadata, answers) -> list[tuple[str, str]]:
    """The expert's steps as (think text, action): one search per hop, then the answer."""
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    answer = list(answers)[0]
    path, queries = metadata["path"], metadata["queries"]
    names = [metadata["subject"]] + ([metadata["bridge"]] if metadata.get("bridge") else [])
    objects = names[1:] + [answer]
    steps = []
    for k, (rel_name, query) in enumerate(zip(path, queries)):
        rel = REL[rel_name]
        need = rel.need.format(s=names[k])
        if k == 0:
            think = f"i need {need}." if len(path) == 1 else \
                f"i need {MULTI[metadata['relation']][3].format(s=names[0])}. first i need {need}."
        else:
            think = f"{REL[path[k - 1]].found.format(s=names[k - 1], o=objects[k - 1])}. now i need {need}."
        steps.append((think.lower(), f"<search> {query} </search>"))
    last = REL[path[-1]].found.format(s=names[-1], o=answer)
    steps.append((f"{last}. the answer is {answer}.".lower(), f"<answer> {answer} </answer>"))
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stepopsd-make-qa", description=(
        "Write a GENERATED Search-QA data set in Search-R1's formats: a fictional knowledge base as a wiki-18 "
        "style corpus.jsonl, and train/test parquet files of single-hop and two-hop questions answerable only by "
        "searching it. Never report results on it as NQ, HotpotQA or any other Search-R1 result."))
    p.add_argument("--out", required=True, help="output folder: corpus.jsonl, train.parquet, test.parquet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entities", type=int, default=300, help="entities in the knowledge base, distractors included")
    p.add_argument("--train", type=int, default=400, help="train questions (about half two-hop)")
    p.add_argument("--test", type=int, default=100, help="test questions (about half two-hop)")
    a = p.parse_args(argv)
    try:
        report = make_qa(a.out, a.seed, num_entities=a.entities, train_questions=a.train, test_questions=a.test)
    except (ValueError, OSError, UserError) as e:
        print(f"stepopsd-make-qa: error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"wrote generated Search-QA data to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
