"""Running test workers on several threads at once."""
import threading


def run_in_threads(fn, args_list):
    """Call ``fn(*args)`` for every ``args`` of ``args_list``, each on its own thread, all at once; wait
    for them and return the exceptions they raised (an empty list when every call returned)."""
    errors = []
    start = threading.Barrier(len(args_list))

    def run(args):
        try:
            start.wait()
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)
    threads = [threading.Thread(target=run, args=(a,)) for a in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
