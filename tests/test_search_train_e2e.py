"""Search-QA through the real entry points on generated data: `train.py experiment=searchqa_triviaqa
machine=cpu` (the run starts and stops its own BM25 retriever server) and `eval.py`."""
import csv
import json
import os
import subprocess
import sys

import pytest

from stepopsd.envs.search.data import load_questions
from stepopsd.envs.search.demos import search_demos
from stepopsd.envs.search.generate import make_qa
from stepopsd.envs.search.protocol import parse_step
from stepopsd.envs.search.retrieval import BM25Retriever

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    make_qa(str(out), 0, num_entities=120, train_questions=40, test_questions=8)
    return out


def overrides(qa, cache, out):
    return [f"data.path={qa}", "data.generate=null", f"paths.cache_dir={cache}", f"hydra.run.dir={out}",
            "training_steps=2", "tasks_per_step=2", "group_size=2", "val_tasks=2", "val_every=1", "val_samples=1",
            "rollout.max_new_tokens=32", "model.sft.epochs=1", "model.vocab_size=1024",
            "model.architecture.hidden_size=32", "model.architecture.num_layers=1",
            "model.architecture.intermediate_size=64", "algorithm.ppo.entropy_coef=0.01"]


def test_expert_demonstrations_play_through_the_real_env_and_retriever(qa):
    tasks = load_questions(str(qa), "train")
    records = search_demos(tasks, BM25Retriever(str(qa / "corpus.jsonl")), compact=True)
    assert len({r["task_id"] for r in records}) == len(tasks)  # the expert answers every question
    assert all(parse_step(r["response"]).valid for r in records)
    later = [r for r in records if "step: 0" not in r["prompt"]]
    assert later and all("<information>Doc 1(Title:" in r["prompt"] for r in later)
    assert all(r["data"] == "generated" for r in records)


def test_train_searchqa_on_generated_data_with_its_own_retriever_server(qa, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "train.py", "experiment=searchqa_triviaqa", "machine=cpu",
                           *overrides(qa, cache, out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[retriever] BM25 server on" in proc.stdout and "[generated data]" in proc.stdout
    rows = list(csv.DictReader(open(out / "csv" / "version_0" / "metrics.csv")))
    steps = [r for r in rows if r.get("actor/pg_loss")]
    assert len(steps) == 2 and abs(float(steps[0]["stepopsd/lambda"]) - 0.05) < 1e-6  # the TriviaQA knob
    val = [r for r in rows if r.get("val_generated/test/em")]
    assert len(val) == 3  # start, after step 1, end
    for source in ("generated_singlehop", "generated_multihop"):  # EM per data source
        assert all(r[f"val_generated/test/em_{source}"] != "" for r in val)

    proc = subprocess.run([sys.executable, "eval.py", "experiment=searchqa_triviaqa", "machine=cpu",
                           *overrides(qa, cache, out / "eval")[:4], f"eval.policy={out / 'policy'}", "eval.limit=2",
                           "model.vocab_size=1024"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out / "eval" / "eval.json"))
    assert result["data"] == "generated" and result["episodes"] == 4
    assert set(result["em_by_type"]) == {"generated_singlehop", "generated_multihop"}


class ScriptedBackend:
    """Plays given responses as if sampled (a stand-in for the policy, not for the parts under test)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script

    def generate(self, prompts, sampling, *, seed=0):
        from stepopsd.policy.backends.base import Generation

        out = []
        for ids in prompts:
            question = self.tokenizer.decode(ids).rsplit("question:", 1)[-1]
            text = self.script(question, "<information>" in self.tokenizer.decode(ids))
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(Generation(tuple(tokens), tuple(-0.5 for _ in tokens), "stop"))
        return out

    def sync_weights(self, model):
        pass


def test_information_blocks_never_reach_the_loss_or_the_step_targets(qa):
    """The real rollout loop, SearchEnv and BM25 retriever: retrieved passages arrive in the next
    prompt (loss mask 0) and are never inside a step target span, even when the model itself writes
    an `<information>` block into its response."""
    from stepopsd.data.batch import build_batch
    from stepopsd.envs.search.env import SearchEnv
    from stepopsd.policy.tokenizer import train_word_tokenizer
    from stepopsd.rollout import RolloutConfig, rollout

    corpus = str(qa / "corpus.jsonl")
    tasks = load_questions(str(qa), "train")[:3]
    retriever = BM25Retriever(corpus)
    texts = [json.loads(line)["contents"] for line in open(corpus)] + [t.question for t in tasks]
    texts += ["<think> i look it up </think> <search> </search> <answer> </answer> <information> </information> "
              "question: step: doc title write then or ..."]
    tok = train_word_tokenizer(texts, vocab_size=4096)

    def script(question, searched):
        if not searched:  # first step: search, with a hallucinated information block before the action
            return f"<think> i look it up </think> <information> made up </information> <search> {question} </search>"
        return "<think> i look it up </think> <answer> title </answer>"

    env = SearchEnv(retriever, compact=True)
    trajectories, _ = rollout(env, ScriptedBackend(tok, script), tok, tasks,
                              RolloutConfig(group_size=2, chat_template=False, target_mode="clean_step_no_observation"))
    batch, _ = build_batch(trajectories, pad_id=tok.pad_token_id)
    info_id = tok.convert_tokens_to_ids("<information>")
    doc_id = tok.convert_tokens_to_ids("doc")
    prompts_with_info = 0
    for r in range(batch.num_rows):
        ids = batch.input_ids[r]
        p = int(batch.prompt_lens[r])
        prompts_with_info += bool((ids[:p] == doc_id).any())  # retrieved passages are in the prompt ...
        assert batch.loss_mask[r, :p].sum() == 0  # ... which is never in the loss
        assert not (ids[batch.loss_mask[r].bool()] == doc_id).any()
        target = ids[batch.step_ids[r] >= 0]
        assert len(target), batch.trajectories[int(batch.row_traj[r])].steps[int(batch.row_step[r])].response
        assert not (target == info_id).any()  # targets hold reasoning + action only
    assert prompts_with_info == len(trajectories)  # every second step saw the retrieved passages
