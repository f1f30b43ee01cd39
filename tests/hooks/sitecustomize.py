"""Test-only slow-down for runs of the real entry point, loaded via PYTHONPATH=tests/hooks.

Python imports `sitecustomize` at start-up, so a subprocess started with this folder on PYTHONPATH
runs the unmodified code with two wrappers, giving a test time to kill it mid-step:
  BIRDROUNDS_TEST_PSEUDO_DELAY_S  sleep before each teacher inference batch, and append the batch
                                  size to the file BIRDROUNDS_TEST_PSEUDO_LOG (one line per batch);
  BIRDROUNDS_TEST_COLLATE_DELAY_S sleep in each training batch's collate;
and one fault: BIRDROUNDS_TEST_RAISE=NAME makes the run's data preparation raise the builtin exception NAME
(RuntimeError: a crash, KeyboardInterrupt: a Ctrl-C).
"""

import os
import time

_pseudo_delay = float(os.environ.get("BIRDROUNDS_TEST_PSEUDO_DELAY_S", "0"))
_collate_delay = float(os.environ.get("BIRDROUNDS_TEST_COLLATE_DELAY_S", "0"))

if _pseudo_delay > 0:
    import birdrounds.pseudo as _pseudo

    _model_probs = _pseudo.model_probs

    def _slow_model_probs(models, audio, framewise):
        time.sleep(_pseudo_delay)
        with open(os.environ["BIRDROUNDS_TEST_PSEUDO_LOG"], "a") as f:
            f.write(f"{len(audio)}\n")
        return _model_probs(models, audio, framewise)

    _pseudo.model_probs = _slow_model_probs

if _collate_delay > 0:
    import birdrounds.data.clips as _clips

    _call = _clips.MixUpCollate.__call__

    def _slow_call(self, batch):
        time.sleep(_collate_delay)
        return _call(self, batch)

    _clips.MixUpCollate.__call__ = _slow_call

_raise = os.environ.get("BIRDROUNDS_TEST_RAISE")
if _raise:
    import builtins

    import birdrounds.rounds as _rounds

    def _failing_prepare(*args, **kwargs):
        raise getattr(builtins, _raise)("raised by tests/hooks for the test")

    _rounds.prepare_data = _failing_prepare
