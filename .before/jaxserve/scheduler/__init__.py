from jaxserve.scheduler.batcher import ScheduledSeq, Scheduler, StepPlan
from jaxserve.scheduler.sequence import Sequence, Status

__all__ = ["Scheduler", "StepPlan", "ScheduledSeq", "Sequence", "Status"]
