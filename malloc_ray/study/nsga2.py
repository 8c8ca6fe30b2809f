"""NSGA-II that Tune can checkpoint.

Optuna 5's genetic samplers hold a thread lock, which pickle refuses, and Tune pickles the
search algorithm into its experiment state after every trial. This sampler leaves the lock out
of its pickled state and makes a fresh one when it is loaded; everything else is Optuna's.
Imported only where a multi-objective search runs (it imports optuna).
"""
import threading

import optuna


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


# Optuna names a genetic sampler's study attributes after its class; keep NSGA-II's names, so a
# study resumed under another Optuna version reads the same generations.
for _key in ("_GENERATION_KEY", "_PARENT_CACHE_KEY_PREFIX"):
    if hasattr(optuna.samplers.NSGAIISampler, _key):
        setattr(PicklableNSGAIISampler, _key, getattr(optuna.samplers.NSGAIISampler, _key))
