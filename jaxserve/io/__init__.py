from jaxserve.io.jsonl import BatchItem, read_batch, result_record, write_jsonl_atomic

__all__ = ["BatchItem", "read_batch", "result_record", "write_jsonl_atomic"]
