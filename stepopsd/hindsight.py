"""Hindsight teacher contexts (spec §6, Eq. 2-3) on token ids.

For a step row with prompt P, response tokens y and target span Z = y[ts:te]:

    (Eq. 2) student context c^S = P ⊕ y[:ts]           — exactly what the policy saw
    (Eq. 3) teacher context c^T = P ⊕ y[:ts] ⊕ h_i     — the hindsight block right before Z

and both are followed by Z, whose tokens are rescored. The student side is the rollout row
itself, so nothing of h_i can reach it or the rollout. h_i is plain text:

    <hindsight>
    final_correctness: correct | incorrect
    peer_correct_trajectory:                 (failed member of a mixed group only)
    <peer_correct_trajectory>
    ...the group's first successful member, serialised and cut from the front to a token budget...
    </peer_correct_trajectory>
    </hindsight>

ALFWorld serialises a peer as its numbered action list (observations dropped) [spec choice].

SDAR's teacher context (`algorithm.teacher.context=skills`, for the SDAR baselines as SDAR's trainers run them;
docs/estimators.md): instead of h_i, a hand-written skill document for the trajectory's task type, read from a folder
in SDAR's layout (`skill_mapping.json` + markdown files: `SkillDocs`), placed where SDAR places it, before the whole
prompt:

    c^T = s_i ⊕ P ⊕ y[:ts]      s_i = "[Privileged Skill Information]\n" + general ⊕ "\n\n" ⊕ task document + "\n\n"

followed by the same target tokens Z.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from stepopsd.envs.alfworld.prompts import peer_lines as alfworld_peer_lines  # noqa: F401  (the default serialisation)
from stepopsd.envs.alfworld.tasks import TASK_TYPES as ALFWORLD_FOLDERS
from stepopsd.errors import UserError
from stepopsd.types import Trajectory

CONTEXTS = ("hindsight", "skills")  # algorithm.teacher.context


def fit_from_front(lines: list[str], tokenizer, budget: int) -> str:
    """Join the lines, dropping whole lines from the front until the text fits `budget` tokens."""
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        n = len(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
        if used + n > budget:
            break
        kept.append(line)
        used += n
    return "\n".join(reversed(kept))


def hindsight_text(success: bool, peer: str | None = None) -> str:
    """The hindsight block h_i (Eq. 3); `peer` only for a failed member of a mixed group."""
    lines = ["<hindsight>", f"final_correctness: {'correct' if success else 'incorrect'}"]
    if peer is not None:
        lines += ["peer_correct_trajectory:", "<peer_correct_trajectory>", peer, "</peer_correct_trajectory>"]
    return "\n" + "\n".join(lines + ["</hindsight>"]) + "\n"


def hindsight_blocks(trajectories: Sequence[Trajectory], tokenizer, *, peer_budget: int = 512,
                     serialise=alfworld_peer_lines) -> list[str]:
    """h_i for every trajectory: correctness, plus the first successful sibling for a failed member
    of a mixed group (0 < #successes < G)."""
    first_success: dict[int, Trajectory] = {}
    for t in trajectories:
        if t.success and t.group not in first_success:
            first_success[t.group] = t
    blocks = []
    for t in trajectories:
        peer = first_success.get(t.group)
        text = fit_from_front(serialise(peer), tokenizer, peer_budget) if (peer is not None and not t.success) else None
        blocks.append(hindsight_text(t.success, text))
    return blocks


# --- SDAR's teacher context: skill documents per task type (algorithm.teacher.context=skills) ---------------------

SKILL_HEADER = "[Privileged Skill Information]"  # the line SDAR's teacher prompt opens with
GENERAL_SKILLS = "general_skills"  # the document every task type gets first (SDAR's name in skill_mapping.json)
SKILL_MAPPING = "skill_mapping.json"


class SkillsError(UserError, ValueError):
    """A skills folder, or a task type without a document in it: one line."""


def alfworld_skill_key(task_type: str, task_to_skill: Mapping[str, str]) -> str | None:
    """SDAR's rule: the first `task_to_skill` key (in file order) found in the game's path, here in its ALFRED task
    folder name (our `pick` is `pick_and_place_simple`, which SDAR's key `pick_and_place` matches)."""
    folder = ALFWORLD_FOLDERS.get(task_type)
    return next((k for k in task_to_skill if folder and k in folder), None)


# SDAR's data-source table (rlsd_utils.py, get_privileged_info_from_data_source); the generated sources are ours.
# SDAR's `compare` rule (the prompt has "which" and "or" but not "for") never fires under its own Search prompt,
# which says "respond for the current step": left out.
SEARCH_SKILL_KEYS = {
    "popqa": "entity_attribute_lookup",
    "nq": "direct_retrieval", "triviaqa": "direct_retrieval",
    "hotpotqa": "multi_hop_reasoning", "2wikimultihopqa": "multi_hop_reasoning", "musique": "multi_hop_reasoning",
    "bamboogle": "multi_hop_reasoning",
    "generated_singlehop": "direct_retrieval", "generated_multihop": "multi_hop_reasoning",  # [choice] ours
}


def search_skill_key(task_type: str, task_to_skill: Mapping[str, str]) -> str | None:
    return SEARCH_SKILL_KEYS.get(task_type)


def alfworld_task_types(cfg) -> list[str]:
    from stepopsd.envs.alfworld.tasks import resolve_task_types

    return list(resolve_task_types(list(cfg.data.task_types)))


def search_task_types(cfg) -> list[str] | None:
    """The data sources of the training split: the configured ones, or with `all` those of its parquet file (one
    column read), or the generated ones when `data.generate` will write it; None when not known before loading."""
    wanted = [str(t) for t in cfg.data.task_types]
    if "all" not in wanted:
        return wanted
    from stepopsd.envs.search.data import GENERATED_MULTIHOP, GENERATED_SINGLEHOP, parquet_path

    file = parquet_path(str(cfg.data.path), cfg.data.train_split) if cfg.data.path else None
    if file and os.path.isfile(file):
        import pyarrow.parquet as pq

        try:
            return sorted(set(map(str, pq.read_table(file, columns=["data_source"]).column(0).to_pylist())))
        except Exception:  # not a readable Search-R1 parquet: the loader says so (one line)
            return None
    return [GENERATED_SINGLEHOP, GENERATED_MULTIHOP] if cfg.data.get("generate") is not None else None


@dataclass(frozen=True)
class SkillEnv:
    """How an environment's task types find their skill documents: `key(task_type, task_to_skill)`, SDAR's key for
    our task type (None: none), and `task_types(cfg)`, the task types of a run's training data (None: unknown)."""

    key: Callable[[str, Mapping[str, str]], str | None]
    task_types: Callable[[Any], list[str] | None]
    hint: Callable[[str], str]  # SDAR's key for a task type, in words (for the error)


# the environments SDAR gives skills to (its WebShop is not one of ours); another environment takes skill_all=true
SKILL_ENVS = {
    "alfworld": SkillEnv(alfworld_skill_key, alfworld_task_types,
                         lambda t: f"a key found in the task folder name {ALFWORLD_FOLDERS.get(t, t)}"),
    "search": SkillEnv(search_skill_key, search_task_types,
                       lambda t: repr(SEARCH_SKILL_KEYS[t]) if t in SEARCH_SKILL_KEYS else "none for this data source"),
}


@dataclass(frozen=True)
class SkillDocs:
    """A skills folder in SDAR's layout: `skill_mapping.json` with `skill_files` (skill name -> markdown file in the
    folder) and `task_to_skill` (task key -> skill name), and the documents it names (stripped, in `skill_files`
    order). A task type's text is the `general_skills` document, a blank line, and its task's document; with
    `skill_all`, every document (general first) for every task type, as SDAR's `skill_all`."""

    folder: str
    documents: dict[str, str]
    task_to_skill: dict[str, str]
    skill_all: bool = False

    @classmethod
    def load(cls, folder: str | None, skill_all: bool = False) -> "SkillDocs":
        key = "algorithm.teacher.skills_dir"
        if not folder:
            raise SkillsError(f"algorithm.teacher.context=skills needs {key}: a folder with {SKILL_MAPPING} and the "
                              "skill documents it names (SDAR's layout, e.g. SDAR's skills/alfworld)")
        path = os.path.expanduser(str(folder))
        if not os.path.isdir(path):
            raise SkillsError(f"{key}={folder}: no such folder")
        mapping_file = os.path.join(path, SKILL_MAPPING)
        try:
            with open(mapping_file) as f:
                mapping = json.load(f)
        except FileNotFoundError:
            raise SkillsError(f"{key}={folder}: no {SKILL_MAPPING} in it (SDAR's layout: skill_files and "
                              "task_to_skill)") from None
        except (OSError, ValueError) as e:
            raise SkillsError(f"{mapping_file}: not readable JSON ({str(e).splitlines()[0]})") from None
        files, tasks = (mapping.get(k) if isinstance(mapping, dict) else None for k in ("skill_files", "task_to_skill"))
        if not isinstance(files, dict) or not isinstance(tasks, dict):
            raise SkillsError(f"{mapping_file}: needs \"skill_files\" (skill name -> file) and \"task_to_skill\" "
                              "(task -> skill name) objects")
        documents = {}
        for name, file in files.items():
            try:
                with open(os.path.join(path, str(file))) as f:
                    documents[str(name)] = f.read().strip()
            except OSError:
                raise SkillsError(f"{mapping_file}: skill {name!r} names {file}, which is not a readable file in "
                                  f"{folder}") from None
        return cls(str(folder), documents, {str(k): str(v) for k, v in tasks.items()}, bool(skill_all))

    def text(self, env: str, task_type: str) -> str:
        """The skill text of task type `task_type` of environment `env` (SkillsError, one line, when it has none)."""
        general = self.documents.get(GENERAL_SKILLS, "")
        if self.skill_all:
            return "\n\n".join([general] + [d for n, d in self.documents.items() if n != GENERAL_SKILLS])
        if env not in SKILL_ENVS:
            raise SkillsError(f"algorithm.teacher.context=skills: env={env} has no task-type mapping to skill documents "
                              f"({', '.join(SKILL_ENVS)} do); set algorithm.teacher.skill_all=true to give every task "
                              "every document")
        key = task_type if task_type in self.task_to_skill else SKILL_ENVS[env].key(task_type, self.task_to_skill)
        skill = self.task_to_skill.get(key) if key is not None else None
        if skill is None or skill not in self.documents:
            why = (f"task_to_skill has no key for it: neither {task_type!r} nor SDAR's "
                   f"({SKILL_ENVS[env].hint(task_type)})" if skill is None
                   else f"task_to_skill maps it to {skill!r}, which skill_files does not name")
            raise SkillsError(f"algorithm.teacher.skills_dir={self.folder}: no skill document for {env} task type "
                              f"{task_type!r} ({SKILL_MAPPING}: {why})")
        return "\n\n".join([general, self.documents[skill]])

    def check(self, env: str, task_types: Sequence[str] | None) -> None:
        """Every task type of a run's data has its document (and `env` a mapping, unless `skill_all`)."""
        if not self.skill_all and env not in SKILL_ENVS:
            self.text(env, "")  # its one-line error
        for t in task_types or ():
            self.text(env, t)


def skill_block(text: str) -> str:
    """s_i: SDAR's teacher-prompt prefix, placed before the whole prompt (chat template included)."""
    return f"{SKILL_HEADER}\n{text}\n\n"


def skill_blocks(trajectories: Sequence[Trajectory], skills: SkillDocs, env: str) -> list[str]:
    """s_i for every trajectory: the skill document of its task type."""
    texts: dict[str, str] = {}
    for t in trajectories:
        if t.task.task_type not in texts:
            texts[t.task.task_type] = skill_block(skills.text(env, t.task.task_type))
    return [texts[t.task.task_type] for t in trajectories]


@dataclass(frozen=True)
class TeacherInputs:
    """Teacher sequences for the rows with a target, and where their target tokens sit."""

    input_ids: torch.Tensor  # [R, L] right-padded teacher contexts ⊕ targets
    attention_mask: torch.Tensor  # [R, L]
    rows: torch.Tensor  # [R] batch row of each teacher sequence
    target_pos: torch.Tensor  # [R, Z] position of target token z in the teacher sequence (-1 = padding)
    batch_pos: torch.Tensor  # [R, Z] position of the same token in the batch row (-1 = padding)


def teacher_inputs(step_ids: torch.Tensor, input_ids: torch.Tensor, row_traj: torch.Tensor,
                   blocks: Sequence[str], tokenizer, *, pad_id: int, before: str = "target") -> TeacherInputs:
    """Insert the block of the row's trajectory right before each row's target span (h_i, Eq. 3: `before="target"`)
    or before the row's prompt (SDAR's skill document: `before="prompt"`); the row is cut after its target.

    step_ids, input_ids: [N, L] batch rows (right-padded: the prompt starts at column 0); row_traj: [N]; blocks: one
    per trajectory.
    """
    if before not in ("target", "prompt"):
        raise ValueError(f"before={before!r}: the teacher's block goes before the target or before the prompt")
    block_ids = [tokenizer(b, add_special_tokens=False)["input_ids"] for b in blocks]
    seqs, rows, tpos, bpos = [], [], [], []
    for r in range(step_ids.shape[0]):
        cols = (step_ids[r] >= 0).nonzero().flatten()
        if len(cols) == 0:
            continue
        ts, te = int(cols[0]), int(cols[-1]) + 1  # the target span in batch coordinates
        h = block_ids[int(row_traj[r])]
        if before == "target":
            seqs.append(input_ids[r, :ts].tolist() + h + input_ids[r, ts:te].tolist())
        else:
            seqs.append(h + input_ids[r, :te].tolist())
        rows.append(r)
        tpos.append(list(range(ts + len(h), te + len(h))))
        bpos.append(list(range(ts, te)))
    n, width, zmax = len(seqs), max((len(s) for s in seqs), default=0), max((len(p) for p in tpos), default=0)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    target_pos = torch.full((n, zmax), -1, dtype=torch.long)
    batch_pos = torch.full((n, zmax), -1, dtype=torch.long)
    for i, (s, tp, bp) in enumerate(zip(seqs, tpos, bpos)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        target_pos[i, :len(tp)] = torch.tensor(tp)
        batch_pos[i, :len(bp)] = torch.tensor(bp)
    return TeacherInputs(ids, mask, torch.tensor(rows, dtype=torch.long), target_pos, batch_pos)
