from jaxserve.io.jsonl import BatchItem, read_batch, result_record, write_jsonl_atomic
from jaxserve.io.results_log import ResultsLog

__all__ = ["BatchItem", "read_batch", "result_record", "write_jsonl_atomic", "ResultsLog"]
