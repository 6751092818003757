from jaxserve.cache.page_pool import OutOfPages, PagePool

__all__ = ["PagePool", "OutOfPages"]
