"""The teacher's context (`algorithm.teacher.context`, stepopsd/hindsight.py, stepopsd/estimators/teacher_shaped.py):
`hindsight` (StepOPSD's block before the step's target, the default, unchanged) or `skills` (SDAR's: the skill
document of the trajectory's task type before the whole prompt, from a folder in SDAR's layout).

The skills folders here are written by the tests (a few words of our own per task type, in SDAR's layout:
skill_mapping.json with skill_files and task_to_skill, keyed by SDAR's ALFWorld task names). On-policy trajectories
of a one-layer tiny Qwen3 on a word tokenizer (`helpers.records`); group 0 plays a clean task, group 1 a heat task.
"""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from stepopsd.config import ConfigError, check_config, check_teacher_context
from stepopsd.data.batch import build_batch
from stepopsd.estimators import Context, Services, build_estimator
from stepopsd.hindsight import (SKILL_HEADER, SkillDocs, SkillsError, hindsight_blocks, search_task_types,
                                skill_block, skill_blocks, teacher_inputs)
from stepopsd.teacher import teacher_target_logprobs

from helpers.batches import with_advantages
from helpers.configs import heat_cpu_cfg
from helpers.records import model, onpolicy_trajs, tok  # noqa: F401  (fixtures)
from helpers.tiny_policy import ids_of

# our own words (in the tiny tokenizer's vocabulary where it matters), one document per SDAR ALFWorld skill
DOCS = {
    "general_skills": "look at each countertop first.",
    "pick_and_place": "take it then put it in the cabinet.",
    "look_at_obj_in_light": "take it then look at it.",
    "clean": "take the mug then clean it with the sinkbasin.",
    "heat": "take the mug then go to the drawer.",
    "cool": "take the mug then go to the fridge.",
}
SDAR_ALFWORLD_TASKS = {  # SDAR's task_to_skill keys for ALFWorld (its task names, matched in the game's path)
    "pick_and_place": "pick_and_place", "pick_two_obj_and_place": "pick_and_place",
    "look_at_obj_in_light": "look_at_obj_in_light", "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool", "pick_clean_then_place_in_recep": "clean",
}


def write_skills(folder, docs=DOCS, tasks=SDAR_ALFWORLD_TASKS):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / f"{name}.md").write_text(f"{text}\n")  # read stripped
    (folder / "skill_mapping.json").write_text(json.dumps({"skill_files": {n: f"{n}.md" for n in docs},
                                                           "task_to_skill": tasks}))
    return str(folder)


@pytest.fixture
def skills_dir(tmp_path):
    return write_skills(tmp_path / "skills" / "alfworld")


def doc(name):
    return DOCS[name]


@pytest.fixture(scope="module")
def mixed_trajs(onpolicy_trajs):
    """Group 0 a clean task, group 1 a heat task (the same steps as `onpolicy_trajs`)."""
    heat = lambda t: dataclasses.replace(t, task=dataclasses.replace(t.task, task_type="heat"))
    return [t if t.group == 0 else heat(t) for t in onpolicy_trajs]


def batch_of(tok, trajs):
    return with_advantages(build_batch(trajs, pad_id=tok.pad_token_id)[0])


def shaped(name, tok, context=None, **knobs):
    """A teacher-shaped estimator `name` over GRPO, its teacher the live policy, bound to ALFWorld."""
    algorithm = {"name": name, **knobs}
    if context is not None:
        algorithm["teacher"] = context
    est = build_estimator(algorithm)
    est.bind_env("alfworld", ["clean", "heat"])
    est.services = Services(tokenizer=tok)
    return est


def test_skill_text_is_general_then_the_task_types_document(skills_dir):
    docs = SkillDocs.load(skills_dir)
    assert docs.text("alfworld", "heat") == doc("general_skills") + "\n\n" + doc("heat")
    assert docs.text("alfworld", "clean") == doc("general_skills") + "\n\n" + doc("clean")
    # SDAR's keys are matched in the task folder name: pick_and_place_simple -> pick_and_place (not pick_two's)
    assert docs.text("alfworld", "pick").endswith(doc("pick_and_place"))
    assert docs.text("alfworld", "pick_two").endswith(doc("pick_and_place"))
    assert docs.text("alfworld", "look").endswith(doc("look_at_obj_in_light"))
    every = SkillDocs.load(skills_dir, skill_all=True).text("alfworld", "heat")  # general first, then every document
    assert every == "\n\n".join(doc(n) for n in DOCS)
    assert skill_block("x") == f"{SKILL_HEADER}\nx\n\n"


def test_our_own_task_type_names_and_searchs_data_sources(tmp_path):
    own = SkillDocs.load(write_skills(tmp_path / "own", tasks={"heat": "cool"}))
    assert own.text("alfworld", "heat").endswith(doc("cool"))  # our short name as a key wins
    search_docs = {"general_skills": "search first.", "direct_retrieval": "one search.",
                   "multi_hop_reasoning": "one search per hop.", "entity_attribute_lookup": "search the entity."}
    search = SkillDocs.load(write_skills(tmp_path / "search", search_docs,
                                         {n: n for n in search_docs if n != "general_skills"}))
    for source, skill in [("nq", "direct_retrieval"), ("triviaqa", "direct_retrieval"), ("popqa", "entity_attribute_lookup"),
                          ("hotpotqa", "multi_hop_reasoning"), ("musique", "multi_hop_reasoning"),
                          ("generated_singlehop", "direct_retrieval"), ("generated_multihop", "multi_hop_reasoning")]:
        assert search.text("search", source) == f"search first.\n\n{search_docs[skill]}"
    with pytest.raises(SkillsError, match="no skill document for search task type 'webq'") as e:
        search.text("search", "webq")
    assert "\n" not in str(e.value)


def test_search_task_types_of_the_run(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = lambda **data: OmegaConf.create({"data": {"train_split": "train", "path": None, "generate": None, **data}})
    assert search_task_types(cfg(task_types=["nq", "hotpotqa"])) == ["nq", "hotpotqa"]
    assert search_task_types(cfg(task_types=["all"], path=str(tmp_path), generate={"seed": 0})) == \
        ["generated_singlehop", "generated_multihop"]  # make_qa will write them
    assert search_task_types(cfg(task_types=["all"], path=str(tmp_path))) is None  # not known before loading
    pq.write_table(pa.table({"question": ["a", "b", "c"], "data_source": ["nq", "hotpotqa", "nq"]}),
                   tmp_path / "train.parquet")
    assert search_task_types(cfg(task_types=["all"], path=str(tmp_path))) == ["hotpotqa", "nq"]


def test_the_skill_block_goes_before_the_prompt_and_the_targets_are_the_same_tokens(tok, mixed_trajs, skills_dir):
    batch = batch_of(tok, mixed_trajs)
    docs = SkillDocs.load(skills_dir)
    skills = skill_blocks(batch.trajectories, docs, "alfworld")
    assert all(s == skill_block(docs.text("alfworld", t.task.task_type)) for s, t in zip(skills, batch.trajectories))
    assert {t.task.task_type for t in batch.trajectories} == {"clean", "heat"}
    hind = hindsight_blocks(batch.trajectories, tok)
    ts = teacher_inputs(batch.step_ids, batch.input_ids, batch.row_traj, skills, tok, pad_id=tok.pad_token_id,
                        before="prompt")
    th = teacher_inputs(batch.step_ids, batch.input_ids, batch.row_traj, hind, tok, pad_id=tok.pad_token_id)
    assert torch.equal(ts.rows, th.rows) and torch.equal(ts.batch_pos, th.batch_pos)  # the same target tokens
    for i, r in enumerate(ts.rows.tolist()):
        block = ids_of(tok, skills[int(batch.row_traj[r])])
        te = int(ts.batch_pos[i].max()) + 1  # the row is cut after its target
        expected = block + batch.input_ids[r, :te].tolist()  # s_i, then the student's row exactly
        assert ts.input_ids[i, :len(expected)].tolist() == expected and int(ts.attention_mask[i].sum()) == len(expected)
        valid = ts.target_pos[i] >= 0
        assert torch.equal(ts.input_ids[i, ts.target_pos[i][valid]], th.input_ids[i, th.target_pos[i][valid]])
        assert torch.equal(ts.input_ids[i, ts.target_pos[i][valid]], batch.input_ids[r, ts.batch_pos[i][valid]])
        kind = batch.trajectories[int(batch.row_traj[r])].task.task_type
        text = tok.decode(block)
        assert DOCS[kind] in text and DOCS["general_skills"] in text  # the task type's own document
        assert DOCS["heat" if kind == "clean" else "clean"] not in text
    hindsight_tag = tok.convert_tokens_to_ids("<hindsight>")
    assert not (ts.input_ids == hindsight_tag).any() and (th.input_ids == hindsight_tag).any()


@pytest.mark.parametrize("name", ["rlsd", "sdar", "opsd", "grpo_opsd", "stepopsd"])
def test_skills_change_the_teachers_logprobs_on_the_same_targets(tok, model, mixed_trajs, skills_dir, name):
    batch = batch_of(tok, mixed_trajs)
    knobs = {"stepopsd": {"lam0": 0.2}} if name == "stepopsd" else {}
    hind = shaped(name, tok, **knobs).teacher_logprobs(batch, model, 512)
    skill = shaped(name, tok, {"context": "skills", "skills_dir": skills_dir}, **knobs).teacher_logprobs(batch, model, 512)
    target = batch.step_ids >= 0
    assert torch.equal(hind != 0, target) and torch.equal(skill != 0, target)  # the same tokens scored
    assert (hind[target] - skill[target]).abs().max() > 1e-4  # another context, other log-probs

    # the whole estimator runs on it (no fallback to the base), and its result differs from the hindsight one's
    outs = []
    for context in (None, {"context": "skills", "skills_dir": skills_dir}):
        est = shaped(name, tok, context, **knobs)
        est.setup(model, Services(tokenizer=tok))
        out = est.advantages(batch, Context(step=0, policy=model))
        assert out.metrics[f"{name}/rescoring_failed"] == 0.0
        outs.append(out)
    if name in ("rlsd", "stepopsd"):
        assert not torch.equal(outs[0].tokens, outs[1].tokens)
    else:
        assert not torch.equal(outs[0].teacher_logp, outs[1].teacher_logp)


@pytest.mark.parametrize("name", ["rlsd", "sdar", "stepopsd"])
def test_hindsight_is_exactly_todays_teacher(tok, model, mixed_trajs, name):
    batch = batch_of(tok, mixed_trajs)
    knobs = {"stepopsd": {"lam0": 0.2}} if name == "stepopsd" else {}
    today = teacher_target_logprobs(model, batch, hindsight_blocks(batch.trajectories, tok, peer_budget=512), tok,
                                    pad_id=tok.pad_token_id, micro_batch=8)
    outs = []
    for context in (None, {"context": "hindsight"}, {"context": "hindsight", "micro_batch_rows": 8}):
        est = shaped(name, tok, context, **knobs)
        assert est.skills is None
        assert torch.equal(est.teacher_logprobs(batch, model, 512), today)
        est.setup(model, Services(tokenizer=tok))
        outs.append(est.advantages(batch, Context(step=0, policy=model)))
    for out in outs[1:]:
        assert torch.equal(out.tokens, outs[0].tokens)
        assert (out.teacher_logp is None) == (outs[0].teacher_logp is None)
        assert out.teacher_logp is None or torch.equal(out.teacher_logp, outs[0].teacher_logp)


def one_line(error, match):
    assert match in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("teacher, match", [
    ({"context": "skills"}, "algorithm.teacher.context=skills needs algorithm.teacher.skills_dir"),
    ({"context": "skills", "skills_dir": "/no/such/skills"}, "algorithm.teacher.skills_dir=/no/such/skills: no such folder"),
    ({"context": "memories"}, "algorithm.teacher.context=memories: use hindsight or skills"),
    ({"skills_dir": "skills/alfworld"}, "read with algorithm.teacher.context=skills only"),
    ({"skill_all": True}, "read with algorithm.teacher.context=skills only"),
])
def test_bad_teacher_knobs_are_one_line(teacher, match):
    with pytest.raises(ValueError) as e:
        build_estimator({"name": "rlsd", "teacher": teacher})
    one_line(e, match)


def test_bad_skills_folders_are_one_line(tmp_path, skills_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SkillsError) as e:
        SkillDocs.load(str(empty))
    one_line(e, "no skill_mapping.json in it")
    broken = tmp_path / "broken"
    write_skills(broken)
    (broken / "heat.md").unlink()
    with pytest.raises(SkillsError) as e:
        SkillDocs.load(str(broken))
    one_line(e, "skill 'heat' names heat.md, which is not a readable file")
    (broken / "skill_mapping.json").write_text("{not json")
    with pytest.raises(SkillsError) as e:
        SkillDocs.load(str(broken))
    one_line(e, "not readable JSON")
    (broken / "skill_mapping.json").write_text(json.dumps({"skill_files": {}}))
    with pytest.raises(SkillsError) as e:
        SkillDocs.load(str(broken))
    one_line(e, 'needs "skill_files"')

    no_heat = write_skills(tmp_path / "no_heat", {k: v for k, v in DOCS.items() if k != "heat"},
                           {k: v for k, v in SDAR_ALFWORLD_TASKS.items() if v != "heat"})
    est = build_estimator({"name": "sdar", "teacher": {"context": "skills", "skills_dir": no_heat}})
    est.bind_env("alfworld", ["clean"])  # the run's data has no heat task: fine
    with pytest.raises(SkillsError) as e:
        est.bind_env("alfworld", ["clean", "heat"])
    one_line(e, "no skill document for alfworld task type 'heat'")
    dangling = write_skills(tmp_path / "dangling", {k: v for k, v in DOCS.items() if k != "heat"})
    with pytest.raises(SkillsError) as e:
        SkillDocs.load(dangling).check("alfworld", ["heat"])
    one_line(e, "task_to_skill maps it to 'heat', which skill_files does not name")

    est = build_estimator({"name": "opsd", "teacher": {"context": "skills", "skills_dir": skills_dir}})
    with pytest.raises(SkillsError) as e:
        est.bind_env("webshop", None)
    one_line(e, "env=webshop has no task-type mapping to skill documents")
    every = build_estimator({"name": "opsd", "teacher": {"context": "skills", "skills_dir": skills_dir, "skill_all": True}})
    every.bind_env("webshop", None)  # skill_all: every task gets every document, no mapping needed
    anything = SimpleNamespace(task=SimpleNamespace(task_type="anything"))
    assert every.skill_context([anything]) == ([skill_block("\n\n".join(doc(n) for n in DOCS))], "prompt")


def test_check_config_checks_the_skills_before_any_work(tmp_path, skills_dir):
    ok = heat_cpu_cfg("algorithm=rlsd", "algorithm.teacher.context=skills", f"algorithm.teacher.skills_dir={skills_dir}")
    _, est, _ = check_config(ok)
    assert est.env == "alfworld" and est.skills.folder == skills_dir
    no_heat = write_skills(tmp_path / "no_heat", {k: v for k, v in DOCS.items() if k != "heat"},
                           {k: v for k, v in SDAR_ALFWORLD_TASKS.items() if v != "heat"})
    for overrides, match in [
        (["algorithm=sdar", "algorithm.teacher.context=skills", f"algorithm.teacher.skills_dir={no_heat}"],
         "no skill document for alfworld task type 'heat'"),
        (["algorithm=grpo_opsd", "algorithm.teacher.context=skills", f"algorithm.teacher.skills_dir={tmp_path}/none"],
         "no such folder"),
        (["algorithm=grpo", "algorithm.teacher.context=skills", f"algorithm.teacher.skills_dir={skills_dir}"],
         "algorithm.teacher.context=skills: algorithm=grpo has no teacher"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_config(heat_cpu_cfg(*overrides))
        one_line(e, match)
    cfg = heat_cpu_cfg("algorithm=stepopsd")  # the default: hindsight, nothing read
    _, est, _ = check_config(cfg)
    assert est.context == "hindsight" and est.skills is None and est.env == "alfworld"
    check_teacher_context(heat_cpu_cfg("algorithm=grpo"), build_estimator({"name": "grpo"}))  # no teacher, no knob
