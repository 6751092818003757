"""An engine actor for tests/test_ray_data.py that kills its own process, once each, on the block
holding the row with id `crash_before` (before the block's results are written: they are lost and
must be recomputed) and on the block holding `crash_after` (after they are written: the retried
task must not write them again). Imported by the Ray workers, so it lives outside the test module."""
from __future__ import annotations

import json
import os

from jaxserve.cluster.ray_data import LLMPredictor


class CrashOncePredictor(LLMPredictor):
    def _first_time(self, tag: str) -> bool:
        try:
            os.close(os.open(f"{self.store.root}.crashed-{tag}", os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    def run_block(self, name, rows):
        ids = {json.loads(r.text).get("id") for r in rows}
        if "crash_before" in ids and self._first_time("before"):
            os._exit(1)
        super().run_block(name, rows)
        if "crash_after" in ids and self._first_time("after"):
            os._exit(1)
