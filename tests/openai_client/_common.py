"""Helpers shared by the openai-client tests (imported from the tests' own
folder, which both a plain `python test_x.py` and pytest put on sys.path)."""

import sys
import threading


def run_at_once(n, one):
    """`one(i)` on `n` threads released together; their results, in order (an
    exception becomes its repr, for the caller's assertion to show)."""
    go = threading.Barrier(n)
    results = [None] * n

    def body(i):
        go.wait()
        try:
            results[i] = one(i)
        except Exception as e:  # noqa: BLE001 (reported by the caller)
            results[i] = repr(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main(namespace):
    """Run a module's `test_*` functions in name order, as a plain script does."""
    tests = [v for k, v in sorted(namespace.items()) if k.startswith("test_") and callable(v)]
    for t in tests:
        t()
        print(f"ok {t.__name__}")
    print(f"{len(tests)} passed")
    sys.exit(0)
