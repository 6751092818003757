from jaxserve.io.jsonl import (BatchItem, InputError, check_record, is_error_record, read_batch,
                               result_record, write_jsonl_atomic)
from jaxserve.io.lock import OutputLock, OutputLocked
from jaxserve.io.paths import OutputPathError, check_output_path
from jaxserve.io.results_log import (Hashes, PartialRefused, ResultsLog, ResultsLogWriteError,
                                     ResumeReport)

__all__ = ["BatchItem", "InputError", "check_record", "is_error_record", "read_batch",
           "result_record", "write_jsonl_atomic", "OutputLock", "OutputLocked", "OutputPathError",
           "check_output_path", "Hashes", "PartialRefused", "ResultsLog", "ResultsLogWriteError",
           "ResumeReport"]
