"""LazyPool: made on first use, knows its own workers."""
from pyrep.pool import LazyPool


def test_pool_is_made_on_first_use_and_knows_its_workers():
    pool = LazyPool("pyrep-test-pool", 2)
    assert pool._executor is None                      # nothing made yet
    assert not pool.in_pool()
    import threading
    fut = pool.submit(lambda: (pool.in_pool(), threading.current_thread().name))
    inside, name = fut.result(timeout=30)
    assert inside and name.startswith("pyrep-test-pool")
    assert pool.executor() is pool.executor()          # one executor, reused
    other = LazyPool("pyrep-test-other", 1)
    assert other.submit(pool.in_pool).result(timeout=30) is False   # another pool's worker is not ours
    pool.executor().shutdown(wait=True)
    other.executor().shutdown(wait=True)
