"""A tiny retrieval corpus of fictional facts (no real entity, so no model can know the answers), as a JSONL file."""
from stepopsd.envs.search.corpus import passage_line

FACTS = [  # fictional entities only
    ("Zorblat", "Zorblat is the capital of Quenland, founded by the tinker Ossa Brell."),
    ("Quenland", "Quenland is a kingdom on the Grey Sea ruled by Queen Mirra Vantis."),
    ("Mirra Vantis", "Mirra Vantis was born in the harbour town of Vellow in 1802."),
    ("Vellow", "Vellow is a fishing port known for its copper lighthouse."),
    ("Grey Sea", "The Grey Sea is a cold inland sea fed by the river Ostrel."),
    ("Ostrel", "The Ostrel river rises in the Dunmarch hills and carries amber silt."),
    ("Dunmarch", "Dunmarch is a range of hills where shepherds breed woolly kettlegoats."),
    ("Kettlegoat", "The kettlegoat is a goat breed whose milk is made into sharp blue cheese."),
    ("Ossa Brell", "Ossa Brell was a tinker and clockmaker who designed the Zorblat tower clock."),
    ("Tharnwick College", "Tharnwick College is a school of astronomy with a brass orrery."),
    ("Pellumy", "Pellumy is a card game played with seventy painted tiles."),
    ("Ivo Sarrent", "Ivo Sarrent composed the opera The Lantern Thief in Zorblat."),
]


def write_corpus(path, facts=FACTS):
    """`facts` (title, text) as passage lines in the JSONL file `path`; returns the path as a string."""
    path.write_text("".join(passage_line(str(i), t, x) + "\n" for i, (t, x) in enumerate(facts)))
    return str(path)
