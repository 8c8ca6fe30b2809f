"""The order a study's cells start in, as one Ray Tune run.

Trained cells start first. A post-hoc cell (H2O, SnapKV, KIVI, IntactKV) evaluates the weights
its Native twin saves, so it is handed to Tune only once that twin is not waiting or running in
this run: it finished (weights saved, or a failure recorded) or it was finished before the run.
A post-hoc cell never holds a slot waiting for weights, and the slots the last trained cells
leave idle run the post-hoc cells whose twins are done, instead of waiting for a second phase.

`CellQueue` is the plain logic (tests/test_study_driver.py drives it by hand); `CellSearcher`
is the Tune searcher around it (module level: Tune pickles its search algorithm).
"""

from __future__ import annotations

import json

from ray.tune.search import Searcher


def start_order(records: list[dict]) -> list[dict]:
    """Trained cells by name, then post-hoc cells by name: the order they are offered in."""
    return sorted(records, key=lambda r: (r["workflow"] == "post-hoc", r["name"]))


class CellQueue:
    """`next()`: the next cell that may start (None: none yet, DONE: none left); `finished(id)`
    once a cell's trial ended, however it ended."""

    DONE = "done"

    def __init__(self, records: list[dict]):
        self.waiting = start_order(records)
        # twins that run in this run and have not ended; a post-hoc cell waits for its twin
        self.running_twins = {r["trial_id"] for r in self.waiting if r["workflow"] != "post-hoc"}

    def next(self):
        if not self.waiting:
            return self.DONE
        for i, rec in enumerate(self.waiting):
            if rec["workflow"] != "post-hoc" or rec["twin_id"] not in self.running_twins:
                return self.waiting.pop(i)
        return None

    def finished(self, trial_id: str | None) -> None:
        self.running_twins.discard(trial_id)


class CellSearcher(Searcher):
    """Tune's search algorithm over a fixed list of cells: each trial's config is
    {"cell_name": name}, suggested in `CellQueue` order."""

    def __init__(self, records: list[dict]):
        super().__init__()
        self.queue = CellQueue(records)
        self.started: dict[str, str] = {}  # Tune trial id -> cell trial id

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the cells are the search space; nothing to set

    def suggest(self, trial_id: str):
        rec = self.queue.next()
        if rec is CellQueue.DONE:
            return Searcher.FINISHED
        if rec is None:
            return None  # Tune asks again once a trial ends
        self.started[trial_id] = rec["trial_id"]
        return {"cell_name": rec["name"]}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        self.queue.finished(self.started.get(trial_id))

    # Tune's experiment checkpoint; JSON, so restoring reads no code from the study directory.
    def save(self, checkpoint_path: str) -> None:
        state = {"waiting": self.queue.waiting, "running_twins": sorted(self.queue.running_twins),
                 "started": self.started}
        with open(checkpoint_path, "w") as f:
            json.dump(state, f, default=str)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.queue.waiting, self.started = state["waiting"], state["started"]
        self.queue.running_twins = set(state["running_twins"])
