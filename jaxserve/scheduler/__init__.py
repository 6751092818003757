"""Host-side scheduling: the batch plan (global prefix tree, groups, order), the page pool and the
per-step scheduler that turns sequences into step plans."""
from jaxserve.scheduler.page_pool import PagePool
from jaxserve.scheduler.scheduler import Scheduler
from jaxserve.scheduler.sequence import KVSequence, Sample, SharedPrefix, Status
from jaxserve.scheduler.step_plan import MAX_COPIES, PlannedRow, RowSampling, StepPlan

__all__ = ["Scheduler", "PagePool", "StepPlan", "PlannedRow", "RowSampling", "MAX_COPIES",
           "KVSequence", "Sample", "SharedPrefix", "Status"]
