"""What every teacher-shaped estimator shares (StepOPSD, and SDAR's RLSD / SDAR / OPSD / GRPO+OPSD baselines): a base
estimator whose advantages it starts from (`algorithm.base`), the teacher (a stale snapshot of the policy
refreshed every `teacher_refresh` training steps, or the live policy with 0; `stepopsd.teacher.TeacherSnapshot`) and
what it reads (`algorithm.teacher.context`: the hindsight block before the step's target, Eq. 3, or SDAR's skill
document of the task type before the prompt, `stepopsd.hindsight.SkillDocs`; the skills folder is read when the
estimator is built, and `bind_env` checks it against the run's environment and task types, from
`stepopsd.config.check_config`), its state in checkpoints, and one way to fail: a batch whose teacher pass fails (a
teacher context longer than the teacher allows, out of memory) trains on the base estimator's advantages, with a
warning, counted in `<name>/rescoring_failed`; under several ranks a failure on any rank makes every rank fall back for that batch.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from stepopsd import ranks
from stepopsd.data.batch import RolloutBatch
from stepopsd.estimators import Context, Estimator, Services, build_estimator, get_estimator
from stepopsd.estimators.gigpo import GiGPOKnobs
from stepopsd.estimators.outcome import GRPOConfig
from stepopsd.faults import maybe_kill
from stepopsd.hindsight import CONTEXTS, SkillDocs, alfworld_peer_lines, hindsight_blocks, skill_blocks
from stepopsd.teacher import TeacherSnapshot, teacher_target_logprobs

log = logging.getLogger(__name__)


@dataclass
class TeacherShapedConfig(GRPOConfig):
    """The `algorithm` node of a teacher-shaped estimator: its base, and the base's knobs (`scale_by_std` for grpo,
    `gigpo.*` for gigpo: the same keys as under `algorithm=grpo` / `algorithm=gigpo`)."""

    base: str = "grpo"  # the estimator whose advantages the teacher reshapes: grpo, drgrpo, rloo, gigpo
    gigpo: GiGPOKnobs = field(default_factory=GiGPOKnobs)


def base_estimator(algorithm: Mapping, name: str) -> Estimator:
    """The estimator `algorithm.base` names, built from the same node (a teacher-shaped one is refused: one line)."""
    base = algorithm.get("base", "grpo")
    if issubclass(get_estimator(base), TeacherShaped):
        raise ValueError(f"algorithm.base={base}: {name} reshapes another estimator's advantages; use grpo, drgrpo, "
                         "rloo or gigpo")
    return build_estimator({**algorithm, "name": base})


class TeacherShaped(Estimator):
    """`knobs`: the estimator's own (`StepOPSDConfig`, `RLSDKnobs`, `SDARKnobs`: each has `teacher_refresh`)."""

    def __init__(self, knobs, base: Estimator, *, micro_batch: int = 8, context: str = "hindsight",
                 skills_dir: str | None = None, skill_all: bool = False):
        if micro_batch < 1:
            raise ValueError(f"algorithm.teacher.micro_batch_rows={micro_batch}: need >= 1")
        if context not in CONTEXTS:
            raise ValueError(f"algorithm.teacher.context={context}: use {' or '.join(CONTEXTS)}")
        if context != "skills" and (skills_dir or skill_all):
            raise ValueError(f"algorithm.teacher.skills_dir / skill_all are read with algorithm.teacher.context=skills "
                             f"only (this run: context={context})")
        self.knobs, self.base = knobs, base
        self.teacher_refresh = knobs.teacher_refresh
        self.micro_batch = micro_batch  # teacher-context rows per teacher forward pass
        self.context = context
        self.skills = SkillDocs.load(skills_dir, skill_all) if context == "skills" else None  # SkillsError: one line
        self.env: str | None = None  # the run's environment (`bind_env`): how task types find their documents
        self.services = Services()
        self.teacher: TeacherSnapshot | None = None

    @classmethod
    def from_config(cls, algorithm: Mapping) -> "TeacherShaped":
        teacher = algorithm.get("teacher", {})
        return cls(cls.knobs_from(algorithm), base_estimator(algorithm, cls.__name__),
                   micro_batch=teacher.get("micro_batch_rows", 8), context=teacher.get("context", "hindsight"),
                   skills_dir=teacher.get("skills_dir"), skill_all=teacher.get("skill_all", False))

    def bind_env(self, env: str, task_types=None) -> None:
        """The run's environment, and the task types of its training data (None: not known before loading): with
        `context=skills`, each must have its skill document (`SkillsError`, one line), before any work."""
        self.env = env
        if self.skills is not None:
            self.skills.check(env, task_types)

    @classmethod
    def knobs_from(cls, algorithm: Mapping):
        """The estimator's own knobs from its `algorithm` node (ValueError, one line, for a bad one)."""
        raise NotImplementedError

    def setup(self, policy, services: Services) -> None:
        self.services = services
        self.base.setup(policy, services)
        if self.teacher is None:
            self.teacher = TeacherSnapshot(policy, self.teacher_refresh, services.frozen_dtype)

    def with_teacher(self, ctx: Context, score: Callable) -> tuple[object | None, str | None, dict]:
        """`score(teacher)` under the trainer's precision (FSDP: the live policy's weights gathered), after the
        snapshot's refresh; returns (its result or None, the error every rank agreed on or None, metrics)."""
        t0, step = time.perf_counter(), ctx.step
        refreshed = self.teacher.maybe_refresh(ctx.policy, step)
        teacher = self.teacher.model.to(ctx.device)
        live = teacher is ctx.policy  # teacher_refresh=0: under FSDP the live policy's weights are gathered
        result, error = None, None
        try:
            with ctx.compute(), ctx.full_weights() if live else contextlib.nullcontext():
                result = score(teacher)
            maybe_kill("rescore", step + 1)  # tests only (STEPOPSD_TEST_KILL_AT)
        except Exception as e:  # a context too long for the teacher, out of memory, ...: this batch keeps the base's
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        error = ranks.agreed_problem(error)  # one rank's failure: every rank's share of the batch falls back together
        if error is not None:
            log.warning("[%s] teacher rescoring failed at training step %d (%s): this batch trains on plain %s "
                        "advantages", self.name, step + 1, error, self.base.name.upper())
            result = None
        metrics = {"time/rescore_s": time.perf_counter() - t0, f"{self.name}/teacher_refreshed": float(refreshed),
                   f"{self.name}/teacher_age": step - self.teacher.taken_at,
                   f"{self.name}/rescoring_failed": float(error is not None)}
        return result, error, metrics

    def skill_context(self, trajectories) -> tuple[list[str], str]:
        """`context=skills`: each trajectory's skill block and where it goes (before the prompt)."""
        if self.env is None:
            raise RuntimeError("algorithm.teacher.context=skills: the run's environment is not bound (bind_env)")
        return skill_blocks(trajectories, self.skills, self.env), "prompt"

    def teacher_logprobs(self, batch: RolloutBatch, teacher, peer_budget: int):
        """log π_T of every target token under its trajectory's teacher context, [N, L] (0 elsewhere): the hindsight
        block before the target (Eq. 2-3), or with `context=skills` the skill block before the prompt."""
        s = self.services
        if self.skills is None:
            blocks, before = hindsight_blocks(batch.trajectories, s.tokenizer, peer_budget=peer_budget,
                                              serialise=s.peer_lines or alfworld_peer_lines), "target"
        else:
            blocks, before = self.skill_context(batch.trajectories)
        return teacher_target_logprobs(teacher, batch, blocks, s.tokenizer, pad_id=s.tokenizer.pad_token_id,
                                       temperature=s.temperature, micro_batch=self.micro_batch, before=before)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher else None}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
