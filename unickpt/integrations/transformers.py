"""HF Transformers: ``Trainer`` checkpoints in unickpt's format, resumed bit for bit.

``UnickptTrainer`` is a drop-in ``transformers.Trainer``; ``UnickptTrainerMixin`` adds the
same to a ``Trainer`` subclass you already use (``class T(UnickptTrainerMixin, SFTTrainer)``).
Each checkpoint is one unickpt checkpoint ``OUTPUT_DIR/step_<N>`` (weights, optimizer,
scheduler, grad scaler, RNG states, the trainer state JSON), committed atomically and without
pickle, with retention by ``save_total_limit`` (or unickpt's ``keep_*`` options).
``trainer.train(resume_from_checkpoint=True)`` resumes from the newest checkpoint that is
committed *and* passes a full checksum verification (a damaged newest one is skipped with a
warning); HF's own resume loop (epoch and batch skipping, callback states) does the rest.

Why a ``Trainer`` subclass and not a ``TrainerCallback``: callbacks run after HF has written
its pickled files (``on_save``) and after the resume position has been computed from
``trainer_state.json`` (``on_train_begin``), so a callback can neither replace the storage
nor drive the resume.  The subclass overrides the storage hooks only (``_save_checkpoint``,
``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_scaler``,
``_load_rng_state``) and ``train``; where and when they are called, and everything else,
stays HF's.  Those names are checked when the class is created: a Transformers version
without them fails at import with an error naming them, not silently at resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import transformers
from transformers.trainer_callback import ExportableState

import unickpt as api  # the public API only
from unickpt import CheckpointManager, ConfigError, CorruptCheckpointError, UnickptError

from . import _rng
from ._codec import SCHEMA_KEY, decode, encode

__all__ = ["UnickptTrainerMixin", "UnickptTrainer", "newest_verified"]

_HOOKS = ("_save_checkpoint", "_load_from_checkpoint", "_load_optimizer_and_scheduler",
          "_load_scaler", "_load_rng_state", "train")
_missing = [h for h in _HOOKS if not callable(getattr(transformers.Trainer, h, None))]
if _missing:  # pragma: no cover - depends on the installed transformers
    raise ImportError(f"unickpt.integrations.transformers: transformers "
                      f"{transformers.__version__} has no Trainer.{', '.join(_missing)}; this "
                      "integration supports transformers 5.x (see docs/integrations.md)")

_VIEW_MARK = ".unickpt-view"
_STATE = "trainer_state.json"


def newest_verified(root: str) -> str | None:
    """The newest committed checkpoint under ``root`` whose checksums all verify, or None.

    Damaged ones are skipped (newest first) with a :class:`UserWarning` naming them.
    """
    for info in reversed(CheckpointManager(root).checkpoints()):
        try:
            api.verify(info.path)
            return info.path
        except (CorruptCheckpointError, OSError, UnickptError) as e:
            warnings.warn(f"unickpt: {info.path} fails verification ({e}); trying an older "
                          "checkpoint", UserWarning, stacklevel=2)
    return None


class UnickptTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first in the bases).

    Keyword arguments (all optional, removed before ``Trainer.__init__`` sees them):
        unickpt_root: where checkpoints go (default ``args.output_dir``).
        unickpt_options: extra :class:`~unickpt.CheckpointManager` options, e.g.
            ``{"keep_every": 1000}``; ``keep_last`` defaults to ``save_total_limit``.
    """

    def __init__(self, *args: Any, unickpt_root: str | None = None,
                 unickpt_options: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._unickpt_root = unickpt_root
        self._unickpt_options = dict(unickpt_options or {})
        self._unickpt_mgr: CheckpointManager | None = None
        self._unickpt_resume: dict | None = None
        self._unickpt_view: str | None = None

    # ------------------------------------------------------------------ setup
    @property
    def unickpt_root(self) -> str:
        return os.path.abspath(self._unickpt_root or self.args.output_dir)  # type: ignore[attr-defined]

    def _unickpt_check(self) -> None:
        args = self.args  # type: ignore[attr-defined]
        bad = [name for name, on in (
            ("DeepSpeed", getattr(self, "is_deepspeed_enabled", False)),
            ("FSDP", getattr(self, "is_fsdp_enabled", False)),
            (f"world_size={args.world_size}", args.world_size > 1),
            ("load_best_model_at_end", args.load_best_model_at_end),
            ("save_only_model", args.save_only_model),
            ("push_to_hub", args.push_to_hub)) if on]
        if bad:
            raise ConfigError(f"UnickptTrainer does not support {', '.join(bad)} yet; use "
                              "the plain Trainer for that run, or turn it off")

    def _unickpt_manager(self, resume: Any) -> CheckpointManager:
        opts = dict(self._unickpt_options)
        limit = self.args.save_total_limit  # type: ignore[attr-defined]
        if limit and not any(k.startswith("keep_") for k in opts):
            opts["keep_last"] = int(limit)
        return CheckpointManager(self.unickpt_root, resume=resume, **opts)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest
        committed, verified unickpt checkpoint (a path: that checkpoint)."""
        self._unickpt_check()
        path = None
        if resume_from_checkpoint is True:
            path = newest_verified(self.unickpt_root)
            if path is None:
                raise unickpt_not_found(self.unickpt_root)
        elif resume_from_checkpoint not in (None, False):
            candidate = os.path.abspath(os.fspath(resume_from_checkpoint))
            try:
                api.inspect(candidate)
                path = candidate
            except api.CheckpointNotFoundError:
                pass  # not a unickpt checkpoint (an HF checkpoint-N folder): HF loads it
        resume: Any = "never"
        if path is not None:
            inside = os.path.dirname(path) == self.unickpt_root
            resume = int(api.inspect(path).info.get("step", 0)) if inside else path
            self._unickpt_load(path)
            resume_from_checkpoint = self._unickpt_view
        self._unickpt_mgr = self._unickpt_manager(resume)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._unickpt_mgr.close()
            self._unickpt_mgr = None
            self._unickpt_resume = None
            if self._unickpt_view:
                shutil.rmtree(self._unickpt_view, ignore_errors=True)
                self._unickpt_view = None

    def _unickpt_load(self, path: str) -> None:
        tree = api.load(path, verify=True)  # every checksum, before anything is changed
        meta = api.inspect(path).metadata
        if meta.get("integration") != "transformers":
            raise ConfigError(f"{path} is not a checkpoint written by UnickptTrainer; resume "
                              "from one of its step_<N> checkpoints")
        self._unickpt_resume = decode(tree, meta.get(SCHEMA_KEY))
        # HF reads the resume position from trainer_state.json in the checkpoint folder:
        # give it a folder holding just that file, written from the checkpoint.
        view = tempfile.mkdtemp(prefix=".unickpt-resume-")
        open(os.path.join(view, _VIEW_MARK), "w").close()
        with open(os.path.join(view, _STATE), "w", encoding="utf-8") as f:
            f.write(self._unickpt_resume["trainer_state"])
        self._unickpt_view = view

    def _ours(self, checkpoint: Any) -> bool:
        return (checkpoint is not None and self._unickpt_resume is not None
                and os.path.abspath(os.fspath(checkpoint)) == self._unickpt_view)

    # ------------------------------------------------------------------ save
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if trial is not None or getattr(self, "hp_search_backend", None) is not None:
            raise ConfigError("UnickptTrainer does not support hyper-parameter search")
        self.store_flos()  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]
        for cb in [c for c in self.callback_handler.callbacks + [self.control]  # type: ignore[attr-defined]
                   if isinstance(c, ExportableState)]:
            name = type(cb).__name__
            if isinstance(state.stateful_callbacks.get(name), list):
                state.stateful_callbacks[name].append(cb.state())
            else:
                state.stateful_callbacks[name] = cb.state()
        scaler = getattr(self.accelerator, "scaler", None)  # type: ignore[attr-defined]
        ckpt = {
            "model": transformers.modeling_utils.unwrap_model(self.model).state_dict(),  # type: ignore[attr-defined]
            "optimizer": self.optimizer.state_dict(),  # type: ignore[attr-defined]
            "scheduler": self.lr_scheduler.state_dict(),  # type: ignore[attr-defined]
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": _rng.capture(),
            "trainer_state": json.dumps(dataclasses.asdict(state), indent=2,
                                        sort_keys=True) + "\n",
        }
        tree, schema = encode(ckpt, f"the Trainer checkpoint of step {state.global_step}")
        assert self._unickpt_mgr is not None
        self._unickpt_mgr.save(state.global_step, tree, force=True, metadata={
            SCHEMA_KEY: schema, "integration": "transformers",
            "transformers": transformers.__version__})

    # ------------------------------------------------------------------ load hooks
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._ours(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        target = transformers.modeling_utils.unwrap_model(model or self.model)  # type: ignore[attr-defined]
        target.load_state_dict(self._unickpt_resume["model"], strict=True)  # type: ignore[index]

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        if not self._ours(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        r = self._unickpt_resume
        self.optimizer.load_state_dict(r["optimizer"])  # type: ignore[attr-defined,index]
        self.lr_scheduler.load_state_dict(r["scheduler"])  # type: ignore[attr-defined,index]
        r["model"] = r["optimizer"] = None  # type: ignore[index]  # free the host copies

    def _load_scaler(self, checkpoint: Any) -> None:
        if not self._ours(checkpoint):
            return super()._load_scaler(checkpoint)  # type: ignore[misc]
        saved = self._unickpt_resume.get("scaler")  # type: ignore[union-attr]
        scaler = getattr(self.accelerator, "scaler", None)  # type: ignore[attr-defined]
        if saved is not None and scaler is not None:
            scaler.load_state_dict(saved)

    def _load_rng_state(self, checkpoint: Any) -> None:
        if not self._ours(checkpoint):
            return super()._load_rng_state(checkpoint)  # type: ignore[misc]
        notes = _rng.restore(self._unickpt_resume["rng"])  # type: ignore[index]
        if notes:
            warnings.warn("unickpt: RNG state not restored: " + "; ".join(notes),
                          UserWarning, stacklevel=2)


def unickpt_not_found(root: str) -> Exception:
    return api.CheckpointNotFoundError(
        f"resume_from_checkpoint=True: {root} holds no committed, verified unickpt "
        "checkpoint; train without resume_from_checkpoint to start fresh")


class UnickptTrainer(UnickptTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` saving and resuming through unickpt (see the module doc)."""
